"""Group-wise asymmetric round-to-nearest quantization in numpy (the RTN reference).

A weight W[N, K] is quantized along K in groups of `scheme.group_size` (the last group is
shorter when K % group_size != 0): w ≈ ŵ = (q - z) · s with codes q, zero z in
[0, 2^bits - 1] (uint8) and one fp16 scale s per (row, group); see `schemes.QuantScheme`.

The quantization grid follows the GPTQ reference quantizer (Frantar et al. 2022, IST-DASLab
`quant.py`, `Quantizer.find_params`): the range [min(w), max(w)] is widened to include 0
so that the zero point is an integer in [0, qmax] (it fits the uint8 zero and 0 is exactly
representable), and an all-zero group gets the range [-1, 1].

fp16 consistency: the scale is rounded to fp16 FIRST, and both the zero point and the codes
are computed with that rounded scale, in float32. `dequantize` then reproduces exactly the
values the quantizer aimed at, bit for bit, and so do the kernels that read the fp16 scale.
The GPTQ kernel (`gptq.py`) uses `compute_qparams` and the same float32 formulas, so its
dequantized weights equal `dequantize(q, scale, zero)` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from modec.errors import BadInputError
from modec.numerics.schemes import QuantScheme

__all__ = [
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "dequantize_stacked",
    "quantize_codes",
    "quantize_rtn",
    "quantize_rtn_stacked",
]

# Clamp for the fp16 scale: the smallest normal fp16 (a zero or subnormal scale would make
# w / s overflow or lose precision) and the largest finite fp16.
_FP16_MIN_SCALE = float(np.finfo(np.float16).tiny)
_FP16_MAX_SCALE = float(np.finfo(np.float16).max)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Codes and quantization parameters of one weight [N, K] or a stack [E, N, K].

    Attributes:
        q: uint8 codes, shape [..., N, K], each in [0, 2^bits - 1] (unpacked).
        scale: fp16 scales, shape [..., N, G] with G = ceil(K / group_size).
        zero: uint8 zero points, shape [..., N, G].
        scheme: the QuantScheme used.
    """

    q: npt.NDArray[np.uint8]
    scale: npt.NDArray[np.float16]
    zero: npt.NDArray[np.uint8]
    scheme: QuantScheme

    def dequantize(self) -> npt.NDArray[np.float32]:
        """(q - z) · s in float32, same as `dequantize(self.q, self.scale, self.zero, ...)`."""
        return dequantize(self.q, self.scale, self.zero, self.scheme)


def compute_qparams(
    w_groups: npt.ArrayLike, bits: int
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.uint8]]:
    """Asymmetric min/max scale and zero point of each group (last axis = one group).

    Args:
        w_groups: weights [..., g]; each slice along the last axis is one group.
        bits: code width 1..8.

    Returns:
        (scale, zero): fp16 scale and uint8 zero, shape [...]. The zero is computed from the
        fp16-rounded scale.
    """
    w = np.asarray(w_groups, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] == 0:
        raise BadInputError(f"compute_qparams needs a non-empty last axis; got shape {w.shape}")
    qmax = QuantScheme(bits).qmax
    # GPTQ reference quantizer: include 0 in the range so that z ∈ [0, qmax].
    xmin = np.minimum(w.min(axis=-1), 0.0)
    xmax = np.maximum(w.max(axis=-1), 0.0)
    flat = (xmin == 0) & (xmax == 0)
    xmin = np.where(flat, np.float32(-1.0), xmin)
    xmax = np.where(flat, np.float32(1.0), xmax)
    scale32 = (xmax.astype(np.float64) - xmin) / qmax
    scale = np.clip(scale32, _FP16_MIN_SCALE, _FP16_MAX_SCALE).astype(np.float16)
    zero = np.clip(np.round(-xmin / scale.astype(np.float32)), 0, qmax).astype(np.uint8)
    return scale, zero


def quantize_codes(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero: npt.ArrayLike, bits: int
) -> npt.NDArray[np.uint8]:
    """Codes q = clamp(round(w / s) + z, 0, qmax), in float32, for broadcastable s and z.

    Rounding is half-to-even (numpy and torch agree), as in the GPTQ reference.
    """
    qmax = QuantScheme(bits).qmax
    w32 = np.asarray(w, dtype=np.float32)
    s32 = np.asarray(scale, dtype=np.float16).astype(np.float32)
    z32 = np.asarray(zero, dtype=np.uint8).astype(np.float32)
    return np.clip(np.round(w32 / s32) + z32, 0, qmax).astype(np.uint8)


def _check_weight(w: npt.ArrayLike, ndim: int | None = None) -> npt.NDArray[np.float32]:
    a = np.asarray(w)
    if a.ndim < 2 or (ndim is not None and a.ndim != ndim):
        want = f"{ndim}-D" if ndim is not None else "at least 2-D [..., N, K]"
        raise BadInputError(f"weight must be {want}; got shape {a.shape}")
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        raise BadInputError(f"weight has an empty axis: shape {a.shape}")
    a32 = a.astype(np.float32)
    if not np.all(np.isfinite(a32)):
        raise BadInputError("weight contains NaN or inf (after casting to float32)")
    return a32


def _group_view(w: npt.NDArray[np.float32], group_size: int) -> npt.NDArray[np.float32]:
    """[..., N, K] → [..., N, G, g]. The short last group is padded by repeating its last
    element, which leaves its min and max unchanged."""
    k = w.shape[-1]
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        widths = [(0, 0)] * (w.ndim - 1) + [(0, pad)]
        w = np.pad(w, widths, mode="edge")
    return w.reshape(*w.shape[:-1], groups, group_size)


def _expand(p: npt.NDArray[Any], group_size: int, k: int) -> npt.NDArray[Any]:
    """Per-group parameters [..., G] → per-element [..., K]."""
    return np.repeat(p, group_size, axis=-1)[..., :k]


def quantize_rtn(w: npt.ArrayLike, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest group-wise asymmetric quantization of W[N, K] (or a stack [..., N, K]).

    Args:
        w: weights; converted to float32.
        scheme: the bit width and group size.

    Returns:
        QuantizedWeight with q [..., N, K] uint8, scale [..., N, G] fp16, zero [..., N, G]
        uint8.
    """
    w32 = _check_weight(w)
    k = w32.shape[-1]
    scale, zero = compute_qparams(_group_view(w32, scheme.group_size), scheme.bits)
    g = scheme.group_size
    q = quantize_codes(w32, _expand(scale, g, k), _expand(zero, g, k), scheme.bits)
    return QuantizedWeight(q=q, scale=scale, zero=zero, scheme=scheme)


def dequantize(
    q: npt.ArrayLike, scale: npt.ArrayLike, zero: npt.ArrayLike, scheme: QuantScheme
) -> npt.NDArray[np.float32]:
    """ŵ = (q - z) · s in float32 for q [..., N, K] and scale/zero [..., N, G].

    Raises:
        BadInputError: when the shapes do not agree with the scheme's group count.
    """
    qa = np.asarray(q)
    sa = np.asarray(scale)
    za = np.asarray(zero)
    if qa.ndim < 2:
        raise BadInputError(f"codes must be [..., N, K]; got shape {qa.shape}")
    k = qa.shape[-1]
    want = (*qa.shape[:-1], scheme.num_groups(k))
    if sa.shape != want or za.shape != want:
        raise BadInputError(
            f"scale {sa.shape} and zero {za.shape} must have shape {want} for codes "
            f"{qa.shape} at {scheme.name}"
        )
    g = scheme.group_size
    s32 = _expand(sa.astype(np.float16).astype(np.float32), g, k)
    z32 = _expand(za.astype(np.float32), g, k)
    return np.asarray((qa.astype(np.float32) - z32) * s32, dtype=np.float32)


def quantize_rtn_stacked(w: npt.ArrayLike, scheme: QuantScheme) -> QuantizedWeight:
    """RTN for stacked expert weights [E, N, K] (one scheme for all experts).

    Returns:
        QuantizedWeight with q [E, N, K], scale and zero [E, N, G].
    """
    return quantize_rtn(_check_weight(w, ndim=3), scheme)


def dequantize_stacked(qw: QuantizedWeight) -> npt.NDArray[np.float32]:
    """Dequantize a stacked QuantizedWeight [E, N, K] to float32 [E, N, K]."""
    if qw.q.ndim != 3:
        raise BadInputError(f"expected stacked codes [E, N, K]; got shape {qw.q.shape}")
    return qw.dequantize()
