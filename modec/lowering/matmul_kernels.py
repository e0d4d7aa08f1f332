"""Scheduled fp32 matmul PrimFuncs for the CPU, with symbolic dimensions.

One TE compute, one `tvm.s_tir.Schedule` schedule, two forms:

* dense: ``Y[M, N] = X[M, K] · W[K, N]`` (the projections: X flattened to rows);
* batched: ``Y[b, M, N] = A[b, M, K] · B[b, K, N]`` (attention's QKᵀ and PV, batch and heads
  flattened into ``b``).

And one more for attention's scores on keys as stored: ``Y[b, M, N] = A[b, M, K] · B[b, N,
K]ᵀ`` (`matmul_nt_primfunc`), so that the key cache is not transposed at every decode step.

Any of M, N, K (and ``b``) may be symbolic. The reduction runs over an ``MT x (NV*VL)``
register tile (``MT`` rows of X, ``NV`` vectors of ``VL`` fp32 lanes); the tile loops are
padded up to whole tiles and the padded rows/columns read a clamped (valid) index, so the
hot loop carries no bounds predicate; only the final copy into Y is cut to M x N. The
outer tile loops (batch x row tiles x column tiles) are fused and run in parallel.

B may be stored in float16 or bfloat16 (``b_dtype``: a weight kept in its stored dtype):
each vector of VL values is converted to fp32 in registers as it is loaded, so the kernel
reads half the bytes and no fp32 copy of the weight exists.

PrimFunc arguments (destination-passing, for Relax `call_tir`): ``(A, B, Y)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import tvm
from tvm import te, tirx

#: Rows of X per register tile.
MT = 4
#: fp32 lanes per vector (AVX-512).
VL = 16
#: Largest number of VL-vectors per tile row (MT x NV accumulators: 16 zmm registers).
MAX_NV = 4


def _ceil_to(x: Any, q: int) -> Any:
    if isinstance(x, int):
        return -(-x // q) * q
    return tirx.floordiv(x + (q - 1), q) * q


def _padded(x: Any, tile: int) -> tuple[Any, Callable[[Any], Any]]:
    """An extent padded up to whole tiles, and the index map that clamps a padded index to
    the last valid one (the identity where no padding is needed): the hot loop then carries
    no bounds predicate."""
    clamp = not (isinstance(x, int) and x % tile == 0)

    def index(i: Any) -> Any:
        return tirx.min(i, x - 1) if clamp else i

    return _ceil_to(x, tile), index


def _nv_for(n: int | None) -> int:
    if n is None:
        return 2
    vecs = -(-n // VL)
    return max(1, min(MAX_NV, vecs))


@functools.lru_cache(maxsize=256)
def matmul_primfunc(
    batched: bool, m: int | None, n: int | None, k: int | None, dtype: str = "float32",
    b_dtype: str | None = None, prefix: bool = False,
) -> tirx.PrimFunc:  # fmt: skip
    """The scheduled matmul PrimFunc for one combination of static / symbolic sizes.

    Args:
        batched: False for ``X[M, K] · W[K, N]``, True for ``A[b, M, K] · B[b, K, N]``
            (``b`` always symbolic).
        m: static row count, or None for a symbolic ``m``.
        n: static column count, or None for a symbolic ``n``.
        k: static reduction length, or None for a symbolic ``k``.
        dtype: element type of A and Y (the accumulation is in the same type).
        b_dtype: element type of B when it differs (a weight stored in ``float16`` or
            ``bfloat16``): each vector of B is converted to ``dtype`` as it is loaded into
            registers. None: ``dtype``.
        prefix: (batched only) B holds ``C >= K`` rows, ``B[b, C, N]``, of which the first K
            are read: the values of a preallocated KV cache, read in place (C symbolic).

    Returns:
        A scheduled PrimFunc (attribute ``global_symbol`` unset; the caller names it).
    """
    if prefix and not batched:
        raise ValueError("matmul_primfunc: reading a prefix of B is for the batched form only")
    mm: Any = m if m is not None else tirx.Var("m", "int64")
    nn: Any = n if n is not None else tirx.Var("n", "int64")
    kk: Any = k if k is not None else tirx.Var("k", "int64")
    nv = _nv_for(n)
    m_pad, row = _padded(mm, MT)
    n_pad, col = _padded(nn, nv * VL)
    wt = b_dtype or dtype

    def conv(x: Any) -> Any:  # float32 B: the expression as before, no cast node
        return x if wt == dtype else x.astype(dtype)

    red = te.reduce_axis((0, kk), name="r")
    if batched:
        bb = tirx.Var("b", "int64")
        a = te.placeholder((bb, mm, kk), dtype, name="A")
        w = te.placeholder((bb, _rows(kk, prefix), nn), wt, name="B")
        acc = te.compute(
            (bb, m_pad, n_pad),
            lambda b, i, j: te.sum(a[b, row(i), red] * conv(w[b, red, col(j)]), axis=red),
            name="acc",
        )
        y = te.compute((bb, mm, nn), lambda b, i, j: acc[b, i, j], name="Y")
    else:
        a = te.placeholder((mm, kk), dtype, name="A")
        w = te.placeholder((kk, nn), wt, name="B")
        acc = te.compute(
            (m_pad, n_pad),
            lambda i, j: te.sum(a[row(i), red] * conv(w[red, col(j)]), axis=red),
            name="acc",
        )
        y = te.compute((mm, nn), lambda i, j: acc[i, j], name="Y")
    func = te.create_prim_func([a, w, y])
    return _schedule(func, batched, nv)


def _schedule(func: tirx.PrimFunc, batched: bool, nv: int) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    i, j, r = loops[-3:]
    io, ii = sch.split(i, [None, MT])
    jo, ji, jv = sch.split(j, [None, nv, VL])
    outer = [loops[0], io, jo] if batched else [io, jo]
    sch.reorder(*outer, r, ii, ji, jv)
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, jo)
    sch.parallel(sch.fuse(*outer))
    sch.set_scope(acc, 0, "local")
    sch.unroll(ii)
    sch.unroll(ji)
    sch.vectorize(jv)
    sch.decompose_reduction(acc, r)
    ylo = sch.get_loops(y)
    if len(ylo) > 1:  # Y's own loops below the fused tile loop (none for a static 1 x 1 Y)
        _, yv = sch.split(ylo[-1], [None, VL])
        sch.vectorize(yv)
    return sch.mod["main"]


#: Rows of B (keys) per register tile of `matmul_nt_primfunc`.
NT_ROWS = 4
#: Lanes of its accumulators: each score ends with a horizontal sum of them, so fewer lanes
#: (more multiply-adds, a shorter sum) were faster on a head dim of 128: one thread, 8 query
#: rows x 4,001 keys x 4 heads, 4.0 ms at 16 lanes, 3.4 ms at 8, 2.0 ms at 4.
NT_LANES = 4


def nt_supported(k: int | None) -> bool:
    """Whether `matmul_nt_primfunc` takes a reduction length ``k`` (static and even)."""
    return k is not None and k >= 2 and k % 2 == 0


def _rows(extent: Any, prefix: bool) -> Any:
    """The row extent of a B operand: ``extent``, or with ``prefix`` a symbolic ``C`` (a
    preallocated cache buffer of which the first ``extent`` rows are read)."""
    return tirx.Var("c", "int64") if prefix else extent


def _nt_operands(
    who: str, m: int | None, n: int | None, k: int, dtype: str, tiles: tuple[int, int],
    prefix: bool,
) -> tuple[int, tuple[Any, Any, Any], tuple[Any, Any, Any], Any, Any, Any]:  # fmt: skip
    """What both ``A · Bᵀ`` kernels start from: the lanes L of the reduction along K, the
    row and key extents (each with its padded extent and clamping index map, for
    ``tiles``), the batch variable and the placeholders A and B.

    Raises:
        ValueError: an odd K (``who`` names the kernel).
    """
    if not nt_supported(k):
        raise ValueError(f"{who} needs an even K; got {k}")
    vl = next(v for v in (NT_LANES, 2) if k % v == 0)
    mm: Any = m if m is not None else tirx.Var("m", "int64")
    nn: Any = n if n is not None else tirx.Var("n", "int64")
    bb = tirx.Var("b", "int64")
    a = te.placeholder((bb, mm, k), dtype, name="A")
    w = te.placeholder((bb, _rows(nn, prefix), k), dtype, name="B")
    return vl, (mm, *_padded(mm, tiles[0])), (nn, *_padded(nn, tiles[1])), bb, a, w


def _register_tile(sch: Any, at: Any, reduces: bool) -> None:
    """Block ``acc`` of an ``A · Bᵀ`` kernel computed at loop ``at`` as a register tile: its
    three spatial loops there (made by compute_at) unrolled, unrolled and vectorized, the
    reduction over K (where ``reduces``) outside them."""
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, at)
    if reduces:
        *tile, red = sch.get_loops(acc)[-4:]
        sch.reorder(red, *tile)
    else:
        tile = sch.get_loops(acc)[-3:]
    sch.set_scope(acc, 0, "local")
    sch.unroll(tile[0])
    sch.unroll(tile[1])
    sch.vectorize(tile[2])


@functools.lru_cache(maxsize=64)
def matmul_nt_primfunc(
    m: int | None, n: int | None, k: int, dtype: str = "float32", prefix: bool = False
) -> tirx.PrimFunc:
    """``Y[b, M, N] = A[b, M, K] · B[b, N, K]ᵀ``: attention's scores ``q · kᵀ`` reading the
    keys ``[b, N, K]`` as the cache stores them (no transposed copy per call).

    Each output is a dot product along K: the reduction runs over ``K / L`` vectors of L
    lanes (L = `NT_LANES`, or 2 where K is not a multiple of it) into an ``MT x NT_ROWS``
    tile of vector accumulators (rows of A x rows of B, both loaded contiguously), whose
    lanes are summed at the end. M and N may be symbolic (padded to whole tiles with
    clamped reads, as `matmul_primfunc`); K is static and even (a head dimension).

    Args:
        m: static row count of A, or None.
        n: static row count of B (the keys), or None.
        k: the reduction length (static, even).
        dtype: element type of A, B and Y.
        prefix: B holds ``C >= N`` rows, ``B[b, C, K]``, of which the first N are read: the
            keys of a preallocated KV cache, read in place (C symbolic).

    Returns:
        A scheduled PrimFunc ``(A, B, Y)`` (attribute ``global_symbol`` unset).
    """
    vl, (mm, m_pad, row), (nn, n_pad, col), bb, a, w = _nt_operands(
        "matmul_nt_primfunc", m, n, k, dtype, (MT, NT_ROWS), prefix
    )
    if k > vl:
        ko = te.reduce_axis((0, k // vl), name="ko")
        lanes = te.compute(
            (bb, m_pad, n_pad, vl),
            lambda b, i, j, v: te.sum(
                a[b, row(i), ko * vl + v] * w[b, col(j), ko * vl + v], axis=ko
            ),
            name="acc",
        )
    else:  # one vector: products, no reduction block (vectorize refuses a 1-step one)
        lanes = te.compute(
            (bb, m_pad, n_pad, vl), lambda b, i, j, v: a[b, row(i), v] * w[b, col(j), v],
            name="acc",
        )  # fmt: skip

    def lane_sum(b: Any, i: Any, j: Any) -> Any:  # a plain expression, not a reduction block
        return functools.reduce(lambda x, v: x + lanes[b, i, j, v], range(1, vl),
                                lanes[b, i, j, 0])  # fmt: skip

    y = te.compute((bb, mm, nn), lane_sum, name="Y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, w, y]))
    yb = sch.get_sblock("Y")
    b, i, j = sch.get_loops(yb)
    io, ii = sch.split(i, [None, MT])
    jo, ji = sch.split(j, [None, NT_ROWS])
    sch.reorder(b, io, jo, ii, ji)
    _register_tile(sch, jo, k > vl)  # (i, j, lane): the lanes in a vector
    # The accumulators' zeroing stays in the block (``if ko == 0``): decompose_reduction
    # cannot split it off once Y's loop nest shares the tile loop.
    sch.parallel(sch.fuse(b, io, jo))
    return sch.mod["main"]


#: Rows of A per register tile of `matmul_nt_packed_primfunc` (x NT_LANES partial sums x
#: one vector of keys: 12 accumulators; 4 rows, 16 of them, took 4.8 against 3.6 ms).
PACKED_MT = 3


@functools.lru_cache(maxsize=64)
def matmul_nt_packed_primfunc(
    m: int | None, n: int | None, k: int, dtype: str = "float32"
) -> tirx.PrimFunc:
    """``Y[b, M, N] = A[b, M, K] · B[b, N, K]ᵀ`` for many rows of A, bit-identical to
    `matmul_nt_primfunc`: attention's scores over a whole prompt (the keys passed in, not a
    cache read in place).

    `matmul_nt_primfunc` reduces along K in vectors of L lanes (`NT_LANES`), the right
    trade for a decode step's few query rows; over a prompt it multiplies at a quarter of
    the machine's vector width. Here each block of VL keys is first copied transposed into
    a local ``[K, VL]`` tile, once for all rows of A, and a register tile of ``PACKED_MT``
    rows x L partial sums x VL keys multiplies a broadcast of A by a vector of the tile.
    Partial sum ``l`` of a score takes the products at ``k ≡ l (mod L)`` in order of k, and
    the L partial sums are added as `matmul_nt_primfunc` adds its lanes: the same
    operations in the same order, so a prompt's scores are the bytes a decode step would
    compute for them (`tests/lowering/test_kv_in_place.py` holds the two entries to that).
    At a 256-token prefill of the paper-shaped decoder (4 KV heads, 2,048 query rows each,
    256 keys of 128) one layer's scores take 3.6 ms against 8.1 ms (2 threads).

    The key blocks (with the batch) run in parallel; the rows of A run in order inside
    each, so a tile is copied once. M and N may be symbolic (padded with clamped reads, as
    in `matmul_primfunc`); K is static and even.
    """
    vl, (mm, m_pad, row), (nn, n_pad, col), bb, a, w = _nt_operands(
        "matmul_nt_packed_primfunc", m, n, k, dtype, (PACKED_MT, VL), False
    )
    wt = te.compute((bb, k, n_pad), lambda b, r, j: w[b, col(j), r], name="BT")
    # Partial sums [b, i, lane, j]: the keys innermost, one vector per (row, lane).
    if k > vl:
        ko = te.reduce_axis((0, k // vl), name="ko")
        lanes = te.compute(
            (bb, m_pad, vl, n_pad),
            lambda b, i, v, j: te.sum(a[b, row(i), ko * vl + v] * wt[b, ko * vl + v, j], axis=ko),
            name="acc",
        )
    else:  # one vector of K: products, no reduction (as in matmul_nt_primfunc)
        lanes = te.compute(
            (bb, m_pad, vl, n_pad), lambda b, i, v, j: a[b, row(i), v] * wt[b, v, j], name="acc"
        )

    def lane_sum(b: Any, i: Any, j: Any) -> Any:  # matmul_nt_primfunc's order
        return functools.reduce(lambda x, v: x + lanes[b, i, v, j], range(1, vl),
                                lanes[b, i, 0, j])  # fmt: skip

    y = te.compute((bb, mm, nn), lane_sum, name="Y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, w, y]))
    yb = sch.get_sblock("Y")
    b, i, j = sch.get_loops(yb)
    io, ii = sch.split(i, [None, PACKED_MT])
    jo, ji = sch.split(j, [None, VL])
    sch.reorder(b, jo, io, ii, ji)  # key blocks outside the rows: one copy each
    _register_tile(sch, io, k > vl)  # (i, lane, j): the keys in a vector
    packed = sch.get_sblock("BT")
    sch.compute_at(packed, jo)
    sch.set_scope(packed, 0, "local")
    sch.parallel(sch.fuse(b, jo))
    sch.vectorize(sch.get_loops(yb)[-1])
    return sch.mod["main"]
