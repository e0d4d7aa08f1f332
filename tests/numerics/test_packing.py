"""Packing round trips and the numpy reference, for every width 1..8 and odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modec.errors import BadInputError
from modec.numerics.packing import (
    LAYOUT,
    PackedWeight,
    codes_shape,
    dequantize,
    pack,
    pack_codes,
    reference_grouped_matmul,
    reference_matmul,
    unpack,
    unpack_codes,
)
from modec.numerics.schemes import QuantScheme

GROUPS = (32, 64, 128)


def random_weight(
    rng: np.random.Generator, scheme: QuantScheme, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    *lead, _, k = shape
    g = scheme.num_groups(k)
    q = rng.integers(0, scheme.qmax + 1, shape, dtype=np.uint8)
    s = (rng.random((*lead, shape[-2], g)) * 0.1 + 0.01).astype(np.float16)
    z = rng.integers(0, scheme.qmax + 1, (*lead, shape[-2], g), dtype=np.uint8)
    return q, s, z


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    group=st.sampled_from(GROUPS),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_identity(bits: int, group: int, n: int, k: int, seed: int) -> None:
    scheme = QuantScheme(bits, group)
    q, s, z = random_weight(np.random.default_rng(seed), scheme, (n, k))
    pw = pack(q, s, z, scheme)
    q2, s2, z2 = unpack(pw)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(z2, z)
    assert pw.codes.shape == codes_shape(n, k, scheme)
    assert pw.layout == LAYOUT


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 8), e=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_stacked_pack_equals_per_expert_pack(bits: int, e: int, seed: int) -> None:
    scheme = QuantScheme(bits, 32)
    q, s, z = random_weight(np.random.default_rng(seed), scheme, (e, 21, 70))
    stacked = pack(q, s, z, scheme)
    assert stacked.num_experts == e
    for i in range(e):
        single = pack(q[i], s[i], z[i], scheme)
        np.testing.assert_array_equal(stacked.expert(i).codes, single.codes)
        np.testing.assert_array_equal(stacked.expert(i).scale, single.scale)
    q2, _, _ = unpack(stacked)
    np.testing.assert_array_equal(q2, q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitstream_positions(bits: int) -> None:
    """Code j of a block sits at bits [j*bits, j*bits+bits) of the block's words (docs)."""
    scheme = QuantScheme(bits, 32)
    for j in range(32):
        q = np.zeros((16, 32), dtype=np.uint8)
        q[5, j] = scheme.qmax
        words = pack_codes(q, scheme)[0, 0, :, 5].astype(np.uint64)
        stream = sum(int(w) << (32 * i) for i, w in enumerate(words))
        assert stream == scheme.qmax << (j * bits)
        assert not pack_codes(q, scheme)[0, 0, :, 4].any()  # other rows untouched


def test_unpack_codes_of_random_words_repacks_exactly() -> None:
    """Any word pattern is a valid packing (the benchmark relies on it)."""
    scheme = QuantScheme(3, 64)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, codes_shape(32, 128, scheme), dtype=np.uint64)
    words = words.astype(np.uint32)
    q = unpack_codes(words, 32, 128, scheme)
    np.testing.assert_array_equal(pack_codes(q, scheme), words)


def test_padding_is_zero_and_nbytes_counts_it() -> None:
    scheme = QuantScheme(4, 128)
    q, s, z = random_weight(np.random.default_rng(1), scheme, (37, 200))
    pw = pack(q, s, z, scheme)
    # N padded 37 -> 48, K padded 200 -> 256 (two groups of 128).
    assert pw.codes.shape == (3, 8, 4, 16)
    assert pw.scale.shape == (3, 2, 16)
    assert not pw.scale[2, :, 5:].any() and not pw.zero[2, :, 5:].any()
    assert pw.nbytes == 3 * 8 * 4 * 16 * 4 + 3 * 2 * 16 * 3


def test_dequantize_short_last_group() -> None:
    scheme = QuantScheme(2, 32)
    q = np.array([[3] * 40], dtype=np.uint8)
    s = np.array([[0.5, 2.0]], dtype=np.float16)
    z = np.array([[1, 2]], dtype=np.uint8)
    w = dequantize(q, s, z, scheme)
    np.testing.assert_array_equal(w[0, :32], np.full(32, 1.0, np.float32))
    np.testing.assert_array_equal(w[0, 32:], np.full(8, 2.0, np.float32))


def test_reference_matmul_matches_dense_numpy() -> None:
    scheme = QuantScheme(3, 64)
    rng = np.random.default_rng(2)
    q, s, z = random_weight(rng, scheme, (9, 130))
    x = rng.standard_normal((4, 130)).astype(np.float32)
    want = x.astype(np.float64) @ dequantize(q, s, z, scheme).T.astype(np.float64)
    np.testing.assert_allclose(reference_matmul(x, pack(q, s, z, scheme)), want, rtol=1e-6)


def test_reference_grouped_matmul_uses_each_experts_rows() -> None:
    scheme = QuantScheme(4, 32)
    rng = np.random.default_rng(3)
    q, s, z = random_weight(rng, scheme, (3, 8, 64))
    pw = pack(q, s, z, scheme)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    indptr = np.array([0, 2, 2, 5])
    y = reference_grouped_matmul(x, indptr, pw)
    np.testing.assert_allclose(y[:2], reference_matmul(x[:2], pw.expert(0)), rtol=1e-6)
    np.testing.assert_allclose(y[2:], reference_matmul(x[2:], pw.expert(2)), rtol=1e-6)


def test_rejects_codes_wider_than_scheme() -> None:
    scheme = QuantScheme(2, 32)
    q = np.full((2, 32), 4, dtype=np.uint8)
    with pytest.raises(BadInputError, match="does not fit 2 bits"):
        pack(q, np.ones((2, 1), np.float16), np.zeros((2, 1), np.uint8), scheme)


def test_rejects_mismatched_arrays() -> None:
    scheme = QuantScheme(4, 32)
    with pytest.raises(BadInputError, match="needs"):
        PackedWeight(
            np.zeros((1, 1, 4, 16), np.uint32),
            np.zeros((1, 1, 16), np.float32),
            np.zeros((1, 1, 16), np.uint8),
            scheme,
            16,
            32,
        )
