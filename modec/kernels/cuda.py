"""CUDA variants of the kernels (fp16 activations, fp32 accumulation), target sm_90.

Dense dequant-matmul (`dense_compute` + `schedule_dense`, TVM schedule primitives only):
one block per 16-row block of W (times a tile of `M_TILE` rows of X when M is not 1),
threadIdx.x = the 16 lanes, threadIdx.y = KT threads splitting K at 32-wide k-blocks; each
thread loads the `bits` words of its lane per k-block (a warp reads whole 64-byte rows of
`n16k32`), x is staged as fp32 in shared memory for the GEMV, and the KT partial sums meet
in TVM's cross-thread reduction. Grouped MoE (`grouped_primfunc`, hand-written TIR): one
block per (sorted token row, 16-row block) that starts a tile of its expert, same thread
layout; no thread loops over experts.

What was verified where: every variant builds and nvcc compiles it (bits 2/3/4/8, groups
64/128, N=37 K=200, 768x2048, 2048x768, 4096x4096, 4096x14336; no register spills in the
`-Xptxas -v` report of the shapes looked at); the dense kernel's TE definition, unscheduled,
matches the numpy reference on the CPU (tests/kernels/test_cuda.py). The numerics of the
scheduled CUDA kernels and their speed are checked only on a GPU (the `gpu` tests and the
GPU check script); none was available where they were written.

`compile_fatbin` compiles a module's generated source the way a CUDA artifact's export does
(`modec.kernels.cuda_aot`). For the kernels built to run in this process
(`modec.kernels.api`), TVM 0.27 compiles through NVRTC by default; NVRTC is absent here, so
`nvcc_compile_mode` selects nvcc through TVM's `TVM_CUDA_COMPILE_MODE` switch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from modec.kernels._decode import centered, code_expr
from modec.kernels.dequant_matmul import packed_placeholders
from modec.numerics.packing import BLOCK, LANES, padded_k, padded_n
from modec.numerics.schemes import QuantScheme

logger = logging.getLogger(__name__)


def nvcc_available() -> bool:
    """Whether an nvcc binary is on PATH (or in CUDA_HOME/bin)."""
    if shutil.which("nvcc"):
        return True
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(home and os.path.exists(os.path.join(home, "bin", "nvcc")))


@contextlib.contextmanager
def nvcc_compile_mode() -> Iterator[None]:
    """Make TVM's CUDA compile callback use nvcc (fatbin) instead of NVRTC, then restore."""
    key = "TVM_CUDA_COMPILE_MODE"
    old = os.environ.get(key)
    os.environ[key] = "nvcc"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


#: Output rows per row block (the `n16k32` lanes): threadIdx.x.
LANES_X = LANES
#: Target number of 32-wide k-blocks per thread; threadIdx.y splits K into `_k_threads` parts.
KBLOCKS_PER_THREAD = 4
#: Largest threadIdx.y extent (16 x 32 = 512 threads per block).
MAX_K_THREADS = 32
#: Rows of X per block in the dense GEMM (symbolic M) and tokens per block in the grouped
#: kernel's multi-token path: each decoded weight serves `M_TILE` rows from registers.
M_TILE = 4
#: Bytes of shared memory for the staged fp32 activations (static shared memory <= 48 KiB).
SHARED_X_BYTES = 40 * 1024
#: Unroll the per-thread k-block loop up to this many iterations (loads hoisted by nvcc).
MAX_UNROLL = 8


def _k_threads(kb: int) -> int:
    """threadIdx.y extent: about `KBLOCKS_PER_THREAD` k-blocks per thread, a power of 2 in
    [4, `MAX_K_THREADS`] (>= `M_TILE`, which the grouped kernel's final reduction needs)."""
    want = -(-kb // KBLOCKS_PER_THREAD)
    kt = 4
    while kt < want and kt < MAX_K_THREADS:
        kt *= 2
    return kt


def dense_compute(scheme: QuantScheme, n: int, k: int, m: Any, m_tile: int) -> list[te.Tensor]:
    """The CUDA dequant-matmul as TE (what `schedule_dense` schedules).

    Same numerics as `dequant_matmul._compute` up to fp32 summation order: per 32-wide
    k-block ``b`` of row ``r``, ``part = Σ_j x[b·32 + j]·(q - z)`` (exact ``q - z``), and
    ``acc = Σ_b part · scale[group of b]`` (the scale applied per k-block rather than per
    group, so that threads can split K at k-block granularity). Rows of X are padded to
    `m_tile` (the last row read again) so the GEMM's row tiles need no predicate.
    """
    bits, gs = scheme.bits, scheme.group_size
    np_, kp = padded_n(n), padded_k(k, scheme)
    kb, kblocks = kp // BLOCK, gs // BLOCK
    x, codes, scale, zero = packed_placeholders(scheme, n, k, m, "float16")
    m_pad = m if m_tile == 1 else tirx.floordiv(m + (m_tile - 1), m_tile) * m_tile

    def xval(i: Any, kk: Any) -> Any:
        if m_tile != 1:
            i = tirx.min(i, m - 1)
        if kp != k:  # only the last group is short; padded codes meet x = 0
            v = x[i, tirx.min(kk, k - 1)].astype("float32")
            return tirx.if_then_else(kk < k, v, tirx.const(0.0, "float32"))
        return x[i, kk].astype("float32")

    xf = te.compute((m_pad, kp), xval, name="xf")
    j = te.reduce_axis((0, BLOCK), name="j")

    def qz(row: Any, b: Any, jj: Any) -> Any:
        rb, lane = row // LANES, row % LANES
        q = code_expr(lambda w: codes[rb, b, w, lane], jj, bits)
        return centered(q, zero[rb, b // kblocks, lane])

    part = te.compute(
        (m_pad, np_, kb),
        lambda i, row, b: te.sum(xf[i, b * BLOCK + j] * qz(row, b, j), axis=j),
        name="part",
    )
    rb_ = te.reduce_axis((0, kb), name="b")
    acc = te.compute(
        (m_pad, np_),
        lambda i, row: te.sum(
            part[i, row, rb_] * scale[row // LANES, rb_ // kblocks, row % LANES].astype("float32"),
            axis=rb_,
        ),
        name="acc",
    )
    y = te.compute((m, n), lambda i, row: acc[i, row].astype("float16"), name="Y")
    return [x, codes, scale, zero, y]


def dequant_matmul_module(scheme: QuantScheme, n: int, k: int, m: Any) -> tvm.IRModule:
    """The CUDA dequant-matmul IRModule (`main`): GEMV schedule for static M = 1, else the
    row-tiled schedule (symbolic or static M)."""
    m_tile = 1 if (isinstance(m, int) and m == 1) else M_TILE
    func = te.create_prim_func(dense_compute(scheme, n, k, m, m_tile))
    return schedule_dense(func.with_attr("global_symbol", "main"), scheme, n, k, m_tile)


def schedule_dense(
    func: tirx.PrimFunc, scheme: QuantScheme, n: int, k: int, m_tile: int
) -> tvm.IRModule:
    """Schedule `dense_compute`: one block per (row tile of X, 16-row block of W).

    Launch: grid (ceil(M / m_tile) · N_pad/16), block (16, KT). Thread (tx, ty) owns row
    ``16·rb + tx`` and the k-blocks ``ty, ty + KT, ...``; per k-block it loads the `bits`
    words of its lane (a warp's two ty read two whole 64-byte segments of each word row:
    every sector used), its zero and scale, and keeps `m_tile` fp32 partial sums in
    registers. X is staged once per block in shared memory as fp32 (when it fits). The KT
    partial sums of a row are combined by TVM's cross-thread reduction (rfactor over the
    k-thread axis, then the reduction loop bound to threadIdx.y).
    """
    kp = padded_k(k, scheme)
    kb = kp // BLOCK
    kt = _k_threads(kb)
    sch = tvm.s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    i, row, b = sch.get_loops(acc)
    bo, bt = sch.split(b, [None, kt])
    rf = sch.rfactor(bt, factor_axis=0)
    i, row, bo, bt = sch.get_loops(rf)
    rbo, lane = sch.split(row, [None, LANES])
    if m_tile == 1:
        sch.reorder(i, rbo, bt, lane, bo)
        bx = sch.fuse(i, rbo)
        inner: list[Any] = []
    else:
        io, ii = sch.split(i, [None, m_tile])
        sch.reorder(io, rbo, bt, lane, bo, ii)
        # Not fused: io is int64 (symbolic M), rbo int32; the fused index would not be affine.
        sch.bind(io, "blockIdx.x")
        bx = rbo
        inner = [ii]
    sch.bind(bx, "blockIdx.x" if m_tile == 1 else "blockIdx.y")
    sch.bind(bt, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    part = sch.get_sblock("part")
    sch.compute_at(part, bo)
    sch.set_scope(part, 0, "local")
    # The `bits` words of this lane's k-block, loaded once into registers.
    cw = sch.cache_read(part, 1, "local")
    sch.compute_at(cw, bo)
    ploops = sch.get_loops(part)
    if m_tile == 1:
        pj = ploops[-1]
    else:
        pi, pj = ploops[-2:]
        sch.reorder(pj, pi)  # decode once, use for every row of the tile
        sch.unroll(pi)
    sch.unroll(pj)
    sch.decompose_reduction(part, pj)
    xf = sch.get_sblock("xf")
    if m_tile == 1 and kp * 4 <= SHARED_X_BYTES:
        sch.compute_at(xf, bx)
        sch.set_scope(xf, 0, "shared")
        xl = sch.fuse(*sch.get_loops(xf)[-2:]) if m_tile != 1 else sch.get_loops(xf)[-1]
        _, ty, tx = sch.split(xl, [None, kt, LANES])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.compute_inline(xf)
    if inner:
        sch.unroll(inner[0])
    nbo = -(-kb // kt)
    if nbo <= MAX_UNROLL:
        sch.unroll(bo)
    sch.decompose_reduction(rf, bo)
    sch.reverse_compute_at(acc, bx)
    aloops = sch.get_loops(acc)
    if m_tile == 1:
        t, r = aloops[-2:]
    else:
        t, ai, r = aloops[-3:]
        sch.reorder(ai, r, t)
    sch.reorder(r, t)
    sch.bind(r, "threadIdx.x")
    sch.bind(t, "threadIdx.y")
    sch.set_scope(acc, 0, "local")
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, bx)
    sch.bind(sch.get_loops(y)[-1], "threadIdx.x")
    return sch.mod


def grouped_primfunc(
    scheme: QuantScheme, n: int, k: int, num_experts: int, index_dtype: str
) -> tirx.PrimFunc:
    """Grouped MoE kernel for CUDA: one block per (sorted row p, 16-row block of W).

    Launch: grid (T, N_pad/16), block (16, KT) with KT = `_k_threads`. Block (p, rb) first
    finds the expert e with indptr[e] <= p < indptr[e + 1] (each thread tests E / (16·KT)
    experts, one load pair each; the match goes to shared memory). It works only if p starts
    a tile of `M_TILE` rows of its expert (p - indptr[e] divisible by M_TILE), so that each
    token row is computed by exactly one block; every other block exits after the search
    (decode: every routed row starts its own tile, no block is idle). Rows outside
    [indptr[0], indptr[E]) are left as they were. The block stages its cnt <= M_TILE rows of
    X as fp32 in shared memory, then thread (tx, ty) takes row 16·rb + tx and the k-blocks
    ty, ty + KT, ...: per k-block it loads the `bits` words of its lane, the zero and the
    scale, decodes each code once and accumulates it into cnt fp32 partial sums (a separate
    one-token loop when cnt = 1). The KT partial sums of a row are added through shared
    memory by thread (tx, ty = token).

    Numerics: per k-block Σ_j x·(q - z) in fp32 (exact q - z), times the group's scale,
    summed in fp32 and rounded to fp16 once.
    """
    bits, gs = scheme.bits, scheme.group_size
    groups = scheme.num_groups(k)
    np_, kp = padded_n(n), padded_k(k, scheme)
    nb, kb = np_ // LANES, kp // BLOCK
    kblocks = gs // BLOCK
    kt = _k_threads(kb)
    nthreads = LANES * kt
    mt = M_TILE
    nbo = -(-kb // kt)
    e_count = num_experts
    e_iters = -(-e_count // nthreads)
    x_iters = -(-kp // nthreads)
    stage = mt * kp * 4 <= SHARED_X_BYTES
    short_k = kp != k
    xs_shape = (mt, kp) if stage else (1, 1)

    def xglob(x: Any, t: Any, kk: Any) -> Any:
        if short_k:
            v = T.Cast("float32", x[t, tirx.min(kk, k - 1)])
            return tirx.if_then_else(kk < k, v, tirx.const(0.0, "float32"))
        return T.Cast("float32", x[t, kk])

    def xv(x: Any, xs: Any, p: Any, cnt: Any, mi: Any, kk: Any) -> Any:
        if stage:
            return xs[mi, kk]
        return xglob(x, p + tirx.min(mi, cnt - 1), kk)

    def qz(words: Any, zero: Any, e: Any, rb: Any, b: Any, tx: Any, j: Any) -> Any:
        q = code_expr(lambda w: words[w], j, bits)
        return centered(q, zero[e, rb, b // kblocks, tx])

    @T.macro
    def tile(mt_, x, xs, codes, scale, zero, red, acc, part, words, e, rb, ty, tx, p, cnt):  # type: ignore[no-untyped-def]
        for mi in T.unroll(mt_):
            acc[mi] = T.float32(0)
        for bo in T.unroll(nbo):
            if bo * kt + ty < kb:
                for w in T.unroll(bits):
                    words[w] = codes[e, rb, bo * kt + ty, w, tx]
                for mi in T.unroll(mt_):
                    part[mi] = T.float32(0)
                for j in T.unroll(BLOCK):
                    for mi in T.unroll(mt_):
                        part[mi] = part[mi] + xv(
                            x, xs, p, cnt, mi, (bo * kt + ty) * BLOCK + j
                        ) * qz(words, zero, e, rb, bo * kt + ty, tx, j)
                for mi in T.unroll(mt_):
                    acc[mi] = acc[mi] + part[mi] * T.Cast(
                        "float32", scale[e, rb, (bo * kt + ty) // kblocks, tx]
                    )
        for mi in T.unroll(mt_):
            red[ty, mi, tx] = acc[mi]

    @T.prim_func(private=True, s_tir=False)
    def grouped(
        var_x: T.handle,
        indptr: T.Buffer((e_count + 1,), index_dtype),  # type: ignore[valid-type]
        codes: T.Buffer((e_count, nb, kb, bits, LANES), "uint32"),  # type: ignore[valid-type]
        scale: T.Buffer((e_count, nb, groups, LANES), "float16"),  # type: ignore[valid-type]
        zero: T.Buffer((e_count, nb, groups, LANES), "uint8"),  # type: ignore[valid-type]
        var_y: T.handle,
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        x = T.match_buffer(var_x, (t, k), "float16")
        y = T.match_buffer(var_y, (t, n), "float16")
        for p in T.thread_binding(t, thread="blockIdx.x"):
            for rb in T.thread_binding(nb, thread="blockIdx.y"):
                for ty in T.thread_binding(kt, thread="threadIdx.y"):
                    for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                        info = T.alloc_buffer((3,), "int64", scope="shared")
                        mine = T.alloc_buffer((4,), "int64", scope="local")
                        xs = T.alloc_buffer(xs_shape, "float32", scope="shared")
                        red = T.alloc_buffer((kt, mt, LANES), "float32", scope="shared")
                        acc = T.alloc_buffer((mt,), "float32", scope="local")
                        part = T.alloc_buffer((mt,), "float32", scope="local")
                        words = T.alloc_buffer((bits,), "uint32", scope="local")
                        for it in T.serial(e_iters):
                            # Nested, not `and`: TIR's `and` evaluates both sides.
                            if it * nthreads + ty * LANES + tx < e_count:  # noqa: SIM102
                                if T.Cast(
                                    "int64", indptr[it * nthreads + ty * LANES + tx]
                                ) <= p and p < T.Cast(
                                    "int64", indptr[it * nthreads + ty * LANES + tx + 1]
                                ):
                                    info[0] = T.Cast("int64", it * nthreads + ty * LANES + tx)
                                    info[1] = T.Cast(
                                        "int64", indptr[it * nthreads + ty * LANES + tx]
                                    )
                                    info[2] = T.Cast(
                                        "int64", indptr[it * nthreads + ty * LANES + tx + 1]
                                    )
                        # Straight-line phases with block-uniform predicates: TVM puts the
                        # barriers between them (never inside a condition).
                        mine[3] = T.int64(0)  # tokens of this block's tile; 0: idle block
                        if T.Cast("int64", indptr[0]) <= p and p < T.Cast("int64", indptr[e_count]):
                            for c in T.unroll(3):
                                mine[c] = info[c]
                            if (p - mine[1]) % mt == 0:
                                mine[3] = T.min(mine[2] - p, T.int64(mt))
                        if stage and mine[3] > 0:
                            for mi in T.serial(mt):
                                for kq in T.serial(x_iters):
                                    if kq * nthreads + ty * LANES + tx < kp:
                                        xs[mi, kq * nthreads + ty * LANES + tx] = xglob(
                                            x,
                                            p + T.min(T.Cast("int64", mi), mine[3] - 1),
                                            kq * nthreads + ty * LANES + tx,
                                        )
                        if mine[3] == 1:
                            tile(
                                1,
                                x,
                                xs,
                                codes,
                                scale,
                                zero,
                                red,
                                acc,
                                part,
                                words,
                                mine[0],
                                rb,
                                ty,
                                tx,
                                p,
                                mine[3],
                            )
                        elif mine[3] > 1:
                            tile(
                                mt,
                                x,
                                xs,
                                codes,
                                scale,
                                zero,
                                red,
                                acc,
                                part,
                                words,
                                mine[0],
                                rb,
                                ty,
                                tx,
                                p,
                                mine[3],
                            )
                        if T.Cast("int64", ty) < mine[3]:
                            part[0] = T.float32(0)
                            for q in T.serial(kt):
                                part[0] = part[0] + red[q, ty, tx]
                            if rb * LANES + tx < n:
                                y[p + T.Cast("int64", ty), rb * LANES + tx] = T.Cast(
                                    "float16", part[0]
                                )

    return grouped


def cuda_source(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """The CUDA C source TVM generates for a CUDA-scheduled module."""
    with target:
        ex = tvm.compile(mod, target=target)
    return str(ex.mod.imports[0].inspect_source())


def compile_fatbin(mod: tvm.IRModule, target: tvm.target.Target) -> bytes:
    """Generate CUDA source for `mod` and compile it with nvcc into a fatbin for the target's
    arch, as a CUDA artifact's export does (`modec.kernels.cuda_aot.compile_fatbin`).

    Raises:
        BadInputError: nvcc is not installed.
    """
    from modec.kernels.cuda_aot import compile_fatbin as aot_fatbin
    from modec.kernels.cuda_aot import nvcc_gpu_codes, target_archs

    nvcc_gpu_codes()  # the one-line error where nvcc is missing
    return aot_fatbin(cuda_source(mod, target), target_archs(target))
