"""find-moe: locate every MoE layer structurally (router → experts → combine).

Reads: nothing. Writes: ``moe.regions`` (``ctx.artifacts["moe.regions"]``: list of
`modec.moe.discover.MoERegion`). Modifies: nothing.

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
from modec.moe.discover import FindMoEOptions, MoERegion, find_moe
from modec.pipeline import Pass, PassContext, PassResult, register


def describe_region(r: MoERegion) -> dict[str, object]:
    """What the report and ``modec inspect`` show of one MoE layer."""
    ex = r.experts
    weights = {
        name: list(arr.shape)
        for name, arr in (("gate", ex.gate), ("up", ex.up), ("down", ex.down))
        if arr is not None
    }
    router = r.router
    return {
        "index": r.index,
        "name": r.name,
        "num_experts": r.num_experts,
        "top_k": r.top_k,
        "router": {
            "scoring": router.scoring,
            "norm_topk_prob": router.norm_topk_prob,
            "softmax_after_topk": router.softmax_after_topk,
            "n_group": router.n_group,
            "topk_group": router.topk_group,
            "routed_scaling_factor": router.routed_scaling_factor,
            "bias": router.bias is not None,
            "correction_bias": router.correction_bias is not None,
        },
        "form": r.form,
        "gate_layout": r.gate_layout,
        "activation": ex.activation,
        "weights": weights,
        "expert_parameters": int(sum(a.size for a in (ex.gate, ex.up, ex.down) if a is not None)),
        "shared_expert": None
        if r.shared is None
        else {"gated": r.shared.expert_gate is not None, "up": list(r.shared.weights.up.shape)},
        "nodes": len(r.nodes),
    }


@register
@dataclass
class FindMoEPass(Pass):
    """Find the MoE layers; see the module docstring."""

    name = "find-moe"
    writes = ("moe.regions",)
    min_experts: int = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        regions = find_moe(model, FindMoEOptions(min_experts=self.min_experts))
        if not regions:
            raise ModelError(
                f"no MoE layer found in graph {model.graph.name!r} (no TopK router fed by a "
                "constant [E, H] matmul); modec quantizes Mixture-of-Experts models only"
            )
        ctx.artifacts["moe.regions"] = regions
        ctx.stat("layers", len(regions))
        ctx.stat("experts", sum(r.num_experts for r in regions))
        ctx.section()["layers"] = [describe_region(r) for r in regions]
        return PassResult(model, modified=False)
