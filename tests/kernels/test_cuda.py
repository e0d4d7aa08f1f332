"""CUDA variants: they build with nvcc here; correctness needs a GPU (marked `gpu`).

Without a GPU the numerics of the CUDA dense kernel are checked one step removed: its TE
definition (`cuda.dense_compute`), unscheduled, is compiled for the CPU and compared with
the numpy reference, so only TVM schedule primitives stand between it and the GPU kernel.
The grouped CUDA kernel is hand-written TIR (thread bindings, shared memory): only its
build and structure are checked here.
"""

from __future__ import annotations

import numpy as np
import pytest

from modec.numerics.packing import reference_grouped_matmul, reference_matmul
from modec.numerics.schemes import QuantScheme
from tests.kernels.conftest import random_packed

tvm = pytest.importorskip("tvm")

from modec.kernels import (  # noqa: E402
    build_dequant_matmul,
    build_grouped_moe_matmul,
    cuda,
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
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (64, 128))
def test_cuda_modules_build_with_nvcc(bits: int, group: int) -> None:
    tgt = resolve_target(CUDA_SM90)
    scheme = QuantScheme(bits, group)
    for mod in (
        dequant_matmul.primfunc(scheme, 37, 200, tgt, m=1),
        dequant_matmul.primfunc(scheme, 37, 200, tgt, m=None),
        grouped_moe.primfunc(scheme, 37, 200, 3, tgt),
    ):
        src = cuda_source(mod, tgt)
        assert "__global__" in src and "half" in src
        fatbin = compile_fatbin(mod, tgt)
        assert len(fatbin) > 1000


@needs_nvcc
@pytest.mark.parametrize("n,k", ((768, 2048), (2048, 768)))
def test_cuda_kernel_structure(n: int, k: int) -> None:
    """Decode kernels: K split over threadIdx.y with a reduction; grouped: no expert loop."""
    tgt = resolve_target(CUDA_SM90)
    scheme = QuantScheme(4, 128)
    gemv = cuda_source(dequant_matmul.primfunc(scheme, n, k, tgt, m=1), tgt)
    assert "threadIdx.y" in gemv and "__syncthreads" in gemv and "red_buf" in gemv
    assert "__shared__" in gemv  # x staged in shared memory
    grouped = cuda_source(grouped_moe.primfunc(scheme, n, k, 128, tgt, "int32"), tgt)
    assert "blockIdx.y" in grouped and "__syncthreads" in grouped
    assert "for (int e" not in grouped  # each block serves one expert
    assert len(compile_fatbin(grouped_moe.primfunc(scheme, n, k, 128, tgt), tgt)) > 1000


@needs_nvcc
@pytest.mark.slow
def test_cuda_dense_4096_builds() -> None:
    tgt = resolve_target(CUDA_SM90)
    for bits in (2, 3, 4):
        for m in (1, None):
            mod = dequant_matmul.primfunc(QuantScheme(bits, 128), 4096, 4096, tgt, m=m)
            assert len(compile_fatbin(mod, tgt)) > 1000


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("m", (1, 5))
def test_cuda_dense_definition_matches_reference_on_cpu(bits: int, m: int) -> None:
    """The TE compute the CUDA schedule transforms, compiled unscheduled for the CPU."""
    scheme = QuantScheme(bits, 64)
    n, k = 37, 200
    m_tile = 1 if m == 1 else cuda.M_TILE
    args = cuda.dense_compute(scheme, n, k, m, m_tile)
    func = tvm.te.create_prim_func(args).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    pw = random_packed(bits, scheme, n, k)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((m, k)).astype(np.float16)
    dev = tvm.cpu()
    y = tvm.runtime.empty((m, n), "float16", dev)
    ex(*(tvm.runtime.tensor(a, dev) for a in (x, pw.codes, pw.scale, pw.zero)), y)
    want = reference_matmul(x.astype(np.float32), pw)
    np.testing.assert_allclose(
        y.numpy().astype(np.float32), want, rtol=2e-3, atol=2e-3 * abs(want).max()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_runtime(), reason="no CUDA GPU / TVM without CUDA runtime")
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_cuda_kernels_match_reference(bits: int) -> None:
    scheme = QuantScheme(bits, 64)
    rng = np.random.default_rng(bits)
    pw = random_packed(bits, scheme, 37, 200)
    x = rng.standard_normal((5, 200)).astype(np.float16)
    for m in (None, 1):
        xm = x if m is None else x[:1]
        y = build_dequant_matmul(scheme, 37, 200, target=CUDA_SM90, m=m)(xm, pw)
        want = reference_matmul(xm.astype(np.float32), pw)
        np.testing.assert_allclose(
            y.astype(np.float32), want, rtol=2e-2, atol=2e-2 * abs(want).max()
        )
    stacked = random_packed(bits + 1, scheme, 37, 200, experts=3)
    kernel = build_grouped_moe_matmul(scheme, 37, 200, 3, target=CUDA_SM90)
    # Multi-token tiles (5 = 4 + 1), one token per expert, and a range that starts past
    # row 0 (another width group's rows before it stay untouched).
    for indptr in ([0, 2, 2, 5], [0, 5, 5, 5], [0, 1, 2, 3], [1, 2, 2, 4]):
        y = kernel(x, np.array(indptr), stacked)
        want = reference_grouped_matmul(x.astype(np.float32), np.array(indptr), stacked)
        np.testing.assert_allclose(
            y.astype(np.float32), want, rtol=2e-2, atol=2e-2 * abs(want).max()
        )
