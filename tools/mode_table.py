"""The accuracy table of MODE against the baselines on the bundled example.

    python -m tools.mode_table --out docs/results.md [--seeds 0,1,2] [--budgets 3.0,2.5,2.25]

For each calibration seed it builds a calibration set (128 samples from the calibration digit
pool, mixed like real calibration data), runs the analysis passes once (routing statistics
and sensitivities), then allocates and quantizes with every method at every budget (same ILP,
same GPTQ, only the importance signal changes) and evaluates the simulated-quantization model
on ``eval.npz``. Writes the table (mean ± std over seeds) to ``--out``, the raw rows to
``<out>.json`` and a plot of accuracy against budget (2.0-4.0, MODE and the baselines) to
``docs/results_budget.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modec import data
from modec.evaluate import evaluate
from modec.executor import Executor
from modec.frontend import OrtRunner
from modec.method.sensitivity import kl_divergence, log_softmax
from modec.pipelines import CompileOptions
from modec.sweep import analyze, quantize
from tools.digits_vlm import build_data, scenes

METHODS = ["mode", "uniform", "mc-moe", "veq-me", "mode-no-key", "mode-no-sens",
           "mode-sens-only", "mode-redundant"]  # fmt: skip
SPLITS = ("overall", "multimodal", "text_only")


class Recorder:
    """Wraps a batch runner and keeps the answer-position logits of every call, in order."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.last: list[np.ndarray] = []

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = np.asarray(self.run(feeds))
        self.last.append(out[:, -1, :].astype(np.float64))
        return out

    def logits(self) -> np.ndarray:
        return np.concatenate(self.last)


def calibration_set(path: Path, seed: int) -> Path:
    pools = scenes.digit_pools(seed=0)
    samples = scenes.make_split(pools["calib"], build_data.CALIB_COUNTS, seed=1000 + seed)
    build_data.write_split(path, samples)
    return path


def run(model: str, eval_path: str, seeds: list[int], budgets: list[float],
        curve: list[float], methods: list[str], bits: tuple[int, ...] = (2, 3, 4),
        ) -> list[dict[str, Any]]:  # fmt: skip
    ds = data.load(eval_path)
    rows: list[dict[str, Any]] = []
    ref = Recorder(OrtRunner(model))
    fp32 = evaluate(ref, ds)
    ref_logp = log_softmax(ref.logits())
    rows.append({"method": "fp32", "budget": 32.0, "seed": -1, "kl": 0.0,
                 **{k: getattr(fp32, k).accuracy for k in SPLITS}})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            calib = calibration_set(Path(tmp) / f"calib{seed}.npz", seed)
            t0 = time.perf_counter()
            an = analyze(model, str(calib), CompileOptions(seed=seed, bits=bits))
            print(f"seed {seed}: analysis {time.perf_counter() - t0:.1f} s", flush=True)
            wanted = {(m, b) for m in methods for b in budgets} | {("mode", b) for b in curve}
            for method, budget in sorted(wanted):
                if method == "uniform" and float(budget) != int(budget):
                    continue
                t0 = time.perf_counter()
                sim = quantize(an, method, budget)
                ex = Executor(sim.model, intra_op_threads=2)
                rec = Recorder(lambda feeds, ex=ex: ex.run(feeds).outputs[ex.output_names[0]])
                res = evaluate(rec, ds)
                kl = float(kl_divergence(ref_logp, rec.logits()).mean())
                row = {"method": method, "budget": budget, "seed": seed, "kl": kl,
                       "average_bits": sim.allocation.average,
                       **{k: getattr(res, k).accuracy for k in SPLITS}}  # fmt: skip
                rows.append(row)
                print(f"  {method:>15} @ {budget:.2f}: overall {100 * row['overall']:.2f}% "
                      f"KL {kl:.2e} ({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], budgets: list[float], methods: list[str]) -> str:
    fp = next(r for r in rows if r["method"] == "fp32")
    with_kl = all("kl" in r for r in rows)
    kl_head = " KL to fp32 (×1e-3) |" if with_kl else ""
    head = "| method | budget | overall | multimodal | text-only | rel. to fp32 (overall) |"
    lines = [head + kl_head,
             "|---|---|---|---|---|---|" + ("---|" if with_kl else ""),
             f"| fp32 | 32 | {100 * fp['overall']:.2f} | {100 * fp['multimodal']:.2f} | "
             f"{100 * fp['text_only']:.2f} | — |" + (" 0 |" if with_kl else "")]  # fmt: skip
    for b in budgets:
        for m in methods:
            sel = [r for r in rows if r["method"] == m and r["budget"] == b]
            if not sel:
                continue
            cells = []
            for k in SPLITS:
                v = np.array([100 * r[k] for r in sel])
                cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
            rel = 100 * (np.mean([r["overall"] for r in sel]) - fp["overall"]) / fp["overall"]
            kl = ""
            if with_kl:
                kls = np.array([1e3 * r["kl"] for r in sel])
                kl = f" {kls.mean():.2f} ± {kls.std():.2f} |"
            lines.append(f"| {m} | {b:g} | {' | '.join(cells)} | {rel:+.2f}% |{kl}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fp = next(r for r in rows if r["method"] == "fp32")
    ax.axhline(100 * fp["overall"], color="k", ls="--", label="fp32")
    for m in sorted({r["method"] for r in rows} - {"fp32"}):
        budgets = sorted({r["budget"] for r in rows if r["method"] == m})
        if len(budgets) < 3:
            continue
        means = [np.mean([100 * r["overall"] for r in rows
                          if r["method"] == m and r["budget"] == b]) for b in budgets]  # fmt: skip
        ax.plot(budgets, means, marker="o", label=m)
    ax.set_xlabel("average expert bits (budget)")
    ax.set_ylabel("overall accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="examples/digits-vlm/model.onnx")
    ap.add_argument("--eval", default="examples/digits-vlm/eval.npz")
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="3.0,2.5,2.25")
    ap.add_argument("--curve", default="2.0,2.5,3.0,3.5,4.0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default="2,3,4", help="candidate widths")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    curve = [float(b) for b in args.curve.split(",") if b]
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    bits = tuple(int(b) for b in args.bits.split(","))
    rows = run(args.model, args.eval, seeds, budgets, curve, methods, bits)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    png = args.out.with_name(f"{args.out.stem}_budget.png")
    curves = [
        m
        for m in {r["method"] for r in rows}
        if len({r["budget"] for r in rows if r["method"] == m}) >= 3
    ]
    if curves:  # a curve needs at least three budgets
        plot(rows, png)
    image = f"![accuracy against budget]({png.name})\n" if curves else ""
    cmd = "python -m tools.mode_table " + " ".join(
        f"--{k} {v}" for k, v in (("seeds", args.seeds), ("budgets", args.budgets),
                                  ("curve", args.curve), ("methods", args.methods),
                                  ("bits", args.bits), ("out", args.out))
    )  # fmt: skip
    body = f"""# MODE on the bundled example: accuracy at equal size

Made by `{cmd}` in {time.perf_counter() - t0:.0f} s on 2 CPU cores. Mean ± std over
calibration seeds {args.seeds} (each a fresh 128-sample calibration set); accuracies in %
on `examples/digits-vlm/eval.npz`, simulated quantization (dequantized weights, modec's
executor). Candidate widths {args.bits}; group size 128; GPTQ for every method.

{table(rows, budgets, methods)}

{image}"""
    # Hand-written analysis below the generated table survives a re-run.
    marker = "\n## Findings"
    if args.out.exists() and marker in (old := args.out.read_text()):
        body += marker + old.split(marker, 1)[1]
    args.out.write_text(body)
    print(body)


if __name__ == "__main__":
    main()
