"""lower-tvm: compile the quantized model into a modec artifact (model.so + weights).

Reads: `CanonicalMoE` (the model's MoE layers are ``ai.modec::MoE`` nodes) and
`QuantizedExperts`. Writes: `Artifact` (the `modec.artifact.Manifest`). Modifies: nothing in
the graph (``modified=False``); the artifact goes to the run's ``artifact_dir``.

Rules:
1. Dense ops go through `modec.lowering.dense` (TVM Relax frontend + scheduled matmuls);
   an op the frontend cannot import raises `ModelError` naming the op and the node.
2. Every MoE node becomes the mixed-precision lowering of `modec.lowering.moe`: experts
   grouped by width, one grouped kernel per (width, projection), packed weights (layout
   `n16k32`) as parameters ``moe{l}.{proj}.w{bits}.codes|scale|zero``.
3. The router, biases, shared expert and the dense weights stay as stored, except those
   quantize-dense quantized (``quantized_dense``): their matmuls become dequant-matmul
   kernels over packed parameters ``dense.{weight}.codes|scale|zero``
   (`modec.lowering.dense_quant`). The dequantized initializers are not shipped.
4. The manifest gets a ``moe`` section (per-layer widths, width groups, group size,
   layout, byte sizes of codes / scales / zeros per group and projection) and a
   ``pipeline`` section (the run's pipeline text if the driver set it, and this pass's
   options).
5. ``target`` is ``llvm`` (this CPU) or a CUDA target (`check_target` refuses anything else
   before the driver's expensive passes). For CUDA the expert kernels take fp16 activations
   (cast around each projection) and the routing sort runs as one GPU thread; see
   docs/artifact.md for what can run such an artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modec.errors import UsageError
from modec.facts import Artifact, CanonicalMoE, QuantizedDense, QuantizedExperts
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class LowerTVMPass(Pass):
    """Build the artifact with mixed-precision MoE kernels; see the module docstring."""

    name = "lower-tvm"
    writes = (Artifact,)
    target: str = "llvm"
    #: lower the dense weights quantize-dense quantized (it must run before)
    quantized_dense: bool = False

    @property
    def reads(self) -> tuple[type, ...]:  # type: ignore[override]
        base: tuple[type, ...] = (CanonicalMoE, QuantizedExperts)
        return (*base, QuantizedDense) if self.quantized_dense else base

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.lowering.build import BUILD_STEPS
        from modec.lowering.lower import lower_model

        out = ctx.options.artifact_dir
        if not out:
            raise UsageError(
                "lower-tvm needs RunOptions.artifact_dir (the directory the artifact is "
                "written to); the compile driver sets it, a custom caller must too"
            )
        pipeline = {"lower-tvm": self.text()}
        if ctx.options.pipeline:
            pipeline["text"] = ctx.options.pipeline
        with ctx.bar(len(BUILD_STEPS), "kernel build") as bar:
            res = lower_model(
                model, ctx.facts.get(QuantizedExperts), out, self.target, pipeline=pipeline,
                step=lambda _name: bar.update(1),
                dense=ctx.facts.get(QuantizedDense) if self.quantized_dense else None,
            )  # fmt: skip
        ctx.facts.put(Artifact(res.manifest))
        ctx.stat("moe_layers", res.moe_layers)
        ctx.stat("moe_kernel_launches", res.moe_kernel_launches)
        ctx.stat("params", res.params)
        ctx.stat("packed_expert_bytes", res.packed_expert_bytes)
        ctx.section().update(
            target=self.target, moe_kernel_launches=res.moe_kernel_launches,
            packed_expert_bytes=res.packed_expert_bytes,
        )  # fmt: skip
        return PassResult(model, modified=False)
