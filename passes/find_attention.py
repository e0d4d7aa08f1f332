"""find-attention: the attention of the decoder block feeding each MoE layer.

Reads: ``moe.canonical``. Writes: ``moe.attention`` (``ctx.artifacts["moe.attention"]``: one
`modec.moe.attention.AttentionTap` or None per MoE node, in execution order). Modifies:
node metadata only (``modec.attention.*``), not the graph's computation.

Rules:
1. Prefer the Softmax over keys (probabilities ``[B, heads, Tq, Tk]``): kind ``probs``.
2. Fused attention ops give Q and K instead: kind ``qk``.
3. A layer whose attention cannot be located gets None; collect-routing then falls back to a
   hidden-state score for its key vision tokens and says so in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modec.moe.attention import find_attention
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class FindAttentionPass(Pass):
    """Locate the attention probabilities per MoE layer; see the module docstring."""

    name = "find-attention"
    reads = ("moe.canonical",)
    writes = ("moe.attention",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        taps = find_attention(model)
        ctx.artifacts["moe.attention"] = taps
        ctx.stat("found", sum(t is not None for t in taps))
        ctx.section()["layers"] = [
            None
            if t is None
            else {
                "kind": t.kind,
                "node": t.node.name,
                "value": (t.probs.name if t.probs is not None else None),
                "q": t.q.name if t.q is not None else None,
                "k": t.k.name if t.k is not None else None,
            }
            for t in taps
        ]
        return PassResult(model, modified=False)
