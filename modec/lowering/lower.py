"""Lower a canonical, quantized MoE model into a modec artifact (model.so + weights).

`lower_model` is the whole of lower-tvm without the pass plumbing, so that the pass, the
benchmarks and the tests call one function:

1. `modec.kernels.target.check_target` refuses a target modec cannot build for.
2. `modec.lowering.moe_plan.plan_layers` groups every MoE layer's experts by width and
   packs their codes; `modec.lowering.moe.MoELowering` turns each ``ai.modec::MoE`` node
   into the mixed-precision Relax of the grouped kernels.
3. `modec.lowering.build.build_artifact` imports the rest of the graph (dense ops, fp32),
   compiles and writes the artifact with the ``moe`` and ``pipeline`` manifest sections.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from modec.artifact import Manifest
from modec.facts import QuantizedExperts
from modec.kernels.target import check_target
from modec.lowering.build import build_artifact
from modec.lowering.moe import MoELowering
from modec.lowering.moe_plan import moe_section, plan_layers

__all__ = ["LoweringResult", "lower_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweringResult:
    """What `lower_model` wrote and the counters the lower-tvm pass reports.

    Attributes:
        manifest: the written artifact's manifest.
        moe_layers: MoE layers lowered.
        moe_kernel_launches: grouped-kernel launches over all layers (one per width group
            and projection).
        params: number of parameters in the artifact.
        packed_expert_bytes: bytes of the packed experts (codes, scales and zeros).
    """

    manifest: Manifest
    moe_layers: int
    moe_kernel_launches: int
    params: int
    packed_expert_bytes: int


def lower_model(
    model: ir.Model,
    quantized: QuantizedExperts,
    out_dir: str | os.PathLike[str],
    target: str,
    *,
    pipeline: Mapping[str, str],
    step: Callable[[str], None] | None = None,
) -> LoweringResult:
    """Compile the canonical model with its quantized experts into an artifact directory.

    Args:
        model: the canonical model (MoE layers are ``ai.modec::MoE`` nodes); not modified.
        quantized: the codes of every expert projection, one width per expert.
        out_dir: the artifact directory (written atomically).
        target: ``llvm`` (this CPU) or a CUDA target (``cuda``: fp16 expert kernels).
        pipeline: the manifest's ``pipeline`` section (e.g. the pipeline text and the
            lower-tvm options), recorded as given.
        step: called with the name of each `modec.lowering.build.BUILD_STEPS` phase once
            it is done (progress bars).

    Returns:
        The manifest and the lowering counters.

    Raises:
        UsageError: the target is not one modec builds for.
        ModelError: the quantized experts do not match the model's MoE layers, or an op
            cannot be imported.
    """
    check_target(target)
    plans = plan_layers(model, quantized)
    lowering = MoELowering(plans, target)
    moe = moe_section(plans)
    manifest = build_artifact(
        ir.to_proto(model),
        Path(out_dir),
        target,
        hooks=[lowering.add_params],
        op_converters={"MoE": lowering.convert},
        sections={"moe": moe, "pipeline": dict(pipeline)},
        step=step,
    )
    launches = sum(len(k) for k in lowering.kernels)
    packed = sum(
        b for layer in moe["layers"] for g in layer["groups"]
        for sizes in g["bytes"].values() for b in sizes.values()
    )  # fmt: skip
    logger.info("lower-tvm: wrote %s (%d MoE kernel launches)", out_dir, launches)
    return LoweringResult(
        manifest=manifest,
        moe_layers=len(plans),
        moe_kernel_launches=launches,
        params=len(manifest.params),
        packed_expert_bytes=packed,
    )
