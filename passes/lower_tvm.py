"""lower-tvm: compile the quantized model into a modec artifact (model.so + weights).

Reads: ``moe.canonical`` (the model's MoE layers are ``ai.modec::MoE`` nodes) and
``quantized`` (``ctx.artifacts["quantized"]``: `QuantizedExperts`). Writes: ``artifact``
(``ctx.artifacts["artifact"]``: the `modec.artifact.Manifest`). Modifies: nothing in the
graph (``modified=False``); the artifact goes to ``ctx.options["artifact_dir"]``.

Rules:
1. Dense ops go through `modec.lowering.dense` (TVM Relax frontend + scheduled matmuls);
   an op the frontend cannot import raises `ModelError` naming the op and the node.
2. Every MoE node becomes the mixed-precision lowering of `modec.lowering.moe`: experts
   grouped by width, one grouped kernel per (width, projection), packed weights (layout
   `n16k32`) as parameters ``moe{l}.{proj}.w{bits}.codes|scale|zero``.
3. The router, biases, shared expert and all dense weights stay fp32; the dequantized
   expert initializers of the graph are not shipped.
4. The manifest gets a ``moe`` section (per-layer widths, width groups, group size,
   layout, byte sizes of codes / scales / zeros per group and projection) and a
   ``pipeline`` section (the pipeline text from ``ctx.options["pipeline"]`` if the driver
   set it, and this pass's options).
5. ``target`` is ``llvm`` (this CPU) or a CUDA target (`check_target` refuses anything else
   before the driver's expensive passes). For CUDA the expert kernels take fp16 activations
   (cast around each projection) and the routing sort runs as one GPU thread; see
   docs/artifact.md for what can run such an artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from modec.errors import UsageError
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


def check_target(target: str) -> None:
    """Refuse a target modec cannot build for, before any expensive work.

    modec builds for ``llvm`` (this CPU; the default) and ``cuda`` (sm_90 unless a dict
    target says otherwise). Anything else would fail inside TVM after calibration and
    quantization, so it is a usage error here.
    """
    from modec.errors import ModecError
    from modec.kernels.target import resolve_target

    try:
        kind = str(resolve_target(target).kind.name)
    except ModecError as exc:
        raise UsageError(f"--target {target}: {exc}") from exc
    if kind not in ("llvm", "cuda"):
        raise UsageError(
            f"--target {target}: modec builds for 'llvm' (this CPU) or 'cuda', not {kind!r}"
        )


@register
@dataclass
class LowerTVMPass(Pass):
    """Build the artifact with mixed-precision MoE kernels; see the module docstring."""

    name = "lower-tvm"
    reads = ("moe.canonical", "quantized")
    writes = ("artifact",)
    target: str = "llvm"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.lowering.build import BUILD_STEPS, build_artifact
        from modec.lowering.moe import MoELowering, moe_section, plan_layers

        out = ctx.options.get("artifact_dir")
        if not out:
            raise UsageError(
                "lower-tvm needs ctx.options['artifact_dir'] (the directory the artifact is "
                "written to); the compile driver sets it, a custom caller must too"
            )
        check_target(self.target)
        quantized = ctx.artifacts["quantized"]
        plans = plan_layers(model, quantized)
        lowering = MoELowering(plans, self.target)
        pipeline: dict[str, Any] = {"lower-tvm": self.text()}
        if ctx.options.get("pipeline"):
            pipeline["text"] = str(ctx.options["pipeline"])
        moe = moe_section(plans)
        with ctx.bar(len(BUILD_STEPS), "kernel build") as bar:
            manifest = build_artifact(
                ir.to_proto(model),
                Path(out),
                self.target,
                hooks=[lowering.add_params],
                op_converters={"MoE": lowering.convert},
                sections={"moe": moe, "pipeline": pipeline},
                step=lambda _name: bar.update(1),
            )
        ctx.artifacts["artifact"] = manifest
        launches = sum(len(k) for k in lowering.kernels)
        ctx.stat("moe_layers", len(plans))
        ctx.stat("moe_kernel_launches", launches)
        ctx.stat("params", len(manifest.params))
        packed = sum(
            b for layer in moe["layers"] for g in layer["groups"]
            for sizes in g["bytes"].values() for b in sizes.values()
        )  # fmt: skip
        ctx.stat("packed_expert_bytes", packed)
        ctx.section().update(
            target=self.target, moe_kernel_launches=launches,
            packed_expert_bytes=packed,
        )  # fmt: skip
        log.info("lower-tvm: wrote %s (%d MoE kernel launches)", out, launches)
        return PassResult(model, modified=False)
