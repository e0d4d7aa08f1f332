"""VM (modec dense lowering, and TVM's default pipeline) vs onnxruntime latency, same process.

    python -m tools.bench_dense_lowering [--model path.onnx] [--batch 4 --seq 32] [--runs 20]

Without --model it uses the tiny decoder of `modec.lowering.tiny_model`. Reports medians of
--runs timed calls after 2 warm-up calls; both runtimes use their default thread pools.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from tvm import relax

from modec.lowering.dense import compile_module, import_onnx, lower_dense
from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder, tiny_inputs


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--default-pipeline", action="store_true", help="also time unscheduled VM")
    args = ap.parse_args()
    model = onnx.load(args.model) if args.model else build_tiny_decoder()
    cfg = TinyConfig()
    inputs = tiny_inputs(cfg, args.batch, args.seq)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    dm = lower_dense(model)
    ex = compile_module(dm)
    print(f"lower+compile: {time.perf_counter() - t:.2f} s; stats {dm.stats}")
    dev = tvm.cpu()
    params = [tvm.runtime.tensor(p, dev) for p in dm.params.values()]

    def vm_fn(exe: object) -> Callable[[], Any]:
        vm = relax.VirtualMachine(exe, dev)
        f = vm["main"]
        return lambda: f(*(tvm.runtime.tensor(inputs[s.name], dev) for s in dm.inputs), *params)

    ref = sess.run(None, inputs)[0]
    out = vm_fn(ex)().numpy()
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    ort_ms = median_ms(lambda: sess.run(None, inputs), args.runs)
    vm_ms = median_ms(vm_fn(ex), args.runs)
    print(f"B={args.batch} T={args.seq} runs={args.runs} max rel err {err:.2e}")
    print(f"onnxruntime      {ort_ms:8.3f} ms")
    print(f"modec VM         {vm_ms:8.3f} ms  ({vm_ms / ort_ms:.2f}x ORT)")
    if args.default_pipeline:
        ex0 = compile_module(import_onnx(model))
        d_ms = median_ms(vm_fn(ex0), max(5, args.runs // 4))
        print(f"default pipeline {d_ms:8.3f} ms  ({d_ms / ort_ms:.2f}x ORT)")


if __name__ == "__main__":
    main()
