"""The routing sort kernels against numpy's stable argsort.

The block-parallel CUDA kernel is checked here with its threads run one after another on
the CPU (`modec.lowering.moe_sort` says why that is the same computation); its CUDA form is
checked for the barriers that make it so. On a GPU, tools/gpu_check.py runs it for real.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tvm

from modec.lowering.moe_sort import sort_primfunc, sort_threads


def _build(f: Any, target: Any = "llvm") -> Any:
    mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target)


def _check(ex: Any, e_count: int, k: int, tokens: int, rng: np.random.Generator) -> None:
    # Some indices out of range on both sides: the kernel clamps them.
    experts = rng.integers(-1, e_count + 2, size=(tokens, k)).astype(np.int64)
    rank = rng.permutation(e_count).astype(np.int64)
    outs = [np.full(tokens * k, -7, np.int64) for _ in range(3)] + [np.full(e_count + 1, -7)]
    args = [tvm.runtime.tensor(a) for a in [experts, rank, *outs]]
    ex["main"](*args)
    tok, eid, inv, offsets = (a.numpy() for a in args[2:])
    flat = np.clip(experts.ravel(), 0, e_count - 1)
    order = np.argsort(rank[flat], kind="stable")
    np.testing.assert_array_equal(tok, order // k)
    np.testing.assert_array_equal(eid, flat[order])
    np.testing.assert_array_equal(inv[order], np.arange(tokens * k))
    counts = np.bincount(rank[flat], minlength=e_count)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))


@pytest.mark.parametrize(
    "e_count,k,threads",
    [(4, 2, None), (128, 8, None), (5, 3, 8), (130, 4, 64), (3, 1, 1), (8, 2, 2), (60, 6, 16)],
)
def test_parallel_sort_equals_stable_argsort(e_count: int, k: int, threads: int | None) -> None:
    """Every thread count, ranks padded or not, chunks empty, partial or full."""
    ex = _build(sort_primfunc(e_count, k, parallel=True, threads=threads))
    rng = np.random.default_rng(e_count * 31 + k)
    for tokens in (0, 1, 3, 7, 64, 513):
        _check(ex, e_count, k, tokens, rng)


def test_serial_sort_equals_stable_argsort() -> None:
    ex = _build(sort_primfunc(6, 2))
    rng = np.random.default_rng(0)
    for tokens in (0, 1, 9, 100):
        _check(ex, 6, 2, tokens, rng)


def test_sort_threads() -> None:
    """Count rows within 32 KiB; past what one block can stage, the serial kernel."""
    assert sort_threads(128) == 64 and sort_threads(256) == 32 and sort_threads(8) == 64
    for e in (1, 60, 128, 384, 2048, 4000):
        nt = sort_threads(e)
        assert nt >= 1 and nt & (nt - 1) == 0 and nt * nt * -(-e // nt) * 4 <= 32 * 1024
    assert sort_threads(5000) == 0
    with pytest.raises(ValueError, match="power of two"):
        sort_primfunc(8, 2, parallel=True, threads=3)


def test_parallel_sort_cuda_source() -> None:
    """The GPU picks the parallel kernel: one block of 64 threads for 128 experts, counts in
    shared memory, barriers between the phases and none inside the per-pair loops."""
    from modec.kernels.target import CUDA_SM90, resolve_target

    tgt = resolve_target(CUDA_SM90)
    with tgt:
        ex = _build(sort_primfunc(128, 8, gpu=True), tgt)
    src = ex.mod.imports[0].inspect_source()
    kernel = src[src.index("main_kernel(") :]
    body = kernel[kernel.index("{") :]
    assert "__launch_bounds__(64)" in kernel and "__shared__" in body
    # (1)|(2), (2)|(2'), 6 scan steps (one barrier in the loop), scan|(3), inside (3) where
    # TVM reuses the scan's memory for the starts, (3)|(4).
    assert body.count("__syncthreads()") == 6
    pair_loops = [i for i in range(len(body)) if body.startswith("for (int64_t i", i)]
    assert len(pair_loops) == 2
    for start in pair_loops:
        loop = body[start : body.index("\n  }\n", start)]
        assert "__syncthreads" not in loop
