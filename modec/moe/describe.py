"""What the report and ``modec inspect`` show of one MoE layer found by `find_moe`."""

from __future__ import annotations

from modec.moe.discover import MoERegion


def describe_region(r: MoERegion) -> dict[str, object]:
    """One MoE layer as plain JSON: size, routing, expert form, weights, shared expert."""
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
