"""Mixed-precision expert kernels: TVM TIR generated per (width, N, K).

This package imports TVM (`import modec` does not import it). The entry points:

* `dequant_matmul.primfunc(scheme, n, k, target, m)` and `grouped_moe.primfunc(scheme, n, k,
  num_experts, target)` return scheduled IRModules (entry PrimFunc `main`) for Relax
  `call_tir`; their module docstrings list argument order, shapes and dtypes. The CPU
  dequant-matmul for a symbolic M is a dispatcher over a GEMV and a GEMM subroutine
  (`subroutine`; build with its ``TIR_PIPELINE``).
* `grouped_moe_a8.primfunc` and `grouped_moe_a8.quant_primfunc`: the grouped MoE matmul with
  int8 activations (AVX-512 VNNI; ``--expert-act-bits 8``, docs/expert_activations.md) and the
  per-group quantization of its input rows.
* `build_dequant_matmul` / `build_grouped_moe_matmul` compile them for the CPU into callables
  that take numpy arrays or TVM tensors.
* `cuda.compile_fatbin` builds the CUDA variants with nvcc.

Weights use the `n16k32` layout of `modec.numerics.packing` (docs/packing.md).
"""

from __future__ import annotations

from modec.kernels.api import (
    DequantMatmul,
    GroupedMoEMatmul,
    build_dequant_matmul,
    build_grouped_moe_matmul,
)

__all__ = [
    "DequantMatmul",
    "GroupedMoEMatmul",
    "build_dequant_matmul",
    "build_grouped_moe_matmul",
]
