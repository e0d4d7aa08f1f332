"""The grouped MoE matmul: every expert of one width in one kernel launch.

Tokens arrive sorted by expert; `indptr[e]:indptr[e + 1]` are the rows of X routed to
expert e of the E_w experts that share this width. One kernel per (width, N, K):

    Y[t, :] = X[t, :] · dequant(W[e])ᵀ   for indptr[e] <= t < indptr[e + 1]

The token ranges are data-dependent loop bounds, which TE cannot express, so this kernel is
written as TVMScript with the loop nest spelled out (the hand schedule); the decode
expressions are the same as the dense kernels' (`_decode`). Per thread tile of
`NI` x 16 output rows, each expert's tokens are processed in tiles of `MT` rows with an
MT x NI x 16 register tile (each decoded vector serves MT tokens); an expert with fewer
than `MT` tokens (decode) takes a one-token path with NI_1 x 16 accumulators instead, so
one token does not pay for MT. The one-token path decodes codes in place, like the dense
GEMV (`_decode.code_in_place`): before the tile loop, each of its rows is pre-scaled by
2^-offset and summed per group into a static (E·(MT-1), K) workspace, then every tile
masks and converts codes against it and applies the zero point per group as z·Σx. Rows
outside every range (t >= indptr[E]) are left as they were; a caller that routes every
token never has such rows.

PrimFunc arguments, in this order (destination-passing, for Relax `call_tir`):

======= ========================================= =========================================
name    shape                                     dtype
======= ========================================= =========================================
X       [T, K]                                    float32 (CPU) / float16 (CUDA)
indptr  [E + 1]                                   int64 (or int32, see `primfunc`)
codes   [E, N_pad/16, K_pad/32, bits, 16]          uint32
scale   [E, N_pad/16, groups, 16]                 float16
zero    [E, N_pad/16, groups, 16]                 uint8
Y       [T, N]                                    same as X
======= ========================================= =========================================

T is the symbolic int64 variable `t`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from modec.kernels._decode import centered, code_expr, code_in_place, in_place_shift, pow2_neg
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.numerics.packing import BLOCK, LANES, padded_k, padded_n
from modec.numerics.schemes import QuantScheme

logger = logging.getLogger(__name__)

#: Row blocks of 16 per thread tile on the multi-token path (MT x NI accumulators).
CPU_NI = 2
#: Tokens per register tile on the multi-token path.
CPU_MT = 4
#: Row blocks of 16 on the one-token path (independent FMA chains).
CPU_NI_1 = 4


def _cpu_primfunc(
    scheme: QuantScheme, n: int, k: int, num_experts: int, index_dtype: str
) -> tirx.PrimFunc:
    bits, gs = scheme.bits, scheme.group_size
    groups = scheme.num_groups(k)
    np_, kp = padded_n(n), padded_k(k, scheme)
    nb, kb = np_ // LANES, kp // BLOCK
    ni = min(CPU_NI, nb)
    ni1 = min(CPU_NI_1, nb)
    tile = math.lcm(ni, ni1)  # row blocks per thread: a whole number of tiles of both paths
    n_tiles = (nb + tile - 1) // tile
    mt = CPU_MT
    e_count = num_experts
    kblocks = gs // BLOCK
    short_k = kp != k

    def xval(x: Any, t: Any, kk: Any) -> Any:
        if short_k:
            return tirx.if_then_else(kk < k, x[t, tirx.min(kk, k - 1)], tirx.const(0.0, "float32"))
        return x[t, kk]

    def qz(codes: Any, zero: Any, e: Any, b: Any, g: Any, blk: Any, j: Any, lane: Any) -> Any:
        q = code_expr(lambda w: codes[e, b, g * kblocks + blk, w, lane], j, bits)
        return centered(q, zero[e, b, g, lane])

    def qv(codes: Any, e: Any, b: Any, g: Any, blk: Any, j: Any, lane: Any) -> Any:
        q = code_in_place(lambda w: codes[e, b, g * kblocks + blk, w, lane], j, bits)
        return T.Cast("float32", q)

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
        x = T.match_buffer(var_x, (t, k), "float32")
        y = T.match_buffer(var_y, (t, n), "float32")
        # One-token path inputs, once per call: every expert with fewer than MT tokens has
        # its rows pre-scaled for in-place decoding (xs = x·2^-offset) and its group sums
        # of x (xsum) in slots e·(MT-1) + token, a static (E·(MT-1), K) workspace.
        xs = T.alloc_buffer((e_count * (mt - 1), kp), "float32")
        xsum = T.alloc_buffer((e_count * (mt - 1), groups), "float32")
        for e in T.serial(e_count):
            t0 = T.Cast("int64", indptr[e])
            cnt = T.Cast("int64", indptr[e + 1]) - t0
            if cnt < mt:
                for tt in T.serial(cnt):
                    for g in T.serial(groups):
                        xsum[e * (mt - 1) + tt, g] = T.float32(0)
                        for kk in T.serial(gs):
                            xs[e * (mt - 1) + tt, g * gs + kk] = xval(
                                x, t0 + tt, g * gs + kk
                            ) * pow2_neg(in_place_shift(kk % BLOCK, bits))
                            xsum[e * (mt - 1) + tt, g] = xsum[e * (mt - 1) + tt, g] + xval(
                                x, t0 + tt, g * gs + kk
                            )
        for tb in T.parallel(n_tiles):
            acc = T.alloc_buffer((mt, tile * LANES), "float32", scope="local")
            part = T.alloc_buffer((mt, tile * LANES), "float32", scope="local")
            for e in T.serial(e_count):
                t0 = T.Cast("int64", indptr[e])
                cnt = T.Cast("int64", indptr[e + 1]) - t0
                if cnt >= mt:
                    # Multi-token path: MT tokens x NI row blocks per register tile.
                    for rs in T.serial(tile // ni):
                        for tt in T.serial((cnt + (mt - 1)) // mt):
                            for mi, ri, lane in T.grid(mt, ni, LANES):
                                acc[mi, ri * LANES + lane] = T.float32(0)
                            for g in T.serial(groups):
                                for mi, ri in T.grid(mt, ni):
                                    for lane in T.vectorized(LANES):
                                        part[mi, ri * LANES + lane] = T.float32(0)
                                for blk in T.serial(kblocks):
                                    for j in T.unroll(BLOCK):
                                        for ri in T.unroll(ni):
                                            for mi in T.unroll(mt):
                                                for lane in T.vectorized(LANES):
                                                    part[mi, ri * LANES + lane] = part[
                                                        mi, ri * LANES + lane
                                                    ] + xval(
                                                        x,
                                                        t0 + T.min(tt * mt + mi, cnt - 1),
                                                        g * gs + blk * BLOCK + j,
                                                    ) * qz(
                                                        codes,
                                                        zero,
                                                        e,
                                                        T.min(tb * tile + rs * ni + ri, nb - 1),
                                                        g,
                                                        blk,
                                                        j,
                                                        lane,
                                                    )
                                for mi, ri in T.grid(mt, ni):
                                    for lane in T.vectorized(LANES):
                                        acc[mi, ri * LANES + lane] = acc[
                                            mi, ri * LANES + lane
                                        ] + part[mi, ri * LANES + lane] * T.Cast(
                                            "float32",
                                            scale[
                                                e,
                                                T.min(tb * tile + rs * ni + ri, nb - 1),
                                                g,
                                                lane,
                                            ],
                                        )
                            for mi, ri, lane in T.grid(mt, ni, LANES):
                                if tt * mt + mi < cnt:  # noqa: SIM102 (TVMScript keeps nested ifs)
                                    if (tb * tile + rs * ni + ri) * LANES + lane < n:
                                        y[
                                            t0 + tt * mt + mi,
                                            (tb * tile + rs * ni + ri) * LANES + lane,
                                        ] = acc[mi, ri * LANES + lane]
                else:
                    # One-token path (decode): NI_1 independent accumulators per token; codes
                    # masked in place (`code_in_place`) against the pre-scaled xs, the zero
                    # point applied per group as z·Σx.
                    for rs in T.serial(tile // ni1):
                        for tt in T.serial(cnt):
                            for ri, lane in T.grid(ni1, LANES):
                                acc[0, ri * LANES + lane] = T.float32(0)
                            for g in T.serial(groups):
                                for ri in T.serial(ni1):
                                    for lane in T.vectorized(LANES):
                                        part[0, ri * LANES + lane] = T.float32(0)
                                for blk in T.serial(kblocks):
                                    for j in T.unroll(BLOCK):
                                        for ri in T.unroll(ni1):
                                            for lane in T.vectorized(LANES):
                                                part[0, ri * LANES + lane] = part[
                                                    0, ri * LANES + lane
                                                ] + xs[
                                                    e * (mt - 1) + tt, g * gs + blk * BLOCK + j
                                                ] * qv(
                                                    codes,
                                                    e,
                                                    T.min(tb * tile + rs * ni1 + ri, nb - 1),
                                                    g,
                                                    blk,
                                                    j,
                                                    lane,
                                                )
                                for ri in T.serial(ni1):
                                    for lane in T.vectorized(LANES):
                                        acc[0, ri * LANES + lane] = acc[0, ri * LANES + lane] + (
                                            part[0, ri * LANES + lane]
                                            - T.Cast(
                                                "float32",
                                                zero[
                                                    e,
                                                    T.min(tb * tile + rs * ni1 + ri, nb - 1),
                                                    g,
                                                    lane,
                                                ],
                                            )
                                            * xsum[e * (mt - 1) + tt, g]
                                        ) * T.Cast(
                                            "float32",
                                            scale[
                                                e,
                                                T.min(tb * tile + rs * ni1 + ri, nb - 1),
                                                g,
                                                lane,
                                            ],
                                        )
                            for ri, lane in T.grid(ni1, LANES):
                                if (tb * tile + rs * ni1 + ri) * LANES + lane < n:
                                    y[t0 + tt, (tb * tile + rs * ni1 + ri) * LANES + lane] = acc[
                                        0, ri * LANES + lane
                                    ]

    return grouped


def primfunc(
    scheme: QuantScheme,
    n: int,
    k: int,
    num_experts: int,
    target: TargetLike = "llvm",
    index_dtype: str = "int64",
) -> tvm.IRModule:
    """The grouped MoE kernel for `num_experts` experts of one width, as IRModule `main`.

    Args:
        scheme: width and group size shared by the experts.
        n: output features N of each expert.
        k: reduction length K.
        num_experts: E_w, the experts stacked in `codes`.
        target: "llvm" (fp32 activations) or a CUDA target (fp16 activations).
        index_dtype: dtype of `indptr`, "int64" or "int32".

    Returns:
        IRModule whose `main` takes (X, indptr, codes, scale, zero, Y), see module docstring.
    """
    tgt = resolve_target(target)
    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype must be int32 or int64, got {index_dtype!r}")
    if is_cuda(tgt):
        from modec.kernels.cuda import grouped_primfunc

        func = grouped_primfunc(scheme, n, k, num_experts, index_dtype)
    else:
        func = _cpu_primfunc(scheme, n, k, num_experts, index_dtype)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
