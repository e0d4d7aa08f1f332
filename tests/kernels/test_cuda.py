"""CUDA variants: they build with nvcc here; correctness needs a GPU (marked `gpu`)."""

from __future__ import annotations

import numpy as np
import pytest

from modec.numerics.packing import reference_grouped_matmul, reference_matmul
from modec.numerics.schemes import QuantScheme
from tests.kernels.conftest import random_packed

tvm = pytest.importorskip("tvm")

from modec.kernels import (  # noqa: E402  # noqa: E402
    build_dequant_matmul,
    build_grouped_moe_matmul,
    dequant_matmul,
    grouped_moe,
)
from modec.kernels.cuda import compile_fatbin, cuda_source, nvcc_available  # noqa: E402
from modec.kernels.target import CUDA_SM90, resolve_target  # noqa: E402

needs_nvcc = pytest.mark.skipif(not nvcc_available(), reason="nvcc not installed")


def _gpu_runtime() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # TVM built without CUDA raises instead of answering False
        return False


@needs_nvcc
@pytest.mark.parametrize("bits", (3, 4))
def test_cuda_modules_build_with_nvcc(bits: int) -> None:
    tgt = resolve_target(CUDA_SM90)
    scheme = QuantScheme(bits, 64)
    for mod in (
        dequant_matmul.primfunc(scheme, 37, 200, tgt, m=1),
        dequant_matmul.primfunc(scheme, 37, 200, tgt, m=None),
        grouped_moe.primfunc(scheme, 37, 200, 3, tgt),
    ):
        src = cuda_source(mod, tgt)
        assert "__global__" in src and "half" in src
        fatbin = compile_fatbin(mod, tgt)
        assert len(fatbin) > 1000


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_runtime(), reason="no CUDA GPU / TVM without CUDA runtime")
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_cuda_kernels_match_reference(bits: int) -> None:
    scheme = QuantScheme(bits, 64)
    rng = np.random.default_rng(bits)
    pw = random_packed(bits, scheme, 37, 200)
    x = rng.standard_normal((5, 200)).astype(np.float16)
    y = build_dequant_matmul(scheme, 37, 200, target=CUDA_SM90)(x, pw)
    want = reference_matmul(x.astype(np.float32), pw)
    np.testing.assert_allclose(y.astype(np.float32), want, rtol=2e-2, atol=2e-2 * abs(want).max())
    stacked = random_packed(bits + 1, scheme, 37, 200, experts=3)
    indptr = np.array([0, 2, 2, 5])
    y = build_grouped_moe_matmul(scheme, 37, 200, 3, target=CUDA_SM90)(x, indptr, stacked)
    want = reference_grouped_matmul(x.astype(np.float32), indptr, stacked)
    np.testing.assert_allclose(y.astype(np.float32), want, rtol=2e-2, atol=2e-2 * abs(want).max())
