"""Compiled, callable kernels for the CPU (and CUDA modules where TVM has a CUDA runtime)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm

from modec.errors import BadInputError
from modec.kernels import dequant_matmul, grouped_moe, subroutine
from modec.kernels.cuda import nvcc_compile_mode
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.numerics.packing import PackedWeight
from modec.numerics.schemes import QuantScheme

logger = logging.getLogger(__name__)


def _compile(mod: tvm.IRModule, target: tvm.target.Target, what: str) -> Any:
    start = time.perf_counter()
    if is_cuda(target):
        with nvcc_compile_mode(), target:
            ex = tvm.compile(mod, target=target)
    else:
        ex = tvm.compile(mod, target=target, tir_pipeline=subroutine.TIR_PIPELINE)
    logger.debug(
        "compiled %s for %s in %.2f s", what, target.kind.name, time.perf_counter() - start
    )
    return ex


def _device(target: tvm.target.Target) -> Any:
    return tvm.cuda() if is_cuda(target) else tvm.cpu()


def _as_tensor(a: Any, dev: Any) -> Any:
    return tvm.runtime.tensor(np.ascontiguousarray(a), dev) if isinstance(a, np.ndarray) else a


@dataclass(frozen=True)
class DequantMatmul:
    """A compiled Y = X · dequant(W)ᵀ for one (scheme, N, K).

    Call with (x, packed) where x is [M, K] and packed a `PackedWeight`, or with the raw
    argument list of the PrimFunc (x, codes, scale, zero, y) as TVM tensors.
    """

    scheme: QuantScheme
    n: int
    k: int
    m: int | None
    target: tvm.target.Target
    executable: Any

    def __call__(self, x: Any, packed: PackedWeight | None = None, *rest: Any) -> Any:
        if packed is None or rest:
            raise BadInputError("call as kernel(x, packed) or kernel.run(x, codes, scale, zero, y)")
        if (packed.scheme, packed.n, packed.k) != (self.scheme, self.n, self.k):
            raise BadInputError(
                f"kernel built for {self.scheme.name} N={self.n} K={self.k}; got "
                f"{packed.scheme.name} N={packed.n} K={packed.k}"
            )
        dev = _device(self.target)
        xt = _as_tensor(x, dev)
        y = tvm.runtime.empty((int(xt.shape[0]), self.n), str(xt.dtype), dev)
        self.run(xt, *(_as_tensor(a, dev) for a in (packed.codes, packed.scale, packed.zero)), y)
        return y.numpy()

    def run(self, *args: Any) -> None:
        """Run the PrimFunc on its argument list (x, codes, scale, zero, y)."""
        self.executable(*args)


@dataclass(frozen=True)
class GroupedMoEMatmul:
    """A compiled grouped MoE matmul for E experts of one (scheme, N, K).

    Call with (x, indptr, packed) where x is [T, K] sorted by expert, indptr [E + 1] and
    packed a stacked `PackedWeight` [E, N, K]; returns Y [T, N].
    """

    scheme: QuantScheme
    n: int
    k: int
    num_experts: int
    index_dtype: str
    target: tvm.target.Target
    executable: Any

    def __call__(self, x: Any, indptr: Any, packed: PackedWeight) -> Any:
        if (packed.scheme, packed.n, packed.k, packed.num_experts) != (
            self.scheme,
            self.n,
            self.k,
            self.num_experts,
        ):
            raise BadInputError(
                f"kernel built for {self.num_experts} experts {self.scheme.name} N={self.n} "
                f"K={self.k}; got {packed.num_experts} experts {packed.scheme.name} "
                f"N={packed.n} K={packed.k}"
            )
        dev = _device(self.target)
        xt = _as_tensor(x, dev)
        ip = _as_tensor(np.asarray(indptr, dtype=self.index_dtype), dev)
        y = tvm.runtime.tensor(np.zeros((int(xt.shape[0]), self.n), str(xt.dtype)), dev)
        self.run(
            xt, ip, *(_as_tensor(a, dev) for a in (packed.codes, packed.scale, packed.zero)), y
        )
        return y.numpy()

    def run(self, *args: Any) -> None:
        """Run the PrimFunc on its argument list (x, indptr, codes, scale, zero, y)."""
        self.executable(*args)


@functools.lru_cache(maxsize=256)
def _build_dense(scheme: QuantScheme, n: int, k: int, target_json: str, m: int | None) -> Any:
    tgt = tvm.target.Target(target_json)
    mod = dequant_matmul.primfunc(scheme, n, k, tgt, m=m)
    return _compile(mod, tgt, f"dequant_matmul {scheme.name} n={n} k={k} m={m}")


@functools.lru_cache(maxsize=256)
def _build_grouped(
    scheme: QuantScheme, n: int, k: int, e: int, target_json: str, index_dtype: str
) -> Any:
    tgt = tvm.target.Target(target_json)
    mod = grouped_moe.primfunc(scheme, n, k, e, tgt, index_dtype)
    return _compile(mod, tgt, f"grouped_moe {scheme.name} n={n} k={k} e={e}")


def _key(target: tvm.target.Target) -> str:
    return str(target)


def build_dequant_matmul(
    scheme: QuantScheme, n: int, k: int, target: TargetLike = "llvm", m: int | None = None
) -> DequantMatmul:
    """Compile the dequant-matmul for (scheme, N, K); cached per arguments.

    Args:
        scheme: width and group size.
        n: output features N.
        k: reduction length K.
        target: "llvm" (this CPU, fp32) or a CUDA target (fp16; needs TVM with CUDA runtime).
        m: 1 for the GEMV (decode) schedule, None for symbolic M (GEMM schedule).
    """
    tgt = resolve_target(target)
    ex = _build_dense(scheme, n, k, _key(tgt), m)
    return DequantMatmul(scheme, n, k, m, tgt, ex)


def build_grouped_moe_matmul(
    scheme: QuantScheme,
    n: int,
    k: int,
    num_experts: int,
    target: TargetLike = "llvm",
    index_dtype: str = "int64",
) -> GroupedMoEMatmul:
    """Compile the grouped MoE matmul for E experts of (scheme, N, K); cached per arguments."""
    tgt = resolve_target(target)
    ex = _build_grouped(scheme, n, k, num_experts, _key(tgt), index_dtype)
    return GroupedMoEMatmul(scheme, n, k, num_experts, index_dtype, tgt, ex)
