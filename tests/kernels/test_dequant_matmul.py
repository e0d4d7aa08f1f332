"""CPU dequant-matmul kernels (GEMV and symbolic-M GEMM) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from modec.errors import BadInputError
from modec.numerics.packing import reference_matmul
from modec.numerics.schemes import QuantScheme
from tests.kernels.conftest import assert_close, random_packed

pytest.importorskip("tvm")

from modec.kernels import build_dequant_matmul
from modec.kernels.dequant_matmul import primfunc

WIDTHS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
# (N, K): aligned, and neither N a multiple of 16 nor K of the group (short last group).
SHAPES = ((64, 256), (37, 200))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_gemv_matches_reference(bits: int, group: int, n: int, k: int) -> None:
    scheme = QuantScheme(bits, group)
    pw = random_packed(bits * 1000 + group + n, scheme, n, k)
    x = np.random.default_rng(n + k).standard_normal((1, k)).astype(np.float32)
    kernel = build_dequant_matmul(scheme, n, k, m=1)
    assert_close(kernel(x, pw), reference_matmul(x, pw))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_gemm_symbolic_m_matches_reference(bits: int, group: int, n: int, k: int) -> None:
    scheme = QuantScheme(bits, group)
    pw = random_packed(bits * 7 + group + k, scheme, n, k)
    kernel = build_dequant_matmul(scheme, n, k, m=None)
    rng = np.random.default_rng(bits)
    # One compiled kernel serves every M, including M not a multiple of the row tile.
    for m in (1, 5, 16, 23):
        x = rng.standard_normal((m, k)).astype(np.float32)
        assert_close(kernel(x, pw), reference_matmul(x, pw))


def test_one_bit_gemv() -> None:
    scheme = QuantScheme(1, 32)
    pw = random_packed(11, scheme, 48, 96)
    x = np.random.default_rng(0).standard_normal((1, 96)).astype(np.float32)
    assert_close(build_dequant_matmul(scheme, 48, 96, m=1)(x, pw), reference_matmul(x, pw))


def test_kernel_rejects_weight_of_other_shape() -> None:
    scheme = QuantScheme(4, 32)
    kernel = build_dequant_matmul(scheme, 64, 256, m=1)
    pw = random_packed(0, scheme, 37, 200)
    with pytest.raises(BadInputError, match="N=64 K=256"):
        kernel(np.zeros((1, 200), np.float32), pw)


def test_primfunc_signature_for_call_tir() -> None:
    """The lowering engineer relies on this argument order, these dtypes and shapes."""
    mod = primfunc(QuantScheme(3, 64), 37, 200, "llvm", m=None)
    func = mod["main"]
    names = [p.name for p in func.params]
    assert len(names) == 5
    bufs = [p.ty for p in func.params]  # TVM 0.27: a param carries its BufferType
    assert [str(b.dtype) for b in bufs] == ["float32", "uint32", "float16", "uint8", "float32"]
    assert [int(d) for d in bufs[1].shape] == [3, 8, 3, 16]  # N_pad/16, K_pad/32, bits, 16
    assert [int(d) for d in bufs[2].shape] == [3, 4, 16]
    assert str(bufs[0].shape[0]) == "m" and int(bufs[0].shape[1]) == 200
    assert int(bufs[4].shape[1]) == 37


@pytest.mark.parametrize("bits", (3, 4))
def test_row_blocks_not_a_multiple_of_the_thread_tile(bits: int) -> None:
    """N = 70: 5 row blocks of 16, a partial GEMV tile (4) and GEMM tile (2), padded."""
    scheme = QuantScheme(bits, 32)
    pw = random_packed(bits + 70, scheme, 70, 96)
    rng = np.random.default_rng(70)
    for m in (1, None):
        kernel = build_dequant_matmul(scheme, 70, 96, m=m)
        for rows in (1,) if m == 1 else (1, 6):
            x = rng.standard_normal((rows, 96)).astype(np.float32)
            assert_close(kernel(x, pw), reference_matmul(x, pw))


def test_symbolic_m_runs_the_gemv_at_one_row() -> None:
    """The symbolic-M kernel is a dispatcher over two subroutines: one row goes to the GEMV
    (the same bits as the static M = 1 kernel), more rows to the GEMM (the same bits as a
    static M kernel). The two schedules round differently, which is what tells them apart."""
    scheme = QuantScheme(4, 64)
    n, k = 64, 512
    mod = primfunc(scheme, n, k, "llvm", m=None)
    assert {gv.name_hint for gv in mod.get_global_vars()} == {"main", "main_gemv", "main_gemm"}
    pw = random_packed(5, scheme, n, k)
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((1, k)).astype(np.float32)
    x4 = rng.standard_normal((4, k)).astype(np.float32)
    dispatch = build_dequant_matmul(scheme, n, k, m=None)
    gemv = build_dequant_matmul(scheme, n, k, m=1)(x1, pw)
    gemm = build_dequant_matmul(scheme, n, k, m=4)
    assert not np.array_equal(gemv, gemm(np.repeat(x1, 4, 0), pw)[:1])  # distinguishable
    np.testing.assert_array_equal(dispatch(x1, pw), gemv)
    np.testing.assert_array_equal(dispatch(x4, pw), gemm(x4, pw))
