"""The int8-activation grouped MoE kernels (``--expert-act-bits 8``) against numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modec.errors import BadInputError
from modec.numerics.activations import fake_quantize, quantize_rows
from modec.numerics.packing import PackedWeight, reference_grouped_matmul, reference_matmul
from modec.numerics.schemes import QuantScheme
from tests.kernels.conftest import assert_close, random_packed

tvm = pytest.importorskip("tvm")

from modec.kernels import grouped_moe_a8  # noqa: E402

needs_vnni = pytest.mark.skipif(
    not grouped_moe_a8.supports("llvm"), reason="this CPU has no AVX-512 VNNI and VBMI"
)


def _compile(func: Any) -> Any:
    from modec.kernels.target import resolve_target

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=resolve_target("llvm"))


def _quantize(x: np.ndarray, group: int) -> list[Any]:
    """The quantization kernel's (XQ, D, XS) of rows ``x``."""
    t, k = x.shape
    groups = -(-k // group)
    outs = [np.zeros((t, groups * group), np.int8), np.zeros((t, groups), np.float32),
            np.zeros((t, groups), np.float32)]  # fmt: skip
    args = [tvm.runtime.tensor(a) for a in (x, *outs)]
    _compile(grouped_moe_a8.quant_primfunc(k, group))(*args)
    return args[1:]


def _matmul(x: np.ndarray, indptr: np.ndarray, pw: PackedWeight) -> np.ndarray:
    scheme = pw.scheme
    run = _compile(grouped_moe_a8.primfunc(scheme, pw.n, pw.k, pw.num_experts)["main"])
    y = tvm.runtime.tensor(np.zeros((x.shape[0], pw.n), np.float32))
    weights = [tvm.runtime.tensor(a) for a in (indptr, pw.codes, pw.scale, pw.zero)]
    run(*_quantize(x, scheme.group_size), *weights, y)
    return np.asarray(y.numpy())


@pytest.mark.parametrize("k", [256, 200])
def test_quantization_kernel_is_the_numpy_reference_exactly(k: int) -> None:
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((5, k)) * rng.uniform(0.01, 30, (5, 1))).astype(np.float32)
    x[2, :64] = 0.0  # an all-zero group: codes 0
    x[3, 7] = 1e4  # an outlier
    got = [a.numpy() for a in _quantize(x, 64)]
    want = quantize_rows(x, 64)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    q, d, _ = want
    assert q.shape == (5, -(-k // 64) * 64) and not q[:, k:].any()
    assert not q[2, :64].any() and d[2, 0] == 0
    err = np.abs(fake_quantize(x, 64) - x)
    step = np.repeat(d, 64, axis=1)[:, :k]
    assert (err <= step / 2 * (1 + 1e-6)).all()


@needs_vnni
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_matches_the_simulated_product(bits: int) -> None:
    """Every width, an odd shape (N and K padded), empty experts, one-token and multi-token
    experts (tiles of 4 and a partial one): the product of the int8 rows and the dequantized
    weights, as the simulated model computes it."""
    scheme = QuantScheme(bits, 64)
    counts = [0, 1, 0, 6, 3, 4]
    pw = random_packed(bits, scheme, 37, 200, experts=len(counts))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = np.random.default_rng(bits).standard_normal((int(indptr[-1]), 200)).astype(np.float32)
    got = _matmul(x, indptr, pw)
    assert_close(got, reference_grouped_matmul(fake_quantize(x, 64), indptr, pw))
    # Against float activations the int8 rows are off by their quantization error only.
    exact = reference_grouped_matmul(x, indptr, pw)
    assert 0 < np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


@needs_vnni
def test_a_row_does_not_depend_on_its_experts_token_count() -> None:
    """The one-token path (decode) and the tiles of 4 compute the same integers and the same
    epilogue: a row is bit-identical whether its expert got 1 token or 5."""
    scheme = QuantScheme(3, 128)
    pw = random_packed(7, scheme, 64, 256, experts=2)
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    many = _matmul(x, np.array([0, 5, 5], np.int64), pw)
    for i in range(5):
        one = _matmul(x[i : i + 1], np.array([0, 1, 1], np.int64), pw)
        np.testing.assert_array_equal(one[0], many[i])


@needs_vnni
@pytest.mark.parametrize("bits", [3, 4])
def test_few_rows_take_the_rows_outer_path_with_the_same_bytes(bits: int) -> None:
    """No more routed rows than experts (decode): the kernel's rows-outer path (each task an
    expert's first row, `ROW_NI` row blocks of it). Experts with 0, 1, 2 and 5 rows (a tile
    of MT and one more), N not a whole number of task tiles: the simulated product, and
    every row bit-identical to the tile path's (the same rows among more than E)."""
    scheme = QuantScheme(bits, 64)
    counts = [0, 1, 0, 5, 1, 0, 2, 0, 1, 0, 0, 1, 0, 0, 0, 1]  # 12 rows, 16 experts
    pw = random_packed(bits, scheme, 100, 200, experts=len(counts))
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((12, 200)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    got = _matmul(x, indptr, pw)
    assert_close(got, reference_grouped_matmul(fake_quantize(x, 64), indptr, pw))
    more = [*counts[:-1], counts[-1] + 8]  # 20 rows > 16 experts: the tile path
    extra = rng.standard_normal((8, 200)).astype(np.float32)
    tiles = _matmul(
        np.concatenate([x, extra]), np.concatenate([[0], np.cumsum(more)]).astype(np.int64), pw
    )
    np.testing.assert_array_equal(tiles[:12], got)


def _dense(x: np.ndarray, pw: PackedWeight) -> np.ndarray:
    run = _compile(grouped_moe_a8.dense_primfunc(pw.scheme, pw.n, pw.k)["main"])
    y = tvm.runtime.tensor(np.zeros((x.shape[0], pw.n), np.float32))
    weights = [tvm.runtime.tensor(a) for a in (pw.codes, pw.scale, pw.zero)]
    run(*_quantize(x, pw.scheme.group_size), *weights, y)
    return np.asarray(y.numpy())


@needs_vnni
@pytest.mark.parametrize(
    ("bits", "n", "k", "group"),
    [(4, 100, 200, 64), (3, 64, 256, 128), (2, 48, 128, 32), (8, 33, 96, 32)],
)
def test_the_dense_kernel_matches_the_simulated_product(
    bits: int, n: int, k: int, group: int
) -> None:
    """``--dense-act-bits 8``: one weight (no experts' axis, no ranges), rows 1 at a time
    and in tiles of 4 with a partial one; a row is bit-identical whatever the row count
    (below 4 rows the kernel takes another thread partition, `DECODE_NI`)."""
    scheme = QuantScheme(bits, group)
    pw = random_packed(bits + n, scheme, n, k)
    x = np.random.default_rng(n).standard_normal((7, k)).astype(np.float32)
    got = _dense(x, pw)
    assert_close(got, reference_matmul(fake_quantize(x, group), pw))
    exact = reference_matmul(x, pw)
    assert 0 < np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()
    np.testing.assert_array_equal(_dense(x[2:3], pw)[0], got[2])
    np.testing.assert_array_equal(_dense(x[:3], pw), got[:3])  # fewer rows than a tile


def test_targets_without_the_instructions_are_refused() -> None:
    with pytest.raises(BadInputError, match="CPU targets"):
        grouped_moe_a8.check_target({"kind": "cuda", "arch": "sm_90"})
    with pytest.raises(BadInputError, match="VNNI and VBMI"):
        grouped_moe_a8.check_target({"kind": "llvm", "mcpu": "skylake-avx512"})
    with pytest.raises(BadInputError, match=r"^--dense-act-bits 8 needs"):
        grouped_moe_a8.dense_primfunc(
            QuantScheme(4, 128), 16, 128, {"kind": "llvm", "mcpu": "skylake-avx512"}
        )
