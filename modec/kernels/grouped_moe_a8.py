"""The grouped MoE matmul with int8 activations (``--expert-act-bits 8``), CPU.

Two PrimFuncs per layer shape:

- `quant_primfunc` quantizes the rows of an expert input per group of K
  (`modec.numerics.activations`: ``d = max|x| / 127``, ``q = rint(x / d)``) into int8 codes
  ``XQ [T, K_pad]``, steps ``D [T, G]`` and code sums ``XS [T, G]``;
- `primfunc` multiplies them by the packed weights of E experts of one width, as
  `modec.kernels.grouped_moe` does with float activations (same arguments but X, same
  ``indptr`` ranges, same layout ``n16k32``); `dense_primfunc` by one weight
  (``--dense-act-bits 8``: a quantized dense matmul, `modec.kernels.dequant_matmul`'s
  arguments but X), every row of XQ against it:

      Y[t, n] = Σ_g scale[n, g] · D[t, g] · (Σ_k code[n, k] · XQ[t, k] − zero[n, g] · XS[t, g])

The inner products are integers, computed exactly with AVX-512 VNNI (``vpdpbusd``: 64
unsigned-code x signed-activation byte products per instruction, summed in 32-bit lanes).
The codes are unpacked from the bitstream in place with AVX-512 VBMI (``vpmultishiftqb``
picks the 4 codes of a lane into its 4 bytes; a 4-code group that straddles two words is
first funnel-shifted out of them) and one AND: 3 instructions per 64 weights, where the
float kernel spends 3 per 16 (mask, convert, FMA). Each group's integer sum is then scaled
in float32. Tokens are taken ``MT`` at a time (each unpacked vector serves MT tokens); an
expert with fewer than MT tokens (decode) takes them one at a time. Both paths compute the
same integers and the same epilogue, so a token's row does not depend on how many tokens
its expert got.

Needs a CPU with AVX-512 VNNI and VBMI (`supports`); `check_target` says so in one line.

PrimFunc arguments of the matmul, in this order (destination-passing):

======= ========================================= =========================================
name    shape                                     dtype
======= ========================================= =========================================
XQ      [T, K_pad]                                int8
D       [T, groups]                               float32
XS      [T, groups]                               float32
indptr  [E + 1]                                   int64
codes   [E, N_pad/16, K_pad/32, bits, 16]          uint32
scale   [E, N_pad/16, groups, 16]                 float16
zero    [E, N_pad/16, groups, 16]                 uint8
Y       [T, N]                                    float32
======= ========================================= =========================================

`dense_primfunc` has no ``indptr`` and no E axis (codes [N_pad/16, K_pad/32, bits, 16], ...).
"""

from __future__ import annotations

import functools
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from modec.errors import BadInputError
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.numerics.activations import QMAX
from modec.numerics.packing import BLOCK, LANES, padded_k, padded_n
from modec.numerics.schemes import QuantScheme

#: The instruction sets the kernel is written in (LLVM feature names).
FEATURES = ("avx512vnni", "avx512vbmi")
#: Row blocks of 16 per thread tile.
NI = 4
#: Tokens per register tile when an expert has at least that many.
MT = 4
#: Row blocks per register tile of MT tokens (the tile loops over a thread's NI blocks).
#: One: MT x 16 lanes of int32 sums and as many float32 accumulators stay in registers.
#: Four, the thread tile, took 1.4-1.6x longer in the grouped kernel at a 256-token
#: prefill (docs/performance.md); the one-token path keeps NI blocks per step.
NT = 1
#: Row blocks per thread tile of the dense kernel (`dense_primfunc`) for fewer than MT rows
#: (decode), up to K = DECODE_NI_MAX_K; NI above. One block streams its codes faster at
#: K = 2048 (a 4-bit one-token matmul from memory, 2 threads, ad-hoc: N = 4,096 1.13-1.18x,
#: N = 8,192 1.13-1.32x; N = 512 level), four at K = 4096 (N = 2,048: 1.06-1.12x). The
#: grouped kernel's decode tasks are shaped otherwise (`ROW_NI`).
DECODE_NI = 1
DECODE_NI_MAX_K = 2048
#: Row blocks per parallel task of the grouped kernel when it has no more routed rows than
#: experts (decode). The tasks then go routed row by routed row, each an expert's first:
#: all its rows against ROW_NI of its row blocks, read one after another, so that a thread
#: streams whole experts. Before, every task took NI row blocks of every active expert, read
#: together: 8 of 128 experts from memory, one token, 3-bit, 2 threads, the two kernels
#: alternating (ad-hoc): down (N = 2,048, K = 768) 1.33x, gate/up (768 x 2,048) 1.12x; at 8
#: tokens 1.33x and 1.04x. Eight blocks gained 3-6% more, but leave a 16-core machine's
#: threads 3 tasks each at N = 768.
ROW_NI = 4
#: Codes per 32-bit lane of one `vpdpbusd`.
QUAD = 4


def supports(target: TargetLike) -> bool:
    """Whether the kernels can be built for ``target`` (a CPU with VNNI and VBMI)."""
    tgt = resolve_target(target)
    if is_cuda(tgt):
        return False
    return bool(tvm.target.codegen.target_has_features(list(FEATURES), tgt))


def check_target(target: TargetLike, flag: str = "--expert-act-bits 8") -> None:
    """Refuse a target without the kernels' instructions, naming the fix (``flag``: the
    option that asked for them)."""
    tgt = resolve_target(target)
    if is_cuda(tgt):
        raise BadInputError(f"{flag} is for CPU targets (int8 VNNI kernels); drop it for CUDA")
    if not supports(tgt):
        raise BadInputError(
            f"{flag} needs a CPU with AVX-512 VNNI and VBMI; target "
            f"{tgt.attrs.get('mcpu', str(tgt))} lacks one or both, drop the flag"
        )


@functools.lru_cache(maxsize=64)
def quant_primfunc(k: int, group_size: int) -> tirx.PrimFunc:
    """(X [T, K] float32) -> (XQ int8 [T, K_pad], D [T, G], XS [T, G]) in place of its last three
    arguments; see `modec.numerics.activations.quantize_rows`, which it matches exactly. In
    vectors of 16 where K is a whole number of groups of a multiple of 16, else per value."""
    if k % group_size == 0 and group_size % LANES == 0:
        return _quant_vectors(k, group_size)
    return _quant_values(k, group_size)


def _quant_values(k: int, group_size: int) -> tirx.PrimFunc:
    groups = -(-k // group_size)
    kp = groups * group_size
    short = kp != k

    def xval(x: Any, r: Any, kk: Any) -> Any:
        if short:
            return tirx.if_then_else(kk < k, x[r, tirx.min(kk, k - 1)], tirx.const(0.0, "float32"))
        return x[r, kk]

    def code(v: Any, step: Any) -> Any:
        """rint(v / step) as int8, clamped to ±QMAX; 0 where the group's step is 0."""
        c = tirx.Cast("int32", tirx.nearbyint(v / step))
        c = tirx.max(tirx.min(c, QMAX), -QMAX)
        return tirx.Cast("int8", tirx.if_then_else(step > tirx.const(0.0, "float32"), c, 0))

    # A root block (s_tir): Relax's reshape detection reads one-input PrimFuncs as blocks.
    @T.prim_func(private=True, s_tir=True)
    def quant(var_x: T.handle, var_q: T.handle, var_d: T.handle, var_s: T.handle) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        x = T.match_buffer(var_x, (t, k), "float32")
        q = T.match_buffer(var_q, (t, kp), "int8")
        d = T.match_buffer(var_d, (t, groups), "float32")
        s = T.match_buffer(var_s, (t, groups), "float32")
        with T.sblock("root"):
            for r in T.parallel(t):
                amax = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "int32", scope="local")
                for g in T.serial(groups):
                    amax[0] = T.float32(0)
                    for kk in T.serial(group_size):
                        amax[0] = T.max(amax[0], T.abs(xval(x, r, g * group_size + kk)))
                    d[r, g] = amax[0] / T.float32(QMAX)
                    total[0] = 0
                    for kk in T.serial(group_size):
                        q[r, g * group_size + kk] = code(xval(x, r, g * group_size + kk), d[r, g])
                        total[0] = total[0] + T.Cast("int32", q[r, g * group_size + kk])
                    s[r, g] = T.Cast("float32", total[0])

    return quant


def _quant_vectors(k: int, group_size: int) -> tirx.PrimFunc:
    groups, kp, v = k // group_size, k, LANES

    def vcode(xv: Any, step: Any) -> Any:
        """`code` of LANES values of a group whose step is > 0."""
        c = tirx.Cast(f"int32x{v}", tirx.nearbyint(xv / T.Broadcast(step, v)))
        c = tirx.max(tirx.min(c, T.Broadcast(T.int32(QMAX), v)), T.Broadcast(T.int32(-QMAX), v))
        return tirx.Cast(f"int8x{v}", c)

    # The same, LANES values at a time (K a whole number of groups of a multiple of LANES):
    # max, division and rounding are exact per lane, so the result is the scalar one's.
    @T.prim_func(private=True, s_tir=True)
    def quant_vec(var_x: T.handle, var_q: T.handle, var_d: T.handle, var_s: T.handle) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        x = T.match_buffer(var_x, (t, k), "float32")
        q = T.match_buffer(var_q, (t, kp), "int8")
        d = T.match_buffer(var_d, (t, groups), "float32")
        s = T.match_buffer(var_s, (t, groups), "float32")
        with T.sblock("root"):
            for r in T.parallel(t):
                vmax = T.alloc_buffer((v,), "float32", scope="local")
                vsum = T.alloc_buffer((v,), "int32", scope="local")
                amax = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "int32", scope="local")
                for g in T.serial(groups):
                    vmax[T.Ramp(0, 1, v)] = T.Broadcast(T.float32(0), v)
                    for c in T.serial(group_size // v):
                        vmax[T.Ramp(0, 1, v)] = T.max(
                            vmax[T.Ramp(0, 1, v)], T.abs(x[r, T.Ramp(g * group_size + c * v, 1, v)])
                        )
                    amax[0] = T.float32(0)
                    for lane in T.unroll(v):
                        amax[0] = T.max(amax[0], vmax[lane])
                    d[r, g] = amax[0] / T.float32(QMAX)
                    total[0] = 0
                    if d[r, g] > T.float32(0):
                        vsum[T.Ramp(0, 1, v)] = T.Broadcast(T.int32(0), v)
                        for c in T.serial(group_size // v):
                            q[r, T.Ramp(g * group_size + c * v, 1, v)] = vcode(
                                x[r, T.Ramp(g * group_size + c * v, 1, v)], d[r, g]
                            )
                            vsum[T.Ramp(0, 1, v)] = vsum[T.Ramp(0, 1, v)] + T.Cast(
                                f"int32x{v}", q[r, T.Ramp(g * group_size + c * v, 1, v)]
                            )
                        for lane in T.unroll(v):
                            total[0] = total[0] + vsum[lane]
                    else:
                        for c in T.serial(group_size // v):
                            q[r, T.Ramp(g * group_size + c * v, 1, v)] = T.Broadcast(T.int8(0), v)
                    s[r, g] = T.Cast("float32", total[0])

    return quant_vec


def _select(i: Any, values: list[Any]) -> Any:
    """``values[i]`` for a loop variable ``i`` that unrolling makes constant."""
    out = values[-1]
    for j in range(len(values) - 2, -1, -1):
        out = tirx.Select(i == j, values[j], out)
    return out


def _at(buf: Any, e: Any, *index: Any) -> Any:
    """``buf[e, *index]``, or ``buf[*index]`` for a buffer without the experts' axis (one
    dense weight): the macro below serves both kernels."""
    return buf[(e, *index)] if len(buf.shape) == len(index) + 1 else buf[index]


def _unpacker(bits: int) -> Any:
    """``unpack(codes, e, b, kblk, quad)``: the 4 codes ``4·quad .. 4·quad + 3`` of each lane of
    block ``codes[e, b, kblk]`` (32 codes a lane) in the lane's 4 bytes, as uint32x16."""
    plan = []
    for quad in range(BLOCK // QUAD):
        w, off = divmod(QUAD * quad * bits, 32)
        plan.append((w, off, off + QUAD * bits > 32))

    def control(off: int) -> int:
        # vpmultishiftqb: byte j of a qword takes 8 bits of that qword from bit ctrl[j]; the
        # low dword (even lane) reads its codes at off + i·bits, the odd lane 32 bits higher.
        v = 0
        for i in range(QUAD):
            v |= (off + i * bits) << (8 * i)
            v |= (32 + off + i * bits) << (8 * (QUAD + i))
        return v

    mask = T.Broadcast(T.uint32(((1 << bits) - 1) * 0x01010101), LANES)

    def unpack(codes: Any, e: Any, b: Any, kblk: Any, quad: Any) -> Any:
        def word(w: int) -> Any:
            return _at(codes, e, b, kblk, w, T.Ramp(0, 1, LANES))

        srcs, ctrls = [], []
        for w, off, straddles in plan:
            if straddles:  # the group's bits start in word w and end in word w + 1
                lo = word(w) >> T.Broadcast(T.uint32(off), LANES)
                srcs.append(lo | (word(w + 1) << T.Broadcast(T.uint32(32 - off), LANES)))
                ctrls.append(T.uint64(control(0)))
            else:
                srcs.append(word(w))
                ctrls.append(T.uint64(control(off)))
        ctrl = T.reinterpret("uint8x64", T.Broadcast(_select(quad, ctrls), 8))
        src = T.reinterpret("uint8x64", _select(quad, srcs))
        picked = T.call_llvm_pure_intrin(
            "uint8x64", "llvm.x86.avx512.pmultishift.qb.512", ctrl, src
        )
        return T.reinterpret("uint32x16", picked) & mask

    return unpack


def _dpbusd(acc: Any, codes_u32: Any, x_i32: Any) -> Any:
    """acc (int32x16) + Σ of 4 byte products per lane: unsigned codes x signed activations."""
    return T.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
        T.reinterpret("uint8x64", codes_u32),
        T.reinterpret("int8x64", T.Broadcast(x_i32, LANES)),
    )  # fmt: skip


def _cpu_primfunc(scheme: QuantScheme, n: int, k: int, num_experts: int | None) -> tirx.PrimFunc:
    """The grouped kernel for ``num_experts`` experts, or the dense one for None."""
    bits, gs = scheme.bits, scheme.group_size
    groups = scheme.num_groups(k)
    np_, kp = padded_n(n), padded_k(k, scheme)
    nb, kb = np_ // LANES, kp // BLOCK
    ni = min(NI, nb)
    n_tiles = (nb + ni - 1) // ni
    kblocks = gs // BLOCK
    quads = BLOCK // QUAD
    e_count = num_experts or 1
    nt = NT if ni % NT == 0 else 1  # whole groups of row blocks per thread tile
    one_ni = min(DECODE_NI, nb) if k <= DECODE_NI_MAX_K else ni
    one_tiles = (nb + one_ni - 1) // one_ni
    row_ni = min(ROW_NI, nb)
    row_tiles = (nb + row_ni - 1) // row_ni
    row_nt = NT if row_ni % NT == 0 else 1
    unpack = _unpacker(bits)

    @T.macro
    def tokens(
        mt: int, nt: int, tile: int, tb: Any, e: Any, t0: Any, cnt: Any, acc: Any, isum: Any,
        codes: Any, xq: Any, d: Any, xs: Any, scale: Any, zero: Any, y: Any,
    ) -> None:  # fmt: skip
        # Tokens t0 + tt·mt + mi of expert e (the last one repeated to fill a tile; only the
        # real ones are written) against row blocks tb·tile .. tb·tile + tile - 1, nt at a
        # time: all token tiles against one group of nt row blocks, then the next group.
        for rs, tt in T.grid(tile // nt, (cnt + (mt - 1)) // mt):
            for mi, ri, lane in T.grid(mt, nt, LANES):
                acc[mi, ri * LANES + lane] = T.float32(0)
            for g in T.serial(groups):
                for mi, ri in T.grid(mt, nt):
                    isum[mi, T.Ramp(ri * LANES, 1, LANES)] = T.Broadcast(T.int32(0), LANES)
                for blk in T.serial(kblocks):
                    for quad in T.unroll(quads):
                        for ri in T.unroll(nt):
                            for mi in T.unroll(mt):
                                isum[mi, T.Ramp(ri * LANES, 1, LANES)] = _dpbusd(
                                    isum[mi, T.Ramp(ri * LANES, 1, LANES)],
                                    unpack(
                                        codes,
                                        e,
                                        T.min(tb * tile + rs * nt + ri, nb - 1),
                                        g * kblocks + blk,
                                        quad,
                                    ),
                                    T.reinterpret(
                                        "int32",
                                        xq[
                                            t0 + T.min(tt * mt + mi, cnt - 1),
                                            T.Ramp(
                                                (g * kblocks + blk) * BLOCK + quad * QUAD, 1, QUAD
                                            ),
                                        ],
                                    ),
                                )
                for mi, ri in T.grid(mt, nt):
                    for lane in T.vectorized(LANES):
                        acc[mi, ri * LANES + lane] = acc[mi, ri * LANES + lane] + (
                            T.Cast("float32", isum[mi, ri * LANES + lane])
                            - T.Cast(
                                "float32",
                                _at(zero, e, T.min(tb * tile + rs * nt + ri, nb - 1), g, lane),
                            )
                            * xs[t0 + T.min(tt * mt + mi, cnt - 1), g]
                        ) * (
                            T.Cast(
                                "float32",
                                _at(scale, e, T.min(tb * tile + rs * nt + ri, nb - 1), g, lane),
                            )
                            * d[t0 + T.min(tt * mt + mi, cnt - 1), g]
                        )
            for mi, ri, lane in T.grid(mt, nt, LANES):
                if tt * mt + mi < cnt:  # noqa: SIM102 (TVMScript keeps nested ifs)
                    if (tb * tile + rs * nt + ri) * LANES + lane < n:
                        y[t0 + tt * mt + mi, (tb * tile + rs * nt + ri) * LANES + lane] = acc[
                            mi, ri * LANES + lane
                        ]

    @T.macro
    def span(
        tile: int, tnt: int, one_nt: int, tb: Any, e: Any, t0: Any, cnt: Any, acc: Any,
        isum: Any, codes: Any, xq: Any, d: Any, xs: Any, scale: Any, zero: Any, y: Any,
    ) -> None:  # fmt: skip
        # Rows t0 .. t0 + cnt - 1 against expert e, row blocks tb·tile .. tb·tile + tile - 1:
        # in tiles of MT rows (tnt blocks at a time), or one row at a time below (one_nt
        # blocks at a time).
        if cnt >= MT:
            tokens(MT, tnt, tile, tb, e, t0, cnt, acc, isum, codes, xq, d, xs, scale, zero, y)
        else:
            tokens(1, one_nt, tile, tb, e, t0, cnt, acc, isum, codes, xq, d, xs, scale, zero, y)

    @T.prim_func(private=True, s_tir=False)
    def grouped(
        var_xq: T.handle,
        var_d: T.handle,
        var_xs: T.handle,
        indptr: T.Buffer((e_count + 1,), "int64"),  # type: ignore[valid-type]
        codes: T.Buffer((e_count, nb, kb, bits, LANES), "uint32"),  # type: ignore[valid-type]
        scale: T.Buffer((e_count, nb, groups, LANES), "float16"),  # type: ignore[valid-type]
        zero: T.Buffer((e_count, nb, groups, LANES), "uint8"),  # type: ignore[valid-type]
        var_y: T.handle,
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        xq = T.match_buffer(var_xq, (t, kp), "int8")
        d = T.match_buffer(var_d, (t, groups), "float32")
        xs = T.match_buffer(var_xs, (t, groups), "float32")
        y = T.match_buffer(var_y, (t, n), "float32")
        if t <= e_count:  # few routed rows (decode): rows outer, so a thread streams experts
            owner = T.alloc_buffer((e_count,), "int32")  # the expert of each routed row
            for ex in T.serial(e_count):
                for j in T.serial(indptr[ex + 1] - indptr[ex]):
                    owner[indptr[ex] + j] = T.Cast("int32", ex)
            for task in T.parallel(t * row_tiles):
                acc = T.alloc_buffer((MT, row_nt * LANES), "float32", scope="local")
                isum = T.alloc_buffer((MT, row_nt * LANES), "int32", scope="local")
                r = task // row_tiles
                e = owner[r]
                if indptr[e] == r:  # the expert's first row: all its rows, blocks in turn
                    span(row_ni, row_nt, 1, task % row_tiles, e, r, indptr[e + 1] - r, acc, isum,
                         codes, xq, d, xs, scale, zero, y)  # fmt: skip
        else:
            for tb in T.parallel(n_tiles):
                acc = T.alloc_buffer((MT, ni * LANES), "float32", scope="local")
                isum = T.alloc_buffer((MT, ni * LANES), "int32", scope="local")
                for e in T.serial(e_count):
                    t0 = indptr[e]
                    span(ni, nt, ni, tb, e, t0, indptr[e + 1] - t0, acc, isum, codes, xq, d,
                         xs, scale, zero, y)  # fmt: skip

    @T.prim_func(private=True, s_tir=False)
    def dense(
        var_xq: T.handle,
        var_d: T.handle,
        var_xs: T.handle,
        codes: T.Buffer((nb, kb, bits, LANES), "uint32"),  # type: ignore[valid-type]
        scale: T.Buffer((nb, groups, LANES), "float16"),  # type: ignore[valid-type]
        zero: T.Buffer((nb, groups, LANES), "uint8"),  # type: ignore[valid-type]
        var_y: T.handle,
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        xq = T.match_buffer(var_xq, (t, kp), "int8")
        d = T.match_buffer(var_d, (t, groups), "float32")
        xs = T.match_buffer(var_xs, (t, groups), "float32")
        y = T.match_buffer(var_y, (t, n), "float32")
        if t < MT:  # decode: rows one at a time, `one_ni` row blocks per thread tile
            for tb in T.parallel(one_tiles):
                acc = T.alloc_buffer((1, one_ni * LANES), "float32", scope="local")
                isum = T.alloc_buffer((1, one_ni * LANES), "int32", scope="local")
                tokens(1, one_ni, one_ni, tb, 0, 0, t, acc, isum, codes, xq, d, xs, scale, zero, y)
        else:
            for tb in T.parallel(n_tiles):
                acc = T.alloc_buffer((MT, ni * LANES), "float32", scope="local")
                isum = T.alloc_buffer((MT, ni * LANES), "int32", scope="local")
                span(ni, nt, ni, tb, 0, 0, t, acc, isum, codes, xq, d, xs, scale, zero, y)

    return grouped if num_experts is not None else dense


def primfunc(
    scheme: QuantScheme, n: int, k: int, num_experts: int, target: TargetLike = "llvm"
) -> tvm.IRModule:
    """The int8-activation grouped MoE kernel for `num_experts` experts of one width, as
    IRModule `main` (arguments in the module docstring)."""
    check_target(target)
    func = _cpu_primfunc(scheme, n, k, num_experts)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def dense_primfunc(
    scheme: QuantScheme, n: int, k: int, target: TargetLike = "llvm"
) -> tvm.IRModule:
    """The int8-activation matmul by one packed weight [N, K] (``--dense-act-bits 8``), as
    IRModule `main`: ``Y = X · dequant(W)ᵀ`` for quantized rows X (module docstring)."""
    check_target(target, "--dense-act-bits 8")
    func = _cpu_primfunc(scheme, n, k, None)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
