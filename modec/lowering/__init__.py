"""Lowering to TVM: dense ONNX → Relax with scheduled kernels, and the artifact builder.

The submodules import TVM; this package module does not, so `import modec` stays light.
`modec.lowering.dense` (import, hooks, dense scheduling, compile), `modec.lowering.build`
(the artifact), `modec.lowering.matmul_kernels` (the CPU matmul schedules) and
`modec.lowering.tiny_model` (a tiny ONNX decoder for tests and benchmarks, TVM-free).
"""

from __future__ import annotations
