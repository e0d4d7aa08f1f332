"""The MODE paper's pilot study (its Fig. 4) on a bundled example.

    python -m tools.pilot_study [--example facts-vlm] [--seeds 0,1,2] [--counts 0,2,4,6,8,12,16]
                                [--out docs/pilot.md]

Every expert starts at 2 bits. In every layer the ``n`` experts that rank highest by a
routing signal are promoted to 3 bits (GPTQ, group 128, the calibration set's Hessians), for
``n`` in ``--counts``; the simulated-quantization model is then evaluated (accuracy, and the
KL to fp32 per answer token). The signals, each normalised within the layer:

- ``global``: frequency over all tokens (what a modality-blind method counts);
- ``text+vision``: ½ f_text + ½ f_vision (all vision tokens);
- ``text+key``: ½ f_text + ½ f_key (the key vision tokens: top 20% by the attention text
  pays them; MODE's choice);
- ``text+redundant``: ½ f_text + ½ f_redundant (the other 80%).

Each calibration seed is a fresh calibration set; the plot shows the mean over seeds with a
band of ± one standard deviation. The paper finds global < text+vision and text+key >
text+vision > text+redundant. Writes ``--out`` (a table), ``<out>.json`` (every row) and
``<out stem>.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modec import data
from modec.evaluate import answer_kl
from modec.facts import KeyVision, RoutingStats
from modec.pipelines import CompileOptions
from modec.sweep import Analysis, analyze, evaluate_model, quantize_widths
from tools.mode_table import calibration_builder, write_keeping_findings

SIGNALS = ("global", "text+vision", "text+key", "text+redundant")


def signal_scores(stats: RoutingStats, key: KeyVision, signal: str) -> list[np.ndarray]:
    """Per layer, each expert's score under ``signal``."""
    out = []
    for layer in range(len(stats.f_text)):
        ft = np.asarray(stats.f_text[layer], dtype=np.float64)
        other = {
            "global": None,
            "text+vision": stats.f_vision[layer],
            "text+key": key.f_key[layer],
            "text+redundant": key.f_redundant[layer],
        }[signal]
        if other is None:
            out.append(np.asarray(stats.f_global[layer], dtype=np.float64))
        else:
            out.append(0.5 * ft + 0.5 * np.asarray(other, dtype=np.float64))
    return out


def promoted_widths(
    scores: list[np.ndarray], n: int, low: int = 2, high: int = 3
) -> list[list[int]]:
    """``high`` bits for the ``n`` top-scoring experts of every layer (ties: lower index
    first), ``low`` for the rest."""
    widths = []
    for s in scores:
        order = np.lexsort((np.arange(len(s)), -s))  # descending score, then index
        w = np.full(len(s), low, dtype=np.int64)
        w[order[:n]] = high
        widths.append(w.tolist())
    return widths


def spliced(an: Analysis, by_width: dict[int, ir.Model], widths: list[list[int]]) -> ir.Model:
    """The simulated-quantization model with expert e of layer l at ``widths[l][e]``, its
    weights taken from ``by_width[w]`` (every expert quantized at w by `quantize_widths`).

    GPTQ quantizes each expert from the full-precision model's Hessians, independently of
    the other experts' widths, so this is the model `quantize_widths(an, widths)` builds
    (tests/test_pilot_study.py checks it) at the price of one GPTQ run per width."""
    from modec.method.quantize import expert_weights
    from modec.moe.canonical import is_moe_node

    model = ir.serde.deserialize_model(ir.serde.serialize_model(an.model))
    sources = {w: [n for n in m.graph if is_moe_node(n)] for w, m in by_width.items()}
    for layer, node in enumerate(n for n in model.graph if is_moe_node(n)):
        w = np.asarray(widths[layer])
        for proj, value in expert_weights(node).items():
            arrays = {}
            for b, src in sources.items():
                t = expert_weights(src[layer])[proj].const_value
                if t is None:
                    raise ValueError(f"layer {layer} {proj}: the {b}-bit model has no weights")
                arrays[b] = t.numpy()
            if not set(w.tolist()) <= set(arrays):
                raise ValueError(f"layer {layer}: widths {sorted(set(w.tolist()))} but models "
                                 f"quantized at {sorted(arrays)}")  # fmt: skip
            out = np.empty_like(next(iter(arrays.values())))
            for b, arr in arrays.items():
                out[w == b] = arr[w == b]
            value.const_value = ir.tensor(out, name=value.name)
    return model


def run(example: str, seeds: list[int], counts: list[int], per_family: int | None
        ) -> list[dict[str, Any]]:  # fmt: skip
    root = Path("examples") / example
    model = root / "model.onnx"
    ds = data.load(root / "eval.npz")
    if per_family:
        assert ds.family is not None
        pick = np.concatenate([np.flatnonzero(ds.family == c)[:per_family]
                               for c in np.unique(ds.family)])  # fmt: skip
        ds = ds.subset(np.sort(pick))
    build_calib = calibration_builder(example)  # tools.mode_table's
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            calib = build_calib(Path(tmp) / f"calib{seed}.npz", seed)
            t0 = time.perf_counter()
            an = analyze(str(model), str(calib), CompileOptions(seed=seed), sensitivity=False)
            print(f"seed {seed}: analysis {time.perf_counter() - t0:.1f} s", flush=True)
            stats, key = an.ctx.facts.get(RoutingStats), an.ctx.facts.get(KeyVision)
            done: dict[tuple[tuple[int, ...], ...], dict[str, Any]] = {}
            ref = evaluate_model(an.model, ds, keep_logprobs=True)  # fp32, same executor
            n_exp = [len(f) for f in stats.f_text]
            by_width = {b: quantize_widths(an, [[b] * e for e in n_exp], f"all-{b}").model
                        for b in (2, 3)}  # fmt: skip
            for signal in SIGNALS:
                scores = signal_scores(stats, key, signal)
                for n in counts:
                    widths = promoted_widths(scores, n)
                    flat = tuple(tuple(w) for w in widths)
                    if flat not in done:  # n = 0 and n = E are the same for every signal
                        t0 = time.perf_counter()
                        res = evaluate_model(spliced(an, by_width, widths), ds,
                                             keep_logprobs=True)  # fmt: skip
                        done[flat] = {
                            "overall": res.overall.accuracy,
                            "multimodal": res.multimodal.accuracy,
                            "text_only": res.text_only.accuracy,
                            "kl": float(answer_kl(ref, res).mean()),
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    row = {"seed": seed, "signal": signal, "promoted": n,
                           "average_bits": float(np.mean([w for lw in widths for w in lw])),
                           "fp32_overall": ref.overall.accuracy, **done[flat]}  # fmt: skip
                    rows.append(row)
                    print(f"  {signal:>15} n={n:2d}: overall {100 * row['overall']:.2f}% "
                          f"KL {row['kl']:.4f} ({row['seconds']} s)", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]], key: str) -> dict[str, dict[int, tuple[float, float]]]:
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for signal in SIGNALS:
        for n in sorted({r["promoted"] for r in rows}):
            v = [r[key] for r in rows if r["signal"] == signal and r["promoted"] == n]
            if v:
                out.setdefault(signal, {})[n] = (float(np.mean(v)), float(np.std(v)))
    return out


def area(rows: list[dict[str, Any]], signal: str, key: str) -> list[float]:
    """Per seed, the mean of ``key`` over the promotion counts strictly between the ends
    (where the signals differ)."""
    counts = sorted({r["promoted"] for r in rows})
    inner = counts[1:-1]
    seeds = sorted({r["seed"] for r in rows})
    return [float(np.mean([r[key] for r in rows if r["seed"] == s and r["signal"] == signal
                           and r["promoted"] in inner])) for s in seeds]  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label, scale in ((axes[0], "overall", "overall accuracy (%)", 100.0),
                                  (axes[1], "kl", "KL to fp32 per answer token", 1.0)):  # fmt: skip
        for signal, pts in summary(rows, key).items():
            ns = sorted(pts)
            m = np.array([pts[n][0] for n in ns]) * scale
            sd = np.array([pts[n][1] for n in ns]) * scale
            ax.plot(ns, m, marker="o", label=signal)
            ax.fill_between(ns, m - sd, m + sd, alpha=0.2)
        ax.set_xlabel("experts promoted to 3 bits per layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    acc, kl = summary(rows, "overall"), summary(rows, "kl")
    counts = sorted({r["promoted"] for r in rows})
    head = "| signal | " + " | ".join(f"n={n}" for n in counts) + " | mean over inner n |"
    lines = [head, "|---|" + "---|" * (len(counts) + 1)]
    for signal in SIGNALS:
        cells = [f"{100 * acc[signal][n][0]:.2f} ± {100 * acc[signal][n][1]:.2f}" for n in counts]
        a = area(rows, signal, "overall")
        lines.append(f"| {signal} | " + " | ".join(cells)
                     + f" | {100 * np.mean(a):.2f} ± {100 * np.std(a):.2f} |")  # fmt: skip
    lines += ["", "KL to fp32 per answer token (mean ± std over seeds):", "", head,
              "|---|" + "---|" * (len(counts) + 1)]  # fmt: skip
    for signal in SIGNALS:
        cells = [f"{kl[signal][n][0]:.4f} ± {kl[signal][n][1]:.4f}" for n in counts]
        a = area(rows, signal, "kl")
        lines.append(f"| {signal} | " + " | ".join(cells)
                     + f" | {np.mean(a):.4f} ± {np.std(a):.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--example", default="facts-vlm", choices=["facts-vlm", "digits-vlm"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--counts", default="0,2,4,6,8,12,16")
    ap.add_argument("--per-family", type=int, default=0,
                    help="evaluate on the first N samples of each family (0: all)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("docs/pilot.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    rows = run(args.example, seeds, counts, args.per_family or None)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    png = args.out.with_name(f"{args.out.stem}.png")
    plot(rows, png)
    cmd = (f"python -m tools.pilot_study --example {args.example} --seeds {args.seeds} "
           f"--counts {args.counts} --per-family {args.per_family} --out {args.out}")  # fmt: skip
    body = f"""# The pilot study (MODE Fig. 4) on {args.example}

Made by `{cmd}` in {time.perf_counter() - t0:.0f} s on 2 CPU cores. Every expert at 2 bits,
then the n top experts of every layer by each signal at 3 bits (GPTQ g128); overall accuracy
in % (mean ± std over calibration seeds {args.seeds}); "mean over inner n" averages the
counts where the signals differ (not 0 and not all).

{table(rows)}

![accuracy and KL against experts promoted]({png.name})
"""
    write_keeping_findings(args.out, body)
    print(body)


if __name__ == "__main__":
    main()
