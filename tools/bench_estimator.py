"""Exact sensitivity probes against the O(L) Fisher estimate (``--sensitivity fisher``).

    python -m tools.bench_estimator MODEL.onnx --calib CALIB.npz [--eval EVAL.npz] \
        [--budgets 2.5,3.0] [--samples 32] [--repeats 3] [--threads 1] [--json]

Runs the analysis of the MODE pipeline once (find-moe … select-key-vision), then the
measure-sensitivity pass in both modes (no cache) ``--repeats`` times each, alternating,
and prints:

- per MoE layer and modality, the Spearman rank correlation of the estimate with the exact
  δ_M(e, b) over every (expert, width) of the layer (n/a where the exact δ is constant, e.g.
  δ_vision of the last layer at the answer position, which is 0 by construction), and the
  median over the defined ones;
- the probe-stage wall time of each mode (the pass, fastest of the repeats) and the ratio;
- per budget, the ILP allocation of each mode (MODE's allocate-bits + quantize-experts), how
  many experts got another width, and with ``--eval`` both accuracies and their difference,
  with a paired bootstrap 95% interval over the evaluation samples and McNemar's exact p.

Any ``.onnx`` model with its calibration set works (a Hugging Face directory too). Use
``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank (as Spearman's ρ needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's ρ of two vectors; None when either is constant (ρ undefined)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def correlations(exact: Any, est: Any) -> dict[str, Any]:
    """Per layer and modality ρ over (expert, width), and the median of the defined ones."""
    rows: list[dict[str, Any]] = []
    for name in ("text", "vision"):
        a, b = getattr(exact, f"delta_{name}"), getattr(est, f"delta_{name}")
        for layer in range(a.shape[0]):
            rows.append({"layer": layer, "modality": name, "rho": spearman(a[layer], b[layer]),
                         "sum_ratio": float(b[layer].sum() / a[layer].sum())
                         if a[layer].sum() > 0 else None})  # fmt: skip
    defined = [r["rho"] for r in rows if r["rho"] is not None]
    return {
        "per_layer": rows,
        "median": statistics.median(defined) if defined else None,
        "min": min(defined) if defined else None,
    }


def _measure(model: Any, ctx: Any, mode: str, samples: int) -> tuple[Any, Any, float]:
    from modec.passes.measure_sensitivity import MeasureSensitivityPass

    from modec.facts import Sensitivity
    from modec.pipeline import Pipeline

    fork = ctx.fork()
    p = MeasureSensitivityPass(samples=samples, sensitivity=mode)
    t0 = time.perf_counter()
    Pipeline([p], name=f"sensitivity-{mode}").run(model, fork)
    seconds = time.perf_counter() - t0
    return fork, fork.facts.get(Sensitivity), seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    from modec import data as data_mod
    from modec.driver import load_inputs
    from modec.evaluate import Resampling, compare
    from modec.pipeline import Pipeline
    from modec.pipelines import CompileOptions, analysis_passes
    from modec.sweep import Analysis, evaluate_model, quantize

    bits = tuple(int(b) for b in args.bits.split(","))
    opts = CompileOptions(
        bits=bits, sensitivity_samples=args.samples, seed=args.seed, threads=args.threads,
        cache_dir=None, target="none",
    )  # fmt: skip
    model, ctx = load_inputs(args.model, args.calib, opts)
    t0 = time.perf_counter()
    model, _ = Pipeline(analysis_passes(opts, sensitivity=False), name="analysis").run(model, ctx)
    analysis_seconds = time.perf_counter() - t0
    times: dict[str, list[float]] = {"exact": [], "fisher": []}
    results: dict[str, tuple[Any, Any]] = {}
    for _ in range(args.repeats):
        for mode in ("exact", "fisher"):
            fork, sens, seconds = _measure(model, ctx, mode, args.samples)
            times[mode].append(seconds)
            if mode in results:  # deterministic: every repeat gives the same δ
                prev = results[mode][1]
                assert np.array_equal(prev.delta_text, sens.delta_text)
                assert np.array_equal(prev.delta_vision, sens.delta_vision)
            results[mode] = (fork, sens)
    out: dict[str, Any] = {
        "model": str(args.model), "calib": str(args.calib), "samples": args.samples,
        "bits": list(bits), "seed": args.seed, "threads": args.threads,
        "repeats": args.repeats, "analysis_seconds": analysis_seconds,
        "probe_seconds": {m: min(t) for m, t in times.items()}, "probe_seconds_all": times,
    }  # fmt: skip
    out["speedup"] = out["probe_seconds"]["exact"] / out["probe_seconds"]["fisher"]
    out["spearman"] = correlations(results["exact"][1], results["fisher"][1])
    ds = data_mod.load(args.eval) if args.eval else None
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    allocations = []
    for budget in budgets:
        row: dict[str, Any] = {"budget": budget}
        widths = {}
        evals: dict[str, Any] = {}
        for mode in ("exact", "fisher"):
            fork = results[mode][0]
            an = Analysis(model, fork, [], replace(opts, sensitivity=mode))  # type: ignore[arg-type]
            q = quantize(an, "mode", budget, args.quantizer)
            widths[mode] = np.asarray(q.allocation.widths)
            row[mode] = {
                "average_bits": q.allocation.average,
                "histogram": {str(k): v for k, v in q.allocation.histogram().items()},
            }
            if ds is not None:
                res = evaluate_model(q.model, ds, args.threads)
                evals[mode] = res
                row[mode].update(
                    overall=res.overall.accuracy, multimodal=res.multimodal.accuracy,
                    text_only=res.text_only.accuracy,
                )  # fmt: skip
        row["experts_with_other_width"] = int((widths["exact"] != widths["fisher"]).sum())
        row["experts"] = int(widths["exact"].size)
        if ds is not None:
            row["accuracy_difference_points"] = 100 * (
                row["fisher"]["overall"] - row["exact"]["overall"]
            )
            # `modec eval --compare`'s overall row: paired over the evaluation samples.
            _, d = compare(evals["fisher"], evals["exact"], Resampling()).rows[0]
            row["difference_ci95_points"] = [100 * d.accuracy.low, 100 * d.accuracy.high]
            row["only_correct"] = {"fisher": d.a_only, "exact": d.b_only}
            row["mcnemar_p"] = d.mcnemar_p
        allocations.append(row)
    out["allocations"] = allocations
    return out


def format_text(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']}  calib {r['calib']}  samples {r['samples']}  "
             f"bits {r['bits']}  threads {r['threads']}"]  # fmt: skip
    lines.append("")
    lines.append("Spearman rho of the fisher estimate with the exact delta, per layer:")
    lines.append("  layer  modality  rho     est/exact (sum)")
    for row in r["spearman"]["per_layer"]:
        rho = "n/a" if row["rho"] is None else f"{row['rho']:.3f}"
        ratio = "n/a" if row["sum_ratio"] is None else f"{row['sum_ratio']:.3f}"
        lines.append(f"  {row['layer']:>5}  {row['modality']:<8}  {rho:<6}  {ratio}")
    med, low = r["spearman"]["median"], r["spearman"]["min"]
    lines.append(f"  median {med:.3f}, min {low:.3f}" if med is not None else "  median n/a")
    lines.append("")
    ps = r["probe_seconds"]
    lines.append(
        f"probe stage (fastest of {r['repeats']}): exact {ps['exact']:.2f} s, fisher "
        f"{ps['fisher']:.2f} s, {r['speedup']:.1f}x"
    )
    lines.append("")
    for row in r["allocations"]:
        head = (f"budget {row['budget']}: {row['experts_with_other_width']} of {row['experts']} "
                "experts get another width")  # fmt: skip
        lines.append(head)
        for mode in ("exact", "fisher"):
            m = row[mode]
            acc = (f", overall {100 * m['overall']:.2f}%, multimodal {100 * m['multimodal']:.2f}%,"
                   f" text-only {100 * m['text_only']:.2f}%" if "overall" in m else "")  # fmt: skip
            lines.append(f"  {mode:<6} avg {m['average_bits']:.3f} bits {m['histogram']}{acc}")
        if "accuracy_difference_points" in row:
            lo, hi = row["difference_ci95_points"]
            lines.append(
                f"  fisher - exact: {row['accuracy_difference_points']:+.2f} points (overall), "
                f"paired 95% interval [{lo:+.2f}, {hi:+.2f}]; samples only fisher / only "
                f"exact gets right {row['only_correct']['fisher']} / "
                f"{row['only_correct']['exact']}, McNemar p {row['mcnemar_p']:.3g}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an .onnx model (or a Hugging Face model directory)")
    ap.add_argument("--calib", required=True, help="calibration data (modec dataset .npz)")
    ap.add_argument("--eval", help="evaluation data: accuracy of both allocations")
    ap.add_argument("--budgets", default="2.5,3.0", help="comma-separated average bits")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--samples", type=int, default=32, help="sensitivity samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per mode")
    ap.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.threads == 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    r = run(args)
    r["command"] = "python -m tools.bench_estimator " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv)  # fmt: skip
    sys.stdout.write(json.dumps(r, indent=2) + "\n" if args.json else format_text(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
