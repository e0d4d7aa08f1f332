"""The routing sort of the MoE lowering: one small TIR kernel per (experts, top-k).

It orders the ``T·k`` (token, slot) pairs of a layer by expert *rank* (width group first,
see `modec.lowering.moe_plan`), so that every width group's grouped kernel reads and writes
one contiguous range of rows of a shared sorted buffer.

Two kernels compute the same stable counting sort:

- `serial`: one pass to count, a scan over the experts, one pass to scatter. O(T·k + E) on
  one core: what a CPU runs.
- `parallel` (CUDA): one block of ``nt`` threads, thread ``i`` owning the i-th contiguous
  chunk of pairs. (1) Each thread counts its chunk per rank in its own registers/local
  memory and publishes the row ``cnt[i, :]``. (2) Thread ``i`` owns ranks
  ``[i·per, (i+1)·per)``: it scans their columns over the threads (an exclusive prefix per
  (thread, rank)) and sums its ranks' totals. (3) A Hillis–Steele scan over the ``nt``
  thread sums (log2 nt steps) gives each thread the start of its ranks; it writes the
  ``offsets`` of its ranks. (4) Each thread walks its chunk again, in order, placing a pair
  of rank r at ``start[r] + cnt[i, r]`` and incrementing. Chunks are in thread order and
  each chunk is walked in order, so the result is the serial kernel's, pair for pair.

The phases touch shared memory only as: a thread writes cells no other thread touches in
the same phase; what it reads was written in an earlier phase. So the kernel is correct
exactly when there is a barrier between phases (TVM's ThreadSync pass puts them where a
phase reads what another wrote; the explicit ones mark the phase ends) and running the
phases' threads one after another computes the same thing. With ``gpu=False`` the parallel
kernel is built that way, the threads as a serial loop and shared memory as scratch, which
is how the tests check it on a CPU.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["sort_primfunc", "sort_threads"]

#: Largest block the parallel sort uses.
MAX_SORT_THREADS = 256
#: Shared memory (bytes) for the per-thread count rows, and for everything the kernel
#: stages (CUDA's static limit is 48 KiB per block).
_COUNT_BYTES, _SHARED_BYTES = 32 * 1024, 48 * 1024


def _threads(extent: int, tag: str, gpu: bool) -> Any:
    """A loop of ``extent`` iterations: bound to CUDA's ``tag`` with ``gpu``, else serial."""
    return T.thread_binding(extent, thread=tag) if gpu else T.serial(extent)


def sort_threads(num_experts: int) -> int:
    """Threads of the parallel sort for ``num_experts`` experts: the largest power of two
    <= 256 whose count rows (``nt × E`` int32, E padded to a multiple of nt) fit in 32 KiB
    and whose shared memory fits in 48 KiB; 0 where even one thread's would not (beyond
    ~4000 experts: the serial kernel then)."""
    nt = MAX_SORT_THREADS
    while nt >= 1:
        padded = nt * -(-num_experts // nt)
        if nt * padded * 4 <= _COUNT_BYTES and 4 * (nt * padded + 2 * padded + 2 * nt) <= (
            _SHARED_BYTES
        ):
            return nt
        nt //= 2
    return 0


def sort_primfunc(
    num_experts: int,
    top_k: int,
    index_dtype: str = "int64",
    gpu: bool = False,
    parallel: bool | None = None,
    threads: int | None = None,
) -> tirx.PrimFunc:
    """The bookkeeping kernel: stable counting sort of (token, slot) pairs by expert rank.

    Arguments (destination-passing): ``experts [T, k]`` (``index_dtype``), ``rank [E]``
    int64; outputs ``tok [T·k]``, ``eid [T·k]``, ``inv [T·k]``, ``offsets [E + 1]``, all
    int64 (see step 2 of `modec.lowering.moe`). An out-of-range expert index is clamped (a
    wrong answer, never a crash).

    ``parallel`` (default: ``gpu`` where `sort_threads` finds a block size) picks the
    block-parallel kernel of the module docstring, with ``threads`` threads (default
    `sort_threads`; a power of two). Its counts are int32: T·k < 2^31 pairs.
    """
    if parallel is None:
        parallel = gpu and sort_threads(num_experts) > 0
    if parallel:
        nt = threads or sort_threads(num_experts)
        if nt < 1 or nt & (nt - 1):
            raise ValueError(f"sort threads must be a power of two >= 1, got {nt}")
        return _parallel(num_experts, top_k, index_dtype, gpu, nt)
    return _serial(num_experts, top_k, index_dtype, gpu)


def _serial(num_experts: int, top_k: int, index_dtype: str, gpu: bool) -> tirx.PrimFunc:
    """One pass to count, one scan, one pass to scatter; with ``gpu`` as one CUDA thread
    (correct, slow: for expert counts the parallel kernel cannot stage)."""
    e_count, k = num_experts, top_k
    scope = "local" if gpu else "global"

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
        for _bx in _threads(1, "blockIdx.x", gpu):
            for _tx in _threads(1, "threadIdx.x", gpu):
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


def _parallel(num_experts: int, top_k: int, index_dtype: str, gpu: bool, nt: int) -> tirx.PrimFunc:
    """The block-parallel kernel (module docstring); ``gpu=False``: its phases run thread
    after thread on a CPU (the tests' check of the algorithm)."""
    e_count, k = num_experts, top_k
    per = -(-e_count // nt)  # ranks per thread
    padded = nt * per  # ranks incl. the padding ones, which count nothing
    rounds = int(math.log2(nt))
    shared = "shared" if gpu else "global"
    local = "local" if gpu else "global"

    def lanes() -> Any:
        return _threads(nt, "threadIdx.x", gpu)

    def expert(experts: Any, p: Any) -> Any:
        """The (clamped) expert of pair p = token·k + slot."""
        return T.max(T.min(T.Cast("int64", experts[p // k, p % k]), e_count - 1), 0)

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
        chunk = (t * k + nt - 1) // nt
        for _bx in _threads(1, "blockIdx.x", gpu):
            cnt = T.alloc_buffer((nt, padded), "int32", scope=shared)
            total = T.alloc_buffer((padded,), "int32", scope=shared)
            start = T.alloc_buffer((padded,), "int32", scope=shared)
            scan = T.alloc_buffer((2, nt), "int32", scope=shared)
            # (1) per-thread counts of its chunk, published as row cnt[tid, :].
            for tid in lanes():
                mine = T.alloc_buffer((padded,), "int32", scope=local)
                for r in T.serial(padded):
                    mine[r] = 0
                for i in T.serial(chunk):
                    if tid * chunk + i < t * k:
                        ex = expert(experts, tid * chunk + i)
                        mine[rank[ex]] = mine[rank[ex]] + 1
                for r in T.serial(padded):
                    cnt[tid, r] = mine[r]
            if gpu:
                T.tvm_storage_sync("shared")
            # (2) column scans of the thread's ranks: cnt[q, r] becomes the count of rank r
            # in the chunks before q; total[r]; scan[0, tid] = the thread's ranks' sum. The
            # column is read whole before it is rewritten (a read-modify-write of shared
            # cells in one loop would make TVM put a barrier in every iteration).
            for tid in lanes():
                col = T.alloc_buffer((per, nt), "int32", scope=local)
                acc = T.alloc_buffer((2,), "int32", scope=local)
                acc[1] = 0
                for j in T.serial(per):
                    acc[0] = 0
                    for q in T.serial(nt):
                        col[j, q] = acc[0]
                        acc[0] = acc[0] + cnt[q, tid * per + j]
                    total[tid * per + j] = acc[0]
                    acc[1] = acc[1] + acc[0]
                scan[0, tid] = acc[1]
                for j in T.serial(per):
                    for q in T.serial(nt):
                        cnt[q, tid * per + j] = col[j, q]
            # (3) inclusive scan of the thread sums, ping-ponging between scan[0] and scan[1].
            for d in T.serial(rounds):
                if gpu:
                    T.tvm_storage_sync("shared")
                for tid in lanes():
                    scan[(d + 1) % 2, tid] = scan[d % 2, tid] + T.if_then_else(
                        tid >= T.shift_left(1, d),
                        scan[d % 2, T.max(tid - T.shift_left(1, d), 0)],
                        0,
                    )
            if gpu:
                T.tvm_storage_sync("shared")
            # ... then each thread's ranks' starts (exclusive) and offsets.
            for tid in lanes():
                run = T.alloc_buffer((1,), "int32", scope=local)
                run[0] = T.if_then_else(tid > 0, scan[rounds % 2, T.max(tid - 1, 0)], 0)
                for j in T.serial(per):
                    start[tid * per + j] = run[0]
                    if tid * per + j < e_count:
                        offsets[tid * per + j] = T.Cast("int64", run[0])
                    run[0] = run[0] + total[tid * per + j]
                if tid == nt - 1:
                    offsets[e_count] = T.Cast("int64", run[0])
            if gpu:
                T.tvm_storage_sync("shared")
            # (4) scatter: the chunk again, in order, from the thread's cursors.
            for tid in lanes():
                cur = T.alloc_buffer((padded,), "int32", scope=local)
                for r in T.serial(padded):
                    cur[r] = cnt[tid, r] + start[r]
                for i in T.serial(chunk):
                    if tid * chunk + i < t * k:
                        ex = expert(experts, tid * chunk + i)
                        pos = T.Cast("int64", cur[rank[ex]])
                        cur[rank[ex]] = cur[rank[ex]] + 1
                        tok[pos] = (tid * chunk + i) // k
                        eid[pos] = ex
                        inv[tid * chunk + i] = pos

    return moe_sort
