"""The routing sort of the MoE lowering: one small TIR kernel per (experts, top-k).

It orders the ``T·k`` (token, slot) pairs of a layer by expert *rank* (width group first,
see `modec.lowering.moe_plan`), so that every width group's grouped kernel reads and writes
one contiguous range of rows of a shared sorted buffer.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["sort_primfunc"]


def sort_primfunc(
    num_experts: int, top_k: int, index_dtype: str = "int64", gpu: bool = False
) -> tirx.PrimFunc:
    """The bookkeeping kernel: stable counting sort of (token, slot) pairs by expert rank.

    Arguments (destination-passing): ``experts [T, k]`` (``index_dtype``), ``rank [E]``
    int64; outputs ``tok [T·k]``, ``eid [T·k]``, ``inv [T·k]``, ``offsets [E + 1]``, all
    int64 (see step 2 of `modec.lowering.moe`). Serial: O(T·k + E), negligible next to the
    kernels on a CPU. An out-of-range expert index is clamped (a wrong answer, never a
    crash).

    With ``gpu`` the same serial code runs as one CUDA thread (one block of one thread, the
    counters in registers/local memory): correct and deterministic, but a GPU thread walks
    the T·k pairs far slower than a CPU core, so this is the first thing to parallelise
    (a block-wide histogram and scan) once a GPU is there to measure it.
    """
    e_count, k = num_experts, top_k
    scope = "local" if gpu else "global"

    def launch(tag: str) -> Any:
        return T.thread_binding(1, thread=tag) if gpu else T.serial(1)

    @T.prim_func(private=True, s_tir=False)
    def moe_sort(
        var_experts: T.handle,
        rank: T.Buffer((e_count,), "int64"),  # type: ignore[valid-type]
        var_tok: T.handle,
        var_eid: T.handle,
        var_inv: T.handle,
        offsets: T.Buffer((e_count + 1,), "int64"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        experts = T.match_buffer(var_experts, (t, k), index_dtype)
        tok = T.match_buffer(var_tok, (t * k,), "int64")
        eid = T.match_buffer(var_eid, (t * k,), "int64")
        inv = T.match_buffer(var_inv, (t * k,), "int64")
        for _bx in launch("blockIdx.x"):
            for _tx in launch("threadIdx.x"):
                cursor = T.alloc_buffer((e_count,), "int64", scope=scope)
                for e in T.serial(e_count):
                    cursor[e] = T.int64(0)
                for i in T.serial(t):
                    for j in T.serial(k):
                        ex = T.max(T.min(T.Cast("int64", experts[i, j]), e_count - 1), 0)
                        cursor[rank[ex]] = cursor[rank[ex]] + T.int64(1)
                offsets[0] = T.int64(0)
                for r in T.serial(e_count):
                    offsets[r + 1] = offsets[r] + cursor[r]
                    cursor[r] = offsets[r]
                for i in T.serial(t):
                    for j in T.serial(k):
                        ex = T.max(T.min(T.Cast("int64", experts[i, j]), e_count - 1), 0)
                        pos = cursor[rank[ex]]
                        tok[pos] = i
                        eid[pos] = ex
                        inv[i * k + j] = pos
                        cursor[rank[ex]] = pos + T.int64(1)

    return moe_sort
