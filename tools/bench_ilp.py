"""Benchmark the MODE bit-allocation ILP at paper scale.

Synthetic costs for L layers x E experts x the candidate widths: per expert a log-normal
importance times a random cumulative product in [0.3, 0.9] per extra width, so the cost
decreases with bits as sensitivities do. Times the per-layer allocation (the MODE setting,
all layers) and the global one (one budget over all experts), median of `--repeats` runs.

    python tools/bench_ilp.py                       # print the table
    python tools/bench_ilp.py --write docs/performance_ilp.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from modec.numerics.ilp import allocate_bits_global, allocate_bits_per_layer

TARGET_PER_LAYER_S = 2.0


def synthetic_costs(layers: int, experts: int, widths: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.lognormal(0.0, 1.0, (experts, 1))
        * rng.uniform(0.3, 0.9, (experts, widths)).cumprod(axis=1)
        for _ in range(layers)
    ]


def _median_time(fn: object, repeats: int) -> tuple[float, float, float, object]:
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", type=Path, help="write the table as markdown to this file")
    args = p.parse_args(argv)

    costs = synthetic_costs(args.layers, args.experts, len(args.bits), args.seed)
    allocate_bits_per_layer(costs[:1], args.bits, args.budgets[0])  # load CBC once

    rows = []
    for k in args.budgets:
        med, lo, hi, res = _median_time(
            lambda k=k: allocate_bits_per_layer(costs, args.bits, k), args.repeats
        )
        obj = sum(a.objective for a in res)  # type: ignore[attr-defined]
        rows.append(("per-layer", k, med, lo, hi, obj, f"{1e3 * med / args.layers:.1f}"))
        med, lo, hi, res = _median_time(
            lambda k=k: allocate_bits_global(costs, args.bits, k), args.repeats
        )
        rows.append(("global", k, med, lo, hi, res.objective, "-"))  # type: ignore[attr-defined]

    head = (
        "| variant | budget (avg bits) | median s | min s | max s | objective | median per layer |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for v, k, med, lo, hi, obj, per_ms in rows:
        per_col = f"{per_ms} ms" if per_ms != "-" else "-"
        lines.append(f"| {v} | {k:g} | {med:.3f} | {lo:.3f} | {hi:.3f} | {obj:.4f} | {per_col} |")
    table = "\n".join(lines)
    print(table)
    worst = max(med for v, _, med, *_ in rows if v == "per-layer")
    verdict = "meets" if worst <= TARGET_PER_LAYER_S else "MISSES"
    summary = (
        f"Per-layer allocation of all {args.layers} layers: worst median {worst:.3f} s, "
        f"{verdict} the {TARGET_PER_LAYER_S:g} s target."
    )
    print(summary)

    if args.write:
        cmd = "python tools/bench_ilp.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        doc = f"""# Bit-allocation ILP performance

Written by `tools/bench_ilp.py`. Command:

    {cmd.strip()}

Problem: {args.layers} layers x {args.experts} experts x widths {args.bits} (MODE paper
scale), synthetic costs decreasing in bits (seed {args.seed}). "per-layer" solves one ILP
per layer with Σ b·x = ⌊n·k⌋ (the paper) and times all {args.layers} solves together;
"global" solves one ILP over all {args.layers * args.experts} experts. Times are wall
clock for model build + CBC solve + readback, median of {args.repeats} runs, CBC
single-threaded (threads=1, seed 0, gap 0: proven optimal), after one warm-up solve that
loads the CBC library (~0.2 s, paid once per process).

Machine: {platform.machine()}, Python {platform.python_version()}, 2 cores shared with
other jobs (1-min load average {os.getloadavg()[0]:.1f} when the run ended; expect ±30%).

{table}

{summary}

Notes:
- About half of a per-layer solve is CBC, the rest python-mip model building; cuts and
  preprocessing are off by default (`SolverOptions.cuts/preprocess`), which measured ~35%
  faster on this problem with the same optima.
- The objective handed to CBC is rescaled to max |cost| = 1e6: at max |cost| = 1 CBC
  reported "optimal" on some layers while an exact DP found allocations up to 8e-5 better
  (tests/numerics/test_ilp.py::test_paper_sized_layers_equal_dp guards this).
- The global variant is one ~{args.layers * args.experts * len(args.bits)}-variable MIP;
  it is not part of the 2 s target.
"""
        args.write.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
