"""Weight-only dequant-matmul Y[M, N] = X[M, K] · dequant(W)ᵀ for packed `n16k32` weights.

CPU: one TE compute, two hand-written `tvm.s_tir.Schedule` schedules per (width, N, K)
(CUDA: `modec.kernels.cuda.dense_compute` and `schedule_dense`, see that module):

* GEMV (M = 1, decode): decode-as-you-go. Each thread owns `NI` x 16 output rows; per group
  a 16-lane partial sum per row block accumulates xs[k] * (q·2^off), where the code is
  masked where it sits in its word and converted (`_decode.code_in_place`, exact) and
  xs[k] = x[k]·2^-off is computed once per call; the zero point is applied per group as
  z·Σx, then the group's scale. `NI` independent accumulators hide the FMA latency.
* GEMM (symbolic M, prefill): decode a panel of (q - z) floats [group, NI*16] once per tile of
  `MT` rows of X, then an MT x NI x 16 register tile of FMAs over it.

Numerics: sum_g s_g · Σ_{k∈g} x_k (q_k - z_g) in fp32 (the scale factored out of the group,
(q - z) exact; the GEMV computes the same sum as Σ x_k q_k - z_g Σ x_k), which matches
numpy's x @ ((q - z) · s)ᵀ to ~1e-6 relative.

PrimFunc arguments (destination-passing, for Relax `call_tir`), in this order:

====== ==================================== ==========================================
name   shape                                dtype
====== ==================================== ==========================================
X      [M, K]                               float32 (CPU) / float16 (CUDA)
codes  [N_pad/16, K_pad/32, bits, 16]        uint32
scale  [N_pad/16, groups, 16]               float16
zero   [N_pad/16, groups, 16]               uint8
Y      [M, N]                               same as X
====== ==================================== ==========================================

with N_pad = ceil(N/16)*16, groups = ceil(K/group), K_pad = groups*group; M is a symbolic
int64 variable `m` unless a static M is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tvm
from tvm import te, tirx

from modec.kernels import subroutine
from modec.kernels._decode import centered, code_expr, code_in_place, in_place_shift, pow2_neg
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.numerics.packing import BLOCK, LANES, padded_k, padded_n
from modec.numerics.schemes import QuantScheme

logger = logging.getLogger(__name__)

#: Row blocks of 16 per CPU thread tile (independent FMA chains).
CPU_NI = 4
#: Rows of X per GEMM register tile (MT x NI accumulators of 16 lanes).
CPU_MT = 4
CPU_GEMM_NI = 2
#: GEMV decodes codes in place (mask + convert, the activation pre-scaled by 2^-offset) instead
#: of shift + mask + magic-float subtract: 3 vector ops per 16 weights instead of 4. Measured
#: 1.2x from cache; the GEMM (decode amortised over MT rows) does not gain and keeps the other.
CPU_GEMV_IN_PLACE = True


def packed_placeholders(
    scheme: QuantScheme, n: int, k: int, m: Any, act_dtype: str
) -> tuple[te.Tensor, te.Tensor, te.Tensor, te.Tensor]:
    """The TE placeholders of the kernel's inputs: X [m, K] and the packed weight's codes,
    scale and zero (layout `n16k32`, shapes in the module docstring)."""
    nb, kb = padded_n(n) // LANES, padded_k(k, scheme) // BLOCK
    groups = scheme.num_groups(k)
    x = te.placeholder((m, k), act_dtype, name="X")
    codes = te.placeholder((nb, kb, scheme.bits, LANES), "uint32", name="codes")
    scale = te.placeholder((nb, groups, LANES), "float16", name="scale")
    zero = te.placeholder((nb, groups, LANES), "uint8", name="zero")
    return x, codes, scale, zero


def _compute(
    scheme: QuantScheme,
    n: int,
    k: int,
    m: Any,
    act_dtype: str,
    m_tile: int = 1,
    in_place: bool = False,
    n_blocks_tile: int = 1,
) -> tuple[list[te.Tensor], dict[str, te.Tensor]]:
    """The TE definition shared by every schedule; returns (args, named stages).

    The inner stages run over M rounded up to `m_tile` rows (reading the last row of X again)
    so that the schedule's row tiles need no bounds predicate in the hot loop; only the final
    copy to Y is cut to M rows and N columns.
    """
    bits, gs = scheme.bits, scheme.group_size
    groups = scheme.num_groups(k)
    np_, kp = padded_n(n), padded_k(k, scheme)
    nb = np_ // LANES
    # Rows padded to whole thread tiles of `n_blocks_tile` row blocks: the tail tile re-reads
    # the last row block (index clamped) instead of a bounds predicate in the hot loop, which
    # cost 1.7x on a GEMV whose row blocks were not a multiple of the tile.
    nt = -(-nb // n_blocks_tile) * n_blocks_tile * LANES

    def blk_of(row: Any) -> Any:
        return tirx.min(row // LANES, nb - 1) if nt != np_ else row // LANES

    x, codes, scale, zero = packed_placeholders(scheme, n, k, m, act_dtype)

    m_pad = m if m_tile == 1 else tirx.floordiv(m + (m_tile - 1), m_tile) * m_tile

    def xval(i: Any, kk: Any) -> Any:
        if m_tile != 1:
            i = tirx.min(i, m - 1)
        v = x[i, kk].astype("float32")
        if kp != k:  # only the last group is short; padded codes meet x = 0
            return tirx.if_then_else(kk < k, v, tirx.const(0.0, "float32"))
        return v

    def qz(row: Any, kk: Any) -> Any:
        b, lane = blk_of(row), row % LANES
        blk, j = kk // BLOCK, kk % BLOCK
        q = code_expr(lambda w: codes[b, blk, w, lane], j, bits)
        return centered(q, zero[b, kk // gs, lane])

    rg = te.reduce_axis((0, groups), name="g")
    if not in_place:
        wq = te.compute((kp, nt), lambda kk, row: qz(row, kk), name="qz")
        red = te.reduce_axis((0, gs), name="kk")
        part = te.compute(
            (m_pad, nt, groups),
            lambda i, row, g: te.sum(xval(i, g * gs + red) * wq[g * gs + red, row], axis=red),
            name="part",
        )
        acc = te.compute(
            (m_pad, nt),
            lambda i, row: te.sum(
                part[i, row, rg] * scale[blk_of(row), rg, row % LANES].astype("float32"),
                axis=rg,
            ),
            name="acc",
        )
    else:
        # Σ_k x_k (q_k - z) = Σ_k (x_k 2^-off_k)(q_k 2^off_k) - z Σ_k x_k: the codes are
        # masked in place (no shift) and converted; the zero point meets the group sum of x.
        def qv(row: Any, kk: Any) -> Any:
            b, lane = blk_of(row), row % LANES
            blk, j = kk // BLOCK, kk % BLOCK
            return code_in_place(lambda w: codes[b, blk, w, lane], j, bits).astype("float32")

        xs = te.compute(
            (m_pad, kp),
            lambda i, kk: xval(i, kk) * pow2_neg(in_place_shift(kk % BLOCK, bits)),
            name="xs",
        )
        rx = te.reduce_axis((0, gs), name="kx")
        xsum = te.compute(
            (m_pad, groups), lambda i, g: te.sum(xval(i, g * gs + rx), axis=rx), name="xsum"
        )
        wq = te.compute((kp, nt), lambda kk, row: qv(row, kk), name="qz")
        red = te.reduce_axis((0, gs), name="kk")
        part = te.compute(
            (m_pad, nt, groups),
            lambda i, row, g: te.sum(xs[i, g * gs + red] * wq[g * gs + red, row], axis=red),
            name="part",
        )

        def zpart(i: Any, row: Any, g: Any) -> Any:
            z = zero[blk_of(row), g, row % LANES].astype("float32")
            return (part[i, row, g] - z * xsum[i, g]) * scale[blk_of(row), g, row % LANES].astype(
                "float32"
            )

        acc = te.compute((m_pad, nt), lambda i, row: te.sum(zpart(i, row, rg), axis=rg), name="acc")
    y = te.compute((m, n), lambda i, row: acc[i, row].astype(act_dtype), name="Y")
    return [x, codes, scale, zero, y], {"qz": wq, "part": part, "acc": acc, "Y": y}


def _schedule_cpu_gemv(func: tirx.PrimFunc, ni: int) -> tvm.IRModule:
    """``ni``: row blocks per thread tile (the rows `_compute` padded to)."""
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("qz"))
    acc = sch.get_sblock("acc")
    i, row, g = sch.get_loops(acc)
    ro, ri, lane = sch.split(row, [None, ni, LANES])
    sch.reorder(ro, i, g, ri, lane)
    sch.parallel(ro)
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, i)
    sch.set_scope(acc, 0, "local")
    part = sch.get_sblock("part")
    sch.compute_at(part, g)
    sch.set_scope(part, 0, "local")
    prow, pk = sch.get_loops(part)[-2:]
    pri, plane = sch.split(prow, [ni, LANES])
    pkb, pj = sch.split(pk, [None, BLOCK])
    sch.reorder(pkb, pj, pri, plane)
    sch.unroll(pj)
    sch.unroll(pri)
    sch.vectorize(plane)
    sch.decompose_reduction(part, pkb)
    sch.unroll(ri)
    sch.vectorize(lane)
    sch.decompose_reduction(acc, g)
    yl = sch.get_loops(y)[-1]
    _, yv = sch.split(yl, [None, LANES])
    sch.vectorize(yv)
    return sch.mod


def _schedule_cpu_gemm(func: tirx.PrimFunc, ni: int) -> tvm.IRModule:
    """``ni``: row blocks per thread tile (the rows `_compute` padded to)."""
    sch = tvm.s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    i, row, g = sch.get_loops(acc)
    ro, ri, lane = sch.split(row, [None, ni, LANES])
    io, ii = sch.split(i, [None, CPU_MT])
    sch.reorder(ro, io, g, ii, ri, lane)
    sch.parallel(ro)
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, io)
    sch.set_scope(acc, 0, "local")
    part = sch.get_sblock("part")
    sch.compute_at(part, g)
    sch.set_scope(part, 0, "local")
    # Decode each (q - z) vector once per MT rows of X, straight into an MT x NI register
    # tile: a materialized panel would be a heap workspace per iteration on CPU.
    sch.compute_inline(sch.get_sblock("qz"))
    pi, prow, pk = sch.get_loops(part)[-3:]
    pri, plane = sch.split(prow, [ni, LANES])
    sch.reorder(pk, pi, pri, plane)
    sch.unroll(pi)
    sch.unroll(pri)
    sch.vectorize(plane)
    sch.decompose_reduction(part, pk)
    sch.unroll(ii)
    sch.unroll(ri)
    sch.vectorize(lane)
    sch.decompose_reduction(acc, g)
    yl = sch.get_loops(y)[-1]
    _, yv = sch.split(yl, [None, LANES])
    sch.vectorize(yv)
    return sch.mod


def primfunc(
    scheme: QuantScheme,
    n: int,
    k: int,
    target: TargetLike = "llvm",
    m: int | None = None,
) -> tvm.IRModule:
    """The scheduled dequant-matmul as an IRModule whose PrimFunc `main` is the entry.

    Args:
        scheme: width and group size of the packed weight.
        n: output features N.
        k: reduction length K.
        target: "llvm" (fp32 activations) or a CUDA target (fp16 activations).
        m: static row count (1: the GEMV schedule, more: the GEMM), or None for a symbolic
            `m`. On the CPU the symbolic kernel chooses at run time: `main` calls the GEMV
            subroutine `main_gemv` at m = 1 and the GEMM `main_gemm` otherwise
            (`cpu_dispatch`; compile with ``tir_pipeline=subroutine.TIR_PIPELINE``).

    Returns:
        IRModule whose `main` takes (X, codes, scale, zero, Y) as in the module docstring.
    """
    tgt = resolve_target(target)
    cuda = is_cuda(tgt)
    mdim: Any = m if m is not None else tirx.Var("m", "int64")
    if cuda:
        from modec.kernels import cuda as cuda_kernels

        return cuda_kernels.dequant_matmul_module(scheme, n, k, mdim)
    if m is not None:
        return tvm.IRModule({"main": _cpu_func(scheme, n, k, m)})
    gemv, gemm, dispatch = cpu_dispatch(scheme, n, k)
    mod = tvm.IRModule()
    one, many = tvm.ir.GlobalVar("main_gemv"), tvm.ir.GlobalVar("main_gemm")
    mod[one], mod[many] = gemv, gemm
    mod["main"] = dispatch(one, many).with_attr("global_symbol", "main")
    return mod


def _cpu_func(scheme: QuantScheme, n: int, k: int, m: int | None) -> tirx.PrimFunc:
    """The scheduled CPU kernel: GEMV for m = 1, GEMM for a static m > 1 or symbolic m."""
    mdim: Any = m if m is not None else tirx.Var("m", "int64")
    m_tile = 1 if m == 1 else CPU_MT
    in_place = CPU_GEMV_IN_PLACE and m == 1
    nb = padded_n(n) // LANES
    tile = min(CPU_NI if m == 1 else CPU_GEMM_NI, nb)
    args, _ = _compute(scheme, n, k, mdim, "float32", m_tile, in_place, tile)
    func = te.create_prim_func(args).with_attr("global_symbol", "main")
    mod = _schedule_cpu_gemv(func, tile) if m == 1 else _schedule_cpu_gemm(func, tile)
    return mod["main"]


def cpu_dispatch(
    scheme: QuantScheme, n: int, k: int
) -> tuple[tirx.PrimFunc, tirx.PrimFunc, Callable[[Any, Any], tirx.PrimFunc]]:
    """The CPU kernel for a symbolic row count as (GEMV subroutine, GEMM subroutine, a
    function of their GlobalVars that makes the dispatcher): the GEMV at M = 1, the GEMM
    otherwise (`modec.kernels.subroutine`; build with its ``TIR_PIPELINE``)."""
    gemv = _cpu_func(scheme, n, k, 1)
    gemm = _cpu_func(scheme, n, k, None)
    (m,) = {d for d in gemm.params[0].ty.shape if isinstance(d, tirx.Var)}

    def dispatch(one: Any, many: Any) -> tirx.PrimFunc:
        return subroutine.dispatcher(gemm, one, many)

    return subroutine.as_subroutine(gemv), subroutine.as_subroutine(gemm, [m]), dispatch
