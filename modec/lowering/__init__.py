"""Lowering to TVM: dense ONNX → Relax with scheduled kernels, and the artifact builder.

The submodules import TVM; this package module does not, so `import modec` stays light.

- `modec.lowering.lower`: `lower_model`, the whole of lower-tvm (plan, lower, build).
- `modec.lowering.onnx_import`: ONNX → Relax with detached weights and custom-op converters;
  the graph's shape computations are evaluated at import (`modec.lowering.shape_values`,
  `modec.lowering.shape_eval`) and the ops that take them as shapes converted by
  `modec.lowering.shape_ops`.
- `modec.lowering.dense`: hooks, dense matmul scheduling and the compile.
- `modec.lowering.moe_plan`: experts grouped by width and packed; the manifest ``moe``
  section (TVM-free).
- `modec.lowering.moe`: the MoE nodes as Relax calls of the grouped kernels;
  `modec.lowering.moe_sort` is its routing-sort TIR kernel.
- `modec.lowering.build`: the artifact.
- `modec.lowering.matmul_kernels`: the CPU matmul schedules.
- `modec.lowering.determinism`: a canonical order of the generated code.
- `modec.lowering.tiny_model`: a tiny ONNX decoder for tests and benchmarks, TVM-free.
"""

from __future__ import annotations
