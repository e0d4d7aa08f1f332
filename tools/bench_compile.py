"""Compile-time benchmark on the bundled example (issue targets: ≤ 5 min, ≤ 5 s, ≤ 2 s).

    python -m tools.bench_compile [--runs 3]

Measures, medians over ``--runs``:

1. a full ``modec compile`` up to quantized weights (calibration, sensitivity, ILP, GPTQ;
   no lowering, no cache), in-process;
2. re-solving for a new budget with cached statistics: with the analysis (routing statistics
   and sensitivities) kept, allocate-bits alone, and allocate-bits + GPTQ;
3. the same re-solve through the CLI path, a second ``compile_model`` whose sensitivities come
   from the disk cache (loading and calibration statistics included);
4. the paper-scale ILP (48 layers × 128 experts × 3 widths) is `tools/bench_ilp.py`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from modec.passes.allocate_bits import AllocateBitsPass

from modec.driver import compile_model
from modec.pipeline import Pipeline
from modec.pipelines import CompileOptions
from modec.sweep import analyze, quantize

MODEL = "examples/digits-vlm/model.onnx"
CALIB = "examples/digits-vlm/calib.npz"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = CompileOptions(target="none")
        cold = [
            timed(functools.partial(compile_model, MODEL, CALIB, Path(tmp) / f"cold{i}", base))
            for i in range(args.runs)
        ]
        rows.append(("full compile to quantized weights (no cache)", cold))
        an = analyze(MODEL, CALIB, base)
        alloc_only = []
        for _ in range(max(5, args.runs)):
            pipe = Pipeline([AllocateBitsPass(budget=2.5)])
            alloc_only.append(timed(functools.partial(pipe.run, an.model, an.ctx.fork())))
        rows.append(("re-solve: allocate-bits at a new budget (statistics in memory)", alloc_only))
        requant = [timed(lambda: quantize(an, "mode", 2.5)) for _ in range(max(5, args.runs))]
        rows.append(("re-solve: allocate-bits + GPTQ at a new budget (in memory)", requant))
        cached = replace(base, cache_dir=str(Path(tmp) / "cache"))
        compile_model(MODEL, CALIB, Path(tmp) / "fill", cached)  # fills the cache
        warm = [
            timed(
                functools.partial(
                    compile_model, MODEL, CALIB, Path(tmp) / f"warm{i}", replace(cached, budget=2.5)
                )
            )
            for i in range(args.runs)
        ]
        rows.append(
            (
                "second compile at a new budget, statistics and sensitivities from the disk cache",
                warm,
            )
        )
    print("| step | median s | runs |")
    print("|---|---|---|")
    for name, xs in rows:
        print(f"| {name} | {statistics.median(xs):.2f} | {len(xs)} |")


if __name__ == "__main__":
    main()
