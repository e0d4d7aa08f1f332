"""The grouped MoE kernel: one launch per width, token ranges by indptr, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest

from modec.numerics.packing import reference_grouped_matmul
from modec.numerics.schemes import QuantScheme
from tests.kernels.conftest import assert_close, random_packed

pytest.importorskip("tvm")

from modec.kernels import build_grouped_moe_matmul

WIDTHS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)


def _run(
    bits: int, group: int, n: int, k: int, counts: list[int], index_dtype: str = "int64"
) -> None:
    scheme = QuantScheme(bits, group)
    e = len(counts)
    pw = random_packed(bits + group + n + e, scheme, n, k, experts=e)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_dtype)
    x = np.random.default_rng(sum(counts)).standard_normal((int(indptr[-1]), k))
    x = x.astype(np.float32)
    kernel = build_grouped_moe_matmul(scheme, n, k, e, index_dtype=index_dtype)
    assert_close(kernel(x, indptr, pw), reference_grouped_matmul(x, indptr, pw))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_grouped_odd_shape_with_empty_experts(bits: int, group: int) -> None:
    # Expert 0 and 2 empty, 1 takes the one-token path, 3 the multi-token path with a
    # partial tile (6 = 4 + 2).
    _run(bits, group, 37, 200, [0, 1, 0, 6])


@pytest.mark.parametrize("bits", WIDTHS)
def test_grouped_aligned_shape_decode_and_prefill(bits: int) -> None:
    _run(bits, 64, 64, 256, [1, 1, 9, 4, 0])


def test_grouped_int32_indptr() -> None:
    _run(4, 32, 48, 64, [3, 0, 5], index_dtype="int32")


def test_grouped_all_experts_empty_leaves_no_rows() -> None:
    scheme = QuantScheme(3, 32)
    pw = random_packed(0, scheme, 32, 64, experts=2)
    kernel = build_grouped_moe_matmul(scheme, 32, 64, 2)
    y = kernel(np.zeros((0, 64), np.float32), np.zeros(3, np.int64), pw)
    assert y.shape == (0, 32)


def test_grouped_one_kernel_serves_any_token_count() -> None:
    scheme = QuantScheme(2, 128)
    pw = random_packed(5, scheme, 40, 130, experts=3)
    kernel = build_grouped_moe_matmul(scheme, 40, 130, 3)
    rng = np.random.default_rng(1)
    for counts in ([2, 2, 2], [0, 17, 1], [5, 0, 0]):
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        x = rng.standard_normal((int(indptr[-1]), 130)).astype(np.float32)
        assert_close(kernel(x, indptr, pw), reference_grouped_matmul(x, indptr, pw))
