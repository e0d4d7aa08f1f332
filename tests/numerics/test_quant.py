"""RTN quantization (modec.numerics.quant) against a plain per-group numpy loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modec.errors import BadInputError
from modec.numerics.quant import (
    compute_qparams,
    dequantize,
    dequantize_stacked,
    quantize_rtn,
    quantize_rtn_stacked,
)
from modec.numerics.schemes import QuantScheme

BITS = list(range(1, 9))
GROUPS = [32, 64, 128]
# Odd shapes: K below one group, K not a multiple of any group size, a single row.
SHAPES = [(1, 5), (3, 33), (7, 100), (5, 129), (4, 257)]


def reference_rtn(
    w: np.ndarray, bits: int, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row, one group at a time, written from the definition (GPTQ reference quantizer:
    range widened to include 0, all-zero group → [-1, 1], fp16 scale used for everything)."""
    qmax = 2**bits - 1
    n, k = w.shape
    groups = math.ceil(k / group)
    q = np.zeros((n, k), np.uint8)
    scale = np.zeros((n, groups), np.float16)
    zero = np.zeros((n, groups), np.uint8)
    deq = np.zeros((n, k), np.float32)
    for r in range(n):
        for gi in range(groups):
            cols = slice(gi * group, min(k, (gi + 1) * group))
            x = w[r, cols].astype(np.float32)
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            if lo == 0.0 and hi == 0.0:
                lo, hi = -1.0, 1.0
            s16 = np.float16(min(max((hi - lo) / qmax, 6.103515625e-05), 65504.0))
            s = np.float32(s16)
            z = int(min(max(np.round(np.float32(-lo) / s), 0), qmax))
            codes = np.clip(np.round(x / s) + np.float32(z), 0, qmax)
            scale[r, gi], zero[r, gi] = s16, z
            q[r, cols] = codes.astype(np.uint8)
            deq[r, cols] = (codes.astype(np.float32) - np.float32(z)) * s
    return q, scale, zero, deq


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, size=shape).astype(np.float32)
    # Awkward groups: an all-zero row, an all-positive row, one outlier.
    w[0, : min(40, shape[1])] = 0.0
    if shape[0] > 1:
        w[1] = np.abs(w[1]) + 0.01
    w[-1, -1] = 1.5
    return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rtn_matches_reference(bits: int, group: int, shape: tuple[int, int]) -> None:
    w = _weights(shape, seed=bits * 1000 + group + shape[1])
    scheme = QuantScheme(bits, group)
    qw = quantize_rtn(w, scheme)
    q, scale, zero, deq = reference_rtn(w, bits, group)
    assert qw.q.dtype == np.uint8 and qw.scale.dtype == np.float16 and qw.zero.dtype == np.uint8
    assert qw.scale.shape == (shape[0], math.ceil(shape[1] / group))
    np.testing.assert_array_equal(qw.q, q)
    np.testing.assert_array_equal(qw.scale, scale)
    np.testing.assert_array_equal(qw.zero, zero)
    got = dequantize(qw.q, qw.scale, qw.zero, scheme)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, deq)
    np.testing.assert_array_equal(qw.dequantize(), deq)
    assert int(qw.q.max()) <= scheme.qmax and int(qw.zero.max()) <= scheme.qmax


@pytest.mark.parametrize("bits", BITS)
def test_rtn_error_is_half_a_step(bits: int) -> None:
    """|w - ŵ| ≤ s/2, up to the fp16 rounding of s stretched over qmax steps."""
    scheme = QuantScheme(bits, 64)
    w = np.random.default_rng(bits).uniform(-2, 3, size=(16, 150)).astype(np.float32)
    qw = quantize_rtn(w, scheme)
    s = np.repeat(qw.scale.astype(np.float32), 64, axis=1)[:, :150]
    err = np.abs(w - qw.dequantize())
    assert np.all(err <= s * (0.5 + scheme.qmax * 2.0**-10) + 1e-7)


def test_zero_is_exact_and_all_zero_group_guarded() -> None:
    w = np.zeros((2, 64), np.float32)
    w[1, :32] = np.linspace(0.1, 1.0, 32)  # all positive: range widened to include 0
    for bits in BITS:
        qw = quantize_rtn(w, QuantScheme(bits, 32))
        deq = qw.dequantize()
        assert np.all(np.isfinite(qw.scale.astype(np.float32)))
        assert np.all(qw.scale.astype(np.float32) > 0)
        np.testing.assert_array_equal(deq[0], 0.0)
        np.testing.assert_array_equal(deq[1, 32:], 0.0)


def test_tiny_and_huge_ranges_stay_finite() -> None:
    w = np.array([[1e-9, -2e-9] * 16, [7e4, -7e4] * 16], np.float32)
    qw = quantize_rtn(w, QuantScheme(1, 32))
    assert np.all(np.isfinite(qw.scale.astype(np.float32)))
    assert np.all(np.isfinite(qw.dequantize()))
    assert np.abs(qw.dequantize()[0]).max() < 1e-4


def test_compute_qparams_uses_fp16_scale_for_zero() -> None:
    # Range [-0.3, 0.7] at 3 bits: s = 1/7 rounds in fp16; z must come from the rounded s.
    scale, zero = compute_qparams(np.array([[-0.3, 0.7, 0.1]]), 3)
    s = np.float32(np.float16(1.0 / 7))
    assert scale[0] == np.float16(1.0 / 7)
    assert zero[0] == np.round(np.float32(0.3) / s)


@pytest.mark.parametrize("group", GROUPS)
def test_stacked_equals_per_expert(group: int) -> None:
    rng = np.random.default_rng(group)
    w = rng.normal(size=(3, 5, 97)).astype(np.float32)
    scheme = QuantScheme(3, group)
    st = quantize_rtn_stacked(w, scheme)
    assert st.q.shape == (3, 5, 97) and st.scale.shape == (3, 5, math.ceil(97 / group))
    deq = dequantize_stacked(st)
    for e in range(3):
        one = quantize_rtn(w[e], scheme)
        np.testing.assert_array_equal(st.q[e], one.q)
        np.testing.assert_array_equal(st.scale[e], one.scale)
        np.testing.assert_array_equal(st.zero[e], one.zero)
        np.testing.assert_array_equal(deq[e], one.dequantize())


def test_bad_inputs() -> None:
    scheme = QuantScheme(4, 32)
    with pytest.raises(BadInputError, match="2-D"):
        quantize_rtn(np.zeros(8, np.float32), scheme)
    with pytest.raises(BadInputError, match="NaN"):
        quantize_rtn(np.full((2, 8), np.nan, np.float32), scheme)
    with pytest.raises(BadInputError, match="3-D"):
        quantize_rtn_stacked(np.zeros((2, 8), np.float32), scheme)
    qw = quantize_rtn(np.ones((2, 40), np.float32), scheme)
    with pytest.raises(BadInputError, match="must have shape"):
        dequantize(qw.q, qw.scale[:, :1], qw.zero, scheme)
