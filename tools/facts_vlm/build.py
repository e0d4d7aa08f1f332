"""Build facts-vlm end to end and measure the properties its model card claims.

    python -m tools.facts_vlm.build --out examples/facts-vlm [--weights build/facts-vlm/model.pt]

Without ``--weights`` it trains first (`tools.facts_vlm.train` defaults, seed 0, 2 threads).
It writes ``model.onnx``, ``calib.npz``, ``eval.npz``, ``tokenizer.json``,
``processor.json``, ``train_log.json``, ``card.json`` (every measured number),
``specialization.png`` and the model card ``README.md``.

The card's properties are measured here, before any allocation method is compared on the
model (issue: no tuning of the stick after seeing method results): uniform GPTQ (group 128)
at 4, 3 and 2 bits against fp32 with paired intervals; the vision / text token ratio and the
background share; per expert, the share of its routed tokens that are text; the time of a
full ``modec compile`` (MODE, 3.0 bits, llvm, no cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modec import data, stats
from modec.evaluate import EvalResult, Resampling, compare, evaluate
from modec.frontend import OrtRunner
from modec.pipelines import CompileOptions
from modec.sweep import analyze, evaluate_model, quantize
from tools.digits_vlm import build_data, prompt_files
from tools.digits_vlm.export import check_against_torch, export, load_trained
from tools.digits_vlm.model import DigitsVLM
from tools.facts_vlm import scenes
from tools.facts_vlm import train as facts_train

#: Calibration mix: mostly multimodal, as real calibration data (16 per image family, 16 text).
CALIB_COUNTS = {**{f: 16 for f in scenes.MULTIMODAL_FAMILIES},
                "arith": 2, "compare": 2, "color": 4, "city": 4, "code": 4}  # fmt: skip
EVAL_PER_FAMILY = 200
#: Each knowledge family has this many times ``EVAL_PER_FAMILY`` samples: knowledge is half
#: of ``eval.npz`` (LLM benchmarks are mostly knowledge; chosen before the model was trained).
KNOWLEDGE_WEIGHT = 3
#: The issue's targets for the stick: (low, high) loss of overall accuracy in points.
LOSS_TARGETS = {4: (None, 1.0), 3: (1.0, 5.0), 2: (10.0, None)}


def _mix_sentence(mix: tuple[bool, ...]) -> str:
    """'One batch in 4 holds' (or '2 batches in 4 hold') for a training mix."""
    n = sum(mix)
    return f"One batch in {len(mix)} holds" if n == 1 else f"{n} batches in {len(mix)} hold"


def eval_counts(per_family: int = EVAL_PER_FAMILY) -> dict[str, int]:
    """Samples per family of ``eval.npz``: ``per_family``, knowledge families
    `KNOWLEDGE_WEIGHT` times that."""
    return {f: per_family * (KNOWLEDGE_WEIGHT if f in scenes.KNOWLEDGE_FAMILIES else 1)
            for f in scenes.FAMILIES}  # fmt: skip


def build_sets(out: Path, per_family: int = EVAL_PER_FAMILY) -> dict[str, Path]:
    pools = scenes.digit_pools(seed=0)
    calib = scenes.make_split(pools["calib"], CALIB_COUNTS, seed=100)
    ev = scenes.make_split(pools["eval"], eval_counts(per_family), 200)
    paths = {"calib": out / "calib.npz", "eval": out / "eval.npz"}
    build_data.write_split(paths["calib"], calib, scenes)
    build_data.write_split(paths["eval"], ev, scenes)
    return paths


def calibration_set(path: Path, seed: int) -> Path:
    """A fresh 128-sample calibration set of ``seed`` (seed 0 is ``calib.npz``)."""
    pools = scenes.digit_pools(seed=0)
    build_data.write_split(path, scenes.make_split(pools["calib"], CALIB_COUNTS, seed=seed + 100),
                           scenes)  # fmt: skip
    return path


def knowledge_mask(ds: data.Dataset) -> np.ndarray:
    assert ds.family is not None
    codes = [ds.families.index(f) for f in scenes.KNOWLEDGE_FAMILIES]
    return np.isin(ds.family, codes)


def split_accuracy(res: EvalResult, mask: np.ndarray) -> float:
    assert res.correct is not None
    return float(res.correct[mask].mean())


def popularity_quarter(ds: data.Dataset) -> np.ndarray:
    """Per sample, the training-popularity quarter (0 = most mentioned) of the entity a
    knowledge question names, -1 for other samples (read from the question's syllables)."""
    ids = ds.inputs["input_ids"]
    out = np.full(len(ds), -1, dtype=np.int64)
    for i in np.flatnonzero(knowledge_mask(ds)):
        (entity,) = scenes.entities_in(ids[i].tolist())
        out[i] = 4 * int(scenes.RANK[entity]) // len(scenes.FACTS)
    return out


def by_quarter(res: EvalResult, quarter: np.ndarray) -> list[float]:
    """Knowledge accuracy per popularity quarter, most mentioned first."""
    return [split_accuracy(res, quarter == q) for q in range(4)]


@torch.no_grad()
def specialization(model: DigitsVLM, ds: data.Dataset, batch: int = 32) -> np.ndarray:
    """Routed (token, slot) selections per layer and expert by modality: [L, E, 2] (text,
    vision), counted over every non-padding token of ``ds`` in PyTorch."""
    model.eval()
    moes = model.moe_layers()
    counts = np.zeros((len(moes), model.cfg.num_experts, 2), dtype=np.int64)
    for idx, feeds in ds.batches(batch):
        model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                     "pixel_values")))  # fmt: skip
        mod = ds.trimmed_modality(idx).reshape(-1)
        for layer, moe in enumerate(moes):
            assert moe.last_router_probs is not None
            top = torch.topk(moe.last_router_probs, moe.top_k, dim=-1).indices.numpy()
            for m, col in ((data.TEXT, 0), (data.VISION, 1)):
                np.add.at(counts[layer, :, col], top[mod == m].reshape(-1), 1)
    return counts


def plot_specialization(counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts, _ = counts.shape
    fig, grid = plt.subplots(1, layers, figsize=(3 * layers, 2.8), sharey=True, squeeze=False)
    axes = list(grid[0])
    total = counts.sum(axis=(0, 1))
    mix = total[0] / total.sum()
    for layer, ax in enumerate(axes):
        c = counts[layer]
        share = c[:, 0] / np.maximum(c.sum(axis=1), 1)
        ax.bar(np.arange(experts), share, color="#d62728")
        ax.axhline(mix, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("text share of routed tokens")
    fig.suptitle("share of each expert's routed tokens that are text "
                 f"(dashed: all tokens, {100 * mix:.1f}%)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def token_stats(ds: data.Dataset) -> dict[str, float]:
    mm = ds.multimodal
    vis = (ds.modality == data.VISION).sum(axis=1)[mm]
    txt = (ds.modality == data.TEXT).sum(axis=1)[mm]
    ids = ds.inputs["input_ids"]
    return {
        "vision_per_sample": float(vis.mean()),
        "text_per_sample_mm": float(txt.mean()),
        "ratio_mean": float(vis.sum() / txt.sum()),
        "ratio_min": float((vis / txt).min()),
        "text_per_sample_text_only": float((ds.modality == data.TEXT).sum(axis=1)[~mm].mean()),
        # A bound by construction: at most MAX_DIGITS digits of 4 patches each
        # (tests/digits/test_facts_scenes.py checks the pixels of rendered images).
        "background_min": 1.0 - 4 * scenes.MAX_DIGITS / scenes.NUM_PATCHES,
        "multimodal_share": float(mm.mean()),
        "samples": len(ds),
        "tokens": int(ids.shape[1]),
    }


def quantization(model_path: Path, calib: Path, ds: data.Dataset, fp32: EvalResult,
                 opts: Resampling, know: np.ndarray, quarter: np.ndarray,
                 ) -> dict[str, Any]:  # fmt: skip
    """Uniform GPTQ (group 128) at 4, 3, 2 bits: accuracy per split and the paired
    difference to fp32 (bootstrap interval, McNemar p). ``know``: `knowledge_mask` of ``ds``;
    ``quarter``: its `popularity_quarter`."""
    t0 = time.perf_counter()
    an = analyze(str(model_path), str(calib), CompileOptions(seed=0), sensitivity=False)
    out: dict[str, Any] = {"analysis_seconds": round(time.perf_counter() - t0, 1), "widths": {}}
    for bits in (4, 3, 2):
        t0 = time.perf_counter()
        res = evaluate_model(quantize(an, "uniform", float(bits)).model, ds)
        rows = compare(res, fp32, opts).rows
        cmp = {g.key: d for g, d in rows if not g.family}
        fam = {g.key: d for g, d in rows if g.family}
        assert res.correct is not None and fp32.correct is not None
        kdiff = opts.difference(res.correct[know].astype(float), fp32.correct[know].astype(float))
        out["widths"][bits] = {
            "overall": res.overall.accuracy,
            "multimodal": res.multimodal.accuracy,
            "text_only": res.text_only.accuracy,
            "knowledge": split_accuracy(res, know),
            "knowledge_by_quarter": by_quarter(res, quarter),
            "families": {k: v.accuracy for k, v in res.families.items()},
            "delta_pp": {
                k: [100 * d.accuracy.estimate, 100 * d.accuracy.low, 100 * d.accuracy.high]
                for k, d in cmp.items()
            },
            "delta_knowledge_pp": [100 * kdiff.estimate, 100 * kdiff.low, 100 * kdiff.high],
            "mcnemar_p_overall": cmp["overall"].mcnemar_p,
            "delta_families_pp": {k: 100 * d.accuracy.estimate for k, d in fam.items()},
            "answer_nll": float(np.nanmean(res.answer_nll)) if res.answer_nll is not None else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"uniform {bits}-bit: overall {100 * res.overall.accuracy:.2f}% "
              f"({out['widths'][bits]['delta_pp']['overall'][0]:+.2f} pp)", flush=True)  # fmt: skip
    return out


def time_compile(model_path: Path, calib: Path) -> dict[str, Any]:
    """Wall time of a full ``modec compile`` (MODE, 3.0 bits, llvm), no cache."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "modec.cli", "compile", str(model_path), "--calib",
               str(calib), "--budget", "3.0", "--no-cache", "-q", "-o", f"{tmp}/out"]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
    return {"command": "modec compile model.onnx --calib calib.npz --budget 3.0 --no-cache",
            "seconds": round(seconds, 1)}  # fmt: skip


def measure(out: Path, model: DigitsVLM, train_log: dict[str, Any], ort_diff: float,
            compile_timing: bool) -> dict[str, Any]:  # fmt: skip
    ev = data.load(out / "eval.npz")
    cal = data.load(out / "calib.npz")
    opts = Resampling()
    t0 = time.perf_counter()
    fp32 = evaluate(OrtRunner(out / "model.onnx"), ev)
    eval_seconds = time.perf_counter() - t0
    know = knowledge_mask(ev)
    quarter = popularity_quarter(ev)
    assert fp32.correct is not None and ev.family is not None
    counts = specialization(model, cal)
    plot_specialization(counts, out / "specialization.png")
    doc: dict[str, Any] = {
        "parameters": model.parameter_counts(),
        "config": model.cfg.to_dict(),
        "onnx_mib": (out / "model.onnx").stat().st_size / 2**20,
        "ort_vs_torch_max_abs": ort_diff,
        "train": {k: v for k, v in train_log.items() if k != "log"},
        "train_final_val": (train_log.get("log") or [{}])[-1],
        "fp32": {
            **fp32.to_json(opts),
            "knowledge": split_accuracy(fp32, know),
            "knowledge_by_quarter": by_quarter(fp32, quarter),
            "knowledge_ci95": list(
                stats.wilson_interval(int(fp32.correct[know].sum()), int(know.sum()))
            )[1:],
            "eval_seconds": round(eval_seconds, 1),
        },
        "tokens": {"calib": token_stats(cal), "eval": token_stats(ev)},
        "eval_per_family": int(np.bincount(ev.family).min()),
        "specialization": {"counts": counts.tolist()},
        "quantization": quantization(
            out / "model.onnx", out / "calib.npz", ev, fp32, opts, know, quarter
        ),
    }
    if compile_timing:
        doc["compile"] = time_compile(out / "model.onnx", out / "calib.npz")
    return doc


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def card(doc: dict[str, Any]) -> str:
    cfg, counts, fp = doc["config"], doc["parameters"], doc["fp32"]
    q = {int(k): v for k, v in doc["quantization"]["widths"].items()}  # JSON keys are strings
    tok = doc["tokens"]
    spec = np.asarray(doc["specialization"]["counts"])
    share = spec[..., 0] / np.maximum(spec.sum(axis=-1), 1)
    mix = spec[..., 0].sum() / spec.sum()
    train = doc["train"]

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    loss = {b: -q[b]["delta_pp"]["overall"][0] + 0.0 for b in q}  # + 0.0: no "-0.00"
    rows_q = []
    for b in sorted(q, reverse=True):
        d = q[b]["delta_pp"]["overall"]
        lo, hi = LOSS_TARGETS[int(b)]
        target = (f"≤ {hi:g}" if lo is None else f"≥ {lo:g}" if hi is None
                  else f"{lo:g}–{hi:g}")  # fmt: skip
        ok = (lo is None or loss[b] >= lo) and (hi is None or loss[b] <= hi)
        kd = q[b]["delta_knowledge_pp"]
        rows_q.append(
            f"| {b} | {pct(q[b]['overall'])} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | "
            f"{target} | {_verdict(ok)} | {pct(q[b]['multimodal'])} | {pct(q[b]['text_only'])} | "
            f"{pct(q[b]['knowledge'])} ({kd[0]:+.2f} pp) | {q[b]['answer_nll']:.4f} |"
        )
    fams = fp["families"]
    fam_rows = "\n".join(
        f"| {name} | {'multimodal' if name in scenes.MULTIMODAL_FAMILIES else 'knowledge' if name in scenes.KNOWLEDGE_FAMILIES else 'computed'} | "
        f"{'multi' if name in ('where', 'list', 'code') else 'one'} | {v['n']} | "
        f"{pct(v['accuracy'])} [{pct(v['accuracy_ci95'][0])}, {pct(v['accuracy_ci95'][1])}] | "
        f"{v['answer_nll']:.4f} | "
        + " | ".join(f"{pct(q[b]['families'][name])}" for b in sorted(q, reverse=True))
        + " |"
        for name, v in fams.items()
    )
    spec_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{100 * s:.0f}" for s in share[layer]) + " |"
        for layer in range(share.shape[0])
    )
    nexp = share.shape[1]
    text_heavy = int((share > 2 * mix).sum())
    vision_only = int((share < 0.25 * mix).sum())
    ev, cal = tok["eval"], tok["calib"]
    comp = doc.get("compile")
    comp_line = (
        f"| a full `modec compile` | ≤ 10 min | {comp['seconds'] / 60:.1f} min "
        f"(`{comp['command']}`) | {_verdict(comp['seconds'] <= 600)} |"
        if comp
        else "| a full `modec compile` | ≤ 10 min | not measured (`--no-compile-timing`) | — |"
    )
    val = doc["train_final_val"]
    quarters = [("fp32", fp.get("knowledge_by_quarter"))] + [
        (f"{b}-bit", q[b].get("knowledge_by_quarter")) for b in sorted(q, reverse=True)
    ]
    quarter_rows = "\n".join(
        f"| {name} | " + " | ".join(pct(v) for v in vals) + " |" for name, vals in quarters if vals
    )
    return f"""# facts-vlm — a stick that feels quantization

A harder companion to digits-vlm (which stays the fast model of the tests): the same
architecture on 128×128 images (**256 vision tokens**), with multi-token answers and a table
of invented facts that the model can only store in its weights. Built so that accuracy can
rank allocation methods (issue #16). Every number below was measured by
`python -m tools.facts_vlm.build` (the command under "Rebuild") **before any allocation
method was compared on this model**; `card.json` holds them all.

## Properties the stick must have

| property | target | measured | |
|---|---|---|---|
| uniform GPTQ g128, 4 bits | loss ≤ 1 point | {loss[4]:+.2f} pp lost | {_verdict(loss[4] <= 1.0)} |
| uniform GPTQ g128, 3 bits | loss 1–5 points | {loss[3]:+.2f} pp lost | {_verdict(1.0 <= loss[3] <= 5.0)} |
| uniform GPTQ g128, 2 bits | loss ≥ 10 points | {loss[2]:+.2f} pp lost | {_verdict(loss[2] >= 10.0)} |
| knowledge lives in the experts | memorized families | `color`, `city`, `code` of {len(scenes.FACTS):,} invented entities: fp32 {pct(fp["knowledge"])}, 2-bit {pct(q[2]["knowledge"])} | — |
| vision dominates | ≥ 20× vision tokens per multimodal sample | {ev["ratio_mean"]:.1f}× on average (min {ev["ratio_min"]:.1f}×) in `eval.npz`, {cal["ratio_mean"]:.1f}× in `calib.npz` | {_verdict(ev["ratio_min"] >= 20)} |
| mostly background | ≥ 80% of vision tokens | ≥ {100 * ev["background_min"]:.2f}% of every image's patches (≤ 4 digits of 4 patches) | {_verdict(ev["background_min"] >= 0.8)} |
| calibration mostly multimodal | most samples | {100 * cal["multimodal_share"]:.1f}% of `calib.npz` | — |
| multi-token answers | where they fit | `where` (`r c end`), `list` (`d … end`), `code` (`d d end`) | — |
| training on 2 cores | ≤ 60 min | {float(train.get("train_seconds", 0)) / 60:.1f} min ({train.get("steps")} steps, {train.get("torch_threads")} threads) | {_verdict(float(train.get("train_seconds", 1e9)) <= 3600)} |
| ONNX file | ≤ 50 MB | {doc["onnx_mib"]:.1f} MiB | {_verdict(doc["onnx_mib"] * 2**20 <= 50e6)} |
{comp_line}

## Architecture

digits-vlm's (`tools/digits_vlm/model.py`): a ViT encoder ({cfg["vision_layers"]} blocks,
width {cfg["vision_dim"]}) over 8×8 patches of a {cfg["image_size"]}×{cfg["image_size"]} image,
a projector, and a decoder of {cfg["num_layers"]} layers (width {cfg["hidden"]}, {cfg["num_heads"]}
heads) whose FFNs are {cfg["num_experts"]} routed SwiGLU experts (intermediate
{cfg["intermediate"]}, top-{cfg["top_k"]}), stored stacked as transformers' `batched_mm` exports.
Vocabulary {cfg["vocab_size"]} words. Parameters: {counts["total"]:,}, of which
**{counts["experts"]:,} in experts ({100 * counts["experts"] / counts["total"]:.1f}%)**.
`model.onnx` {doc["onnx_mib"]:.1f} MiB; onnxruntime matches PyTorch within
{doc["ort_vs_torch_max_abs"]:.1e} (max abs, logits).

## Data

- **Images**: 1–{scenes.MAX_DIGITS} scanned digits (scikit-learn's `load_digits`; disjoint
  train / calibration / evaluation pools) in an 8×8 grid of 16×16 cells on a noisy 128×128
  canvas; a digit covers 4 of the 256 patches.
- **Multimodal families**: `count`, `sum`, `max`, `present`, `left` (is the a left of the
  b), `where` (row and column of a digit), `list` (the digits in reading order). They need
  the fine detail of a few patches: which digit, where, how many, relations.
- **Text families**: computed (`arith`, `compare`) and memorized (`color`, `city`, `code` of
  one of {len(scenes.FACTS):,} entities named by two syllables, e.g. `ka ron`; the table is fixed by
  `tools/facts_vlm/scenes.FACT_SEED` and cannot be derived from the question).
- **Evaluation mix**: `eval.npz` has {doc["eval_per_family"]} samples of each family and
  {KNOWLEDGE_WEIGHT}× that of each knowledge family, so that knowledge is about half of the
  overall accuracy, as in the benchmarks LLMs are judged by (fixed before training).
- **Answers** of `where`, `list`, `code` are several tokens; a sample is right when every
  token is (teacher-forced, which for a greedy decoder is the same as generating them), and
  the answer NLL is per answer token (docs/data-format.md).

| set | samples | multimodal | vision tokens / mm sample | text tokens / mm sample | text tokens / text sample |
|---|---|---|---|---|---|
| `calib.npz` | {cal["samples"]} | {100 * cal["multimodal_share"]:.1f}% | {cal["vision_per_sample"]:.0f} | {cal["text_per_sample_mm"]:.1f} | {cal["text_per_sample_text_only"]:.1f} |
| `eval.npz` | {ev["samples"]} | {100 * ev["multimodal_share"]:.1f}% | {ev["vision_per_sample"]:.0f} | {ev["text_per_sample_mm"]:.1f} | {ev["text_per_sample_text_only"]:.1f} |

## Accuracy: fp32 and uniform GPTQ (group 128)

Overall fp32: **{pct(fp["overall"]["accuracy"])}** [{pct(fp["overall"]["accuracy_ci95"][0])}, {pct(fp["overall"]["accuracy_ci95"][1])}]
(multimodal {pct(fp["multimodal"]["accuracy"])}, text-only {pct(fp["text_only"]["accuracy"])},
knowledge {pct(fp["knowledge"])}); onnxruntime, {fp["samples"]} samples in {fp["eval_seconds"]:.0f} s.

| uniform bits | overall | Δ to fp32, pp [95% paired bootstrap] | target loss | | multimodal | text-only | knowledge | answer NLL |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows_q)}

(calibration `calib.npz`, GPTQ on every expert at one width; simulated quantization in
modec's executor; fp32 answer NLL {fp["overall"]["answer_nll"]:.4f}.)

| family | kind | answer | samples | fp32 [Wilson 95%] | fp32 answer NLL | 4-bit | 3-bit | 2-bit |
|---|---|---|---|---|---|---|---|---|
{fam_rows}

Knowledge by the entity's popularity in training (quarters of the 1,024 ranks, most
mentioned first; `eval.npz` names entities uniformly):

| | most mentioned | second | third | least mentioned |
|---|---|---|---|---|
{quarter_rows}

## Modality specialization

Per expert, the share of its routed (token, slot) selections on `calib.npz` that are text
tokens, in % (PyTorch routing, top-{cfg["top_k"]}). Text is {100 * mix:.1f}% of all routed
tokens; {text_heavy} of {share.size} experts take more than twice that share, {vision_only}
take less than a quarter of it (nearly vision-only).

| layer | {" | ".join(f"e{e}" for e in range(nexp))} |
|---|{"---|" * nexp}
{spec_rows}

![text share per expert](specialization.png)

## Training

{train.get("steps")} steps of AdamW (lr {train.get("lr")}, batch {train.get("batch")}, seed
{train.get("seed")}), {train.get("torch_threads")} torch threads: {float(train.get("train_seconds", 0)) / 60:.1f} min on this
machine's 2 cores. {_mix_sentence(facts_train.MIX)} multimodal dialogues (3 questions about one
image), the others text dialogues (5 questions); every answer token is supervised. Knowledge
questions in training name the entity of popularity rank r (over a permutation fixed by the
fact seed) with probability ∝ r^-{scenes.ZIPF:g}, as pretraining text mentions a long tail of
entities: the rarest is mentioned {scenes.POPULARITY.max() / scenes.POPULARITY.min():.0f}× less often than the most popular.
Calibration and evaluation name entities uniformly. A training-only
head predicts the digit under each patch from the encoder (as digits-vlm). Final
validation accuracy on calibration-pool digits: {100 * val.get("val_acc", float("nan")):.1f}%.
With 2 threads the run is reproducible on this machine, not across CPUs.

## Design history

No allocation method had been compared on any of these builds when it was measured.

1. **First build** (commit d1fff2f): 256 entities mentioned uniformly, every second batch
   multimodal, 4,000 steps (50.7 min, 2 threads), 250 evaluation samples per family
   (knowledge a quarter of them). fp32 80.37% overall, knowledge 100%; uniform GPTQ lost
   0.00, 0.53 and 1.77 points at 4, 3 and 2 bits, knowledge 98.40% at 2 bits: every fact
   memorized with a wide margin, the image families (most of its evaluation set) moving
   within a few points either way.
2. **Second design**: the table grown to 1,024 entities mentioned uniformly, the first
   build's schedule. Stopped after 2,500 of its 4,000 steps with the knowledge families still
   at chance on the validation set (color 15%, city 12%, code 0%).
3. **Third design**: 512 entities, training mentions ∝ r^-0.6, the first build's schedule
   (4,000 steps; 1 thread, 109 min on a shared machine). fp32 79.2%, knowledge 100%; uniform
   GPTQ changed overall accuracy by +0.03, −0.13 [−0.57, +0.30] and −1.13 [−1.93, −0.33]
   points at 4, 3 and 2 bits; knowledge 93.9% at 2 bits (by popularity quarter 96.3%, 94.0%,
   92.5%, 92.6%, most mentioned first): the long tail felt 2 bits, the image families did
   not.
4. **This build** takes what those showed: 1,024 entities with the long-tailed mentions (so
   that the tail's facts are held with thin margins), three text batches for each
   multimodal one (a text batch took a fifth of a multimodal one's time at one thread, 0.44
   against 2.3 s, and the facts need the presentations the second design lacked), and
   knowledge as half of the evaluation set
   (the image families barely move under quantization in every build). Its image families
   had a quarter of the training batches instead of half: multimodal {pct(fp["multimodal"]["accuracy"])} in fp32
   against the first build's 66.34%.

## Rebuild

```bash
python -m tools.facts_vlm.build --out examples/facts-vlm
```

(trains from scratch; `--weights build/facts-vlm/model.pt` reuses a checkpoint). Then

```bash
modec eval examples/facts-vlm/model.onnx --data examples/facts-vlm/eval.npz
```
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/facts-vlm"))
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument(
        "--no-compile-timing", action="store_true", help="skip timing a full modec compile"
    )
    ap.add_argument("--eval-per-family", type=int, default=EVAL_PER_FAMILY,
                    help="evaluation samples per family (fewer: a quick check of the build)")  # fmt: skip
    ap.add_argument("--card-only", action="store_true",
                    help="re-render README.md from the measured card.json; measure nothing")  # fmt: skip
    args = ap.parse_args()
    out: Path = args.out
    if args.card_only:
        (out / "README.md").write_text(card(json.loads((out / "card.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    weights = args.weights
    if weights is None:
        facts_train.run(Path("build/facts-vlm"))
        weights = Path("build/facts-vlm/model.pt")
    log_path = weights.parent / "train_log.json"
    train_log = json.loads(log_path.read_text()) if log_path.exists() else {}
    if log_path.exists():
        shutil.copyfile(log_path, out / "train_log.json")
    model = load_trained(weights)
    export(model, out / "model.onnx", form="stacked", exporter="dynamo", task=scenes,
           name="facts-vlm")  # fmt: skip
    ort_diff = check_against_torch(model, out / "model.onnx", task=scenes)
    build_sets(out, args.eval_per_family)
    prompt_files.write(out, scenes)
    doc = measure(out, model, train_log, ort_diff, not args.no_compile_timing)
    (out / "card.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    text = card(doc)
    (out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
