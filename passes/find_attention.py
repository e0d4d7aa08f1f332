"""find-attention: the attention of the decoder block feeding each MoE layer.

Reads: `CanonicalMoE`. Writes: `AttentionTaps` (one `modec.moe.attention.AttentionTap` or
None per MoE node, in execution order). Modifies: nothing. The search lives in
`modec.moe.attention`.

Rules:
1. Prefer the Softmax over keys (probabilities ``[B, heads, Tq, Tk]``): kind ``probs``.
2. Fused attention ops give Q and K instead: kind ``qk``.
3. A layer whose attention cannot be located gets None; collect-routing then falls back to a
   hidden-state score for its vision tokens and says so in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modec.facts import AttentionTaps, CanonicalMoE
from modec.moe.attention import find_attention
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class FindAttentionPass(Pass):
    """Locate the attention probabilities per MoE layer; see the module docstring."""

    name = "find-attention"
    reads = (CanonicalMoE,)
    writes = (AttentionTaps,)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        taps = find_attention(model)
        ctx.facts.put(AttentionTaps(tuple(taps)))
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
