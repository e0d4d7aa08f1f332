"""canonicalize-moe: replace each MoE region by one ``ai.modec::MoE`` node (docs/ir.md).

Reads: `MoELayers`. Writes: `CanonicalMoE` (the new nodes' names). Modifies: the graph.
The rewrite lives in `modec.moe.canonical`.

Rules:
1. Each region found by find-moe becomes one node whose inputs are the token states, the
   router weight (and bias) and the stacked expert weights per projection ``[E, N, K]``.
2. Fused gate/up weights are split into gate and up (concatenated or interleaved layouts).
3. Router, biases and shared-expert weights are marked ``modec.quantize = never``; routed
   expert weights ``expert``. The vision tower is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modec.facts import CanonicalMoE, MoELayers
from modec.moe.canonical import canonicalize_moe
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class CanonicalizeMoEPass(Pass):
    """Rewrite every MoE region into the canonical node; see the module docstring."""

    name = "canonicalize-moe"
    reads = (MoELayers,)
    writes = (CanonicalMoE,)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        nodes = canonicalize_moe(model, list(ctx.facts.get(MoELayers).regions))
        ctx.facts.put(CanonicalMoE(tuple(n.name or "" for n in nodes)))
        ctx.stat("replaced", len(nodes))
        ctx.section()["nodes"] = [n.name for n in nodes]
        return PassResult(model, modified=bool(nodes))
