"""find-moe: locate every MoE layer structurally (router → experts → combine).

Reads: nothing. Writes: `MoELayers` (every `modec.moe.discover.MoERegion`). Modifies:
nothing. The structural matching lives in `modec.moe.discover`.

Rules (see `modec.moe.discover` for the patterns):
1. A router is a ``TopK`` with constant k (largest=1) fed, through Softmax / Sigmoid / Cast /
   Add / Reshape, by a MatMul or Gemm with a constant 2-D weight that has one dimension E.
2. The region runs from the router's input to the node that combines the weighted expert
   outputs; its expert form (stacked gather, dispatch, dense, If per expert) is classified.
3. A model without any MoE layer is an error: modec has nothing to quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modec.errors import ModelError
from modec.facts import MoELayers
from modec.moe.describe import describe_region
from modec.moe.discover import FindMoEOptions, find_moe
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class FindMoEPass(Pass):
    """Find the MoE layers; see the module docstring."""

    name = "find-moe"
    writes = (MoELayers,)
    min_experts: int = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        regions = find_moe(model, FindMoEOptions(min_experts=self.min_experts))
        if not regions:
            raise ModelError(
                f"no MoE layer found in graph {model.graph.name!r} (no TopK router fed by a "
                "constant [E, H] matmul); modec quantizes Mixture-of-Experts models only"
            )
        ctx.facts.put(MoELayers(tuple(regions)))
        ctx.stat("layers", len(regions))
        ctx.stat("experts", sum(r.num_experts for r in regions))
        ctx.section()["layers"] = [describe_region(r) for r in regions]
        return PassResult(model, modified=False)
