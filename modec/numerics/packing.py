"""Packing of integer weight codes into the layout the mixed-precision kernels read.

Pure numpy (no TVM): the quantizer packs with it, the artifact writer stores its arrays, and
the kernel tests use `dequantize` / `reference_matmul` as their oracle.

The layout, `n16k32` (byte-exact description in docs/packing.md):

* K is padded to `K_pad = ceil(K / group_size) * group_size` and cut into blocks of 32
  weights. Each block of one row takes exactly `bits` uint32 words: the 32 codes form a
  little-endian bitstream, code j at bits [j*bits, j*bits + bits). Every width 1..8 uses the
  same rule, so 3-bit is "32 weights in three words" (DESIGN.md measured it as fast as
  2/4-bit; "10 per word" was 10-14x slower because the divide by 10 does not vectorize).
* N is padded to a multiple of 16 and the words of 16 consecutive output rows are stored
  side by side (N-interleaved): `codes[nb, kb, w, lane]` is word w of block kb of row
  `16 * nb + lane`. One 64-byte load then feeds one 16-lane fp32 vector (AVX-512) and the
  same word index serves every lane, so the shift amounts are compile-time constants.
* Scales (fp16) and zeros (uint8) are interleaved the same way: `scale[nb, g, lane]`.
* Padding rows and columns hold code 0, scale 0 and zero 0.

Stacked experts carry one more leading axis E on every array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from modec.errors import BadInputError
from modec.numerics.schemes import QuantScheme

#: Name of the layout, written into the manifest next to every packed weight.
LAYOUT = "n16k32"
#: Output rows interleaved side by side (one AVX-512 fp32 vector).
LANES = 16
#: Weights per block; a block of one row takes `bits` uint32 words.
BLOCK = 32


def padded_n(n: int) -> int:
    """Rows after padding N to a multiple of `LANES`."""
    return math.ceil(n / LANES) * LANES


def padded_k(k: int, scheme: QuantScheme) -> int:
    """Columns after padding K to whole groups (every supported group is a multiple of 32)."""
    return scheme.num_groups(k) * scheme.group_size


def codes_shape(n: int, k: int, scheme: QuantScheme) -> tuple[int, int, int, int]:
    """Shape of the packed codes of one [N, K] weight: (N_pad/16, K_pad/32, bits, 16)."""
    return (padded_n(n) // LANES, padded_k(k, scheme) // BLOCK, scheme.bits, LANES)


def params_shape(n: int, k: int, scheme: QuantScheme) -> tuple[int, int, int]:
    """Shape of the packed scales and zeros of one [N, K] weight: (N_pad/16, groups, 16)."""
    return (padded_n(n) // LANES, scheme.num_groups(k), LANES)


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight [N, K], or a stack of E experts [E, N, K], in layout `n16k32`.

    Attributes:
        codes: uint32 [(E,) N_pad/16, K_pad/32, bits, 16].
        scale: float16 [(E,) N_pad/16, groups, 16].
        zero: uint8 [(E,) N_pad/16, groups, 16].
        scheme: the quantization scheme (bits, group size).
        n: logical output rows N.
        k: logical reduction length K.
        layout: layout name, always `LAYOUT`.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    scheme: QuantScheme
    n: int
    k: int
    layout: str = LAYOUT

    def __post_init__(self) -> None:
        lead = self.codes.shape[:-4]
        want_codes = lead + codes_shape(self.n, self.k, self.scheme)
        want_params = lead + params_shape(self.n, self.k, self.scheme)
        checks = (
            ("codes", self.codes, want_codes, np.uint32),
            ("scale", self.scale, want_params, np.float16),
            ("zero", self.zero, want_params, np.uint8),
        )
        for name, arr, shape, dtype in checks:
            if arr.shape != shape or arr.dtype != dtype:
                raise BadInputError(
                    f"packed {name} has shape {arr.shape} {arr.dtype}; layout {self.layout} "
                    f"with {self.scheme.name}, N={self.n}, K={self.k} needs {shape} "
                    f"{np.dtype(dtype)}"
                )

    @property
    def num_experts(self) -> int | None:
        """E for a stacked weight, None for a single [N, K] weight."""
        return int(self.codes.shape[0]) if self.codes.ndim == 5 else None

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes + scales + zeros), padding included."""
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)

    def expert(self, e: int) -> PackedWeight:
        """The packed weight of expert `e` of a stacked weight."""
        if self.num_experts is None:
            raise BadInputError("expert() needs a stacked PackedWeight [E, N, K]")
        return PackedWeight(self.codes[e], self.scale[e], self.zero[e], self.scheme, self.n, self.k)


def check_codes(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QuantScheme) -> None:
    """Raise `BadInputError` unless codes, scales and zeros fit together and fit ``scheme``."""
    if q.ndim not in (2, 3):
        raise BadInputError(f"codes must be [N, K] or [E, N, K]; got shape {q.shape}")
    groups = scheme.num_groups(q.shape[-1])
    want = (*q.shape[:-1], groups)
    if scale.shape != want or zero.shape != want:
        raise BadInputError(
            f"scale {scale.shape} / zero {zero.shape} must be {want} for codes {q.shape} "
            f"with {scheme.name}"
        )
    if q.size and int(q.max()) > scheme.qmax:
        raise BadInputError(
            f"code {int(q.max())} does not fit {scheme.bits} bits (max {scheme.qmax}); "
            "quantize with the same scheme you pack with"
        )
    if zero.size and int(zero.max()) > scheme.qmax:
        raise BadInputError(
            f"zero point {int(zero.max())} does not fit {scheme.bits} bits (max {scheme.qmax})"
        )


def pack_codes(q: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Pack codes q[..., N, K] (integers in [0, 2^bits - 1]) into uint32 words.

    Returns:
        uint32 [..., N_pad/16, K_pad/32, bits, 16].
    """
    *lead, n, k = q.shape
    bits = scheme.bits
    np_, kp = padded_n(n), padded_k(k, scheme)
    full = np.zeros((*lead, np_, kp), dtype=np.uint64)
    full[..., :n, :k] = q
    # [..., NB, 16, KB, 32] -> [..., NB, KB, 32, 16]: block-major, lanes innermost.
    blocks = full.reshape(*lead, np_ // LANES, LANES, kp // BLOCK, BLOCK)
    blocks = np.moveaxis(blocks, -3, -1)  # [..., NB, KB, 32, 16]
    words = np.zeros((*blocks.shape[:-2], bits, LANES), dtype=np.uint64)
    for j in range(BLOCK):
        pos = j * bits
        w, off = divmod(pos, 32)
        v = blocks[..., j, :]
        words[..., w, :] |= v << np.uint64(off)
        if off + bits > 32:  # the code straddles into the next word
            words[..., w + 1, :] |= v >> np.uint64(32 - off)
    return (words & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def unpack_codes(codes: np.ndarray, n: int, k: int, scheme: QuantScheme) -> np.ndarray:
    """Inverse of `pack_codes`: uint32 [..., NB, KB, bits, 16] -> uint8 [..., N, K]."""
    bits = scheme.bits
    words = codes.astype(np.uint64)
    *lead, nb, kb, _, _ = codes.shape
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((*lead, nb, kb, BLOCK, LANES), dtype=np.uint8)
    for j in range(BLOCK):
        w, off = divmod(j * bits, 32)
        v = words[..., w, :] >> np.uint64(off)
        if off + bits > 32:
            v |= words[..., w + 1, :] << np.uint64(32 - off)
        out[..., j, :] = (v & mask).astype(np.uint8)
    full = np.moveaxis(out, -1, -3).reshape(*lead, nb * LANES, kb * BLOCK)
    return np.ascontiguousarray(full[..., :n, :k])


def _interleave(p: np.ndarray, dtype: type) -> np.ndarray:
    """[..., N, G] -> [..., N_pad/16, G, 16], padding rows with 0."""
    *lead, n, g = p.shape
    np_ = padded_n(n)
    full = np.zeros((*lead, np_, g), dtype=dtype)
    full[..., :n, :] = p
    return np.ascontiguousarray(np.swapaxes(full.reshape(*lead, np_ // LANES, LANES, g), -1, -2))


def _deinterleave(p: np.ndarray, n: int) -> np.ndarray:
    *lead, nb, g, lanes = p.shape
    full = np.swapaxes(p, -1, -2).reshape(*lead, nb * lanes, g)
    return np.ascontiguousarray(full[..., :n, :])


def pack_scales(scale: np.ndarray) -> np.ndarray:
    """Scales [..., N, G] as the packed float16 [..., N_pad/16, G, 16]."""
    return _interleave(np.asarray(scale).astype(np.float16), np.float16)


def pack_zeros(zero: np.ndarray) -> np.ndarray:
    """Zero points [..., N, G] as the packed uint8 [..., N_pad/16, G, 16]."""
    return _interleave(np.asarray(zero).astype(np.uint8), np.uint8)


def pack(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QuantScheme) -> PackedWeight:
    """Pack one weight or a stack of experts into layout `n16k32`.

    Args:
        q: integer codes [N, K] or [E, N, K], values in [0, 2^bits - 1].
        scale: fp16 (or anything castable) [(E,) N, groups].
        zero: integer zero points [(E,) N, groups], values in [0, 2^bits - 1].
        scheme: the scheme the codes were quantized with.

    Returns:
        The packed weight; `unpack` returns the inputs exactly (scales as fp16).
    """
    q = np.asarray(q)
    scale = np.asarray(scale)
    zero = np.asarray(zero)
    check_codes(q, scale, zero, scheme)
    n, k = int(q.shape[-2]), int(q.shape[-1])
    return PackedWeight(
        codes=pack_codes(q, scheme),
        scale=pack_scales(scale),
        zero=pack_zeros(zero),
        scheme=scheme,
        n=n,
        k=k,
    )


def unpack(pw: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `pack`: (codes uint8 [(E,) N, K], scale fp16 [(E,) N, G], zero uint8)."""
    return (
        unpack_codes(pw.codes, pw.n, pw.k, pw.scheme),
        _deinterleave(pw.scale, pw.n),
        _deinterleave(pw.zero, pw.n),
    )


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QuantScheme
) -> np.ndarray:
    """w = (q - z) * s group-wise along K, as float32 [..., N, K]."""
    k = q.shape[-1]
    gidx = np.arange(k) // scheme.group_size
    s = scale.astype(np.float32)[..., gidx]
    z = zero.astype(np.float32)[..., gidx]
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def reference_matmul(x: np.ndarray, pw: PackedWeight) -> np.ndarray:
    """Y[M, N] = X[M, K] @ dequant(W)^T, accumulated in float64, returned as float32."""
    if pw.num_experts is not None:
        raise BadInputError("reference_matmul takes one weight; use reference_grouped_matmul")
    w = dequantize(*unpack(pw), pw.scheme).astype(np.float64)
    return (np.asarray(x, dtype=np.float64) @ w.T).astype(np.float32)


def reference_grouped_matmul(x: np.ndarray, indptr: np.ndarray, pw: PackedWeight) -> np.ndarray:
    """The grouped MoE matmul: rows indptr[e]:indptr[e+1] of X use expert e of `pw`.

    Args:
        x: activations [T, K], tokens sorted by expert.
        indptr: [E + 1] non-decreasing token offsets, indptr[0] = 0, indptr[E] = T.
        pw: stacked packed weights [E, N, K].

    Returns:
        float32 [T, N]; rows of no expert range stay 0.
    """
    e_count = pw.num_experts
    if e_count is None or len(indptr) != e_count + 1:
        raise BadInputError(
            f"indptr has {len(indptr)} entries; stacked weights with {e_count} experts need "
            f"{(e_count or 0) + 1}"
        )
    q, s, z = unpack(pw)
    w = dequantize(q, s, z, pw.scheme).astype(np.float64)
    y = np.zeros((x.shape[0], pw.n), dtype=np.float64)
    for e in range(e_count):
        lo, hi = int(indptr[e]), int(indptr[e + 1])
        y[lo:hi] = np.asarray(x[lo:hi], dtype=np.float64) @ w[e].T
    return y.astype(np.float32)
