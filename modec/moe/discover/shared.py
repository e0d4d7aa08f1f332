"""Shared experts: an always-on FFN of the hidden input added to the routed output.

1. Its nodes are the cone of the value added to the combine output, within the dataflow of
   the hidden input.
2. A projection with one output column is the sigmoid gate on its output (Qwen2-MoE's
   ``shared_expert_gate``); the other projections are one FFN read like a routed expert.
"""

from __future__ import annotations

import onnx_ir as ir

from modec.errors import ModelError
from modec.moe import lazy
from modec.moe._graph import GraphIndex
from modec.moe.discover.common import linear_proj
from modec.moe.discover.ffn import assemble, classify_ffn, firsts_and_downs
from modec.moe.discover.region import ExpertWeights, SharedExpert
from modec.moe.lazy import LazyArray


def read_shared_expert(
    index: GraphIndex, value: ir.Value, h_fwd: set[ir.Node], name: str
) -> SharedExpert:
    """The shared expert that computes ``value``; ``h_fwd``: the hidden input's dataflow."""
    cone = index.backward([value]) & h_fwd
    allowed = set(cone)
    projs = [p for n in index.ordered(cone) for p in [linear_proj(n)] if p is not None]
    gate_w = None
    mlp = []
    for p in projs:
        if p.weight.shape[0] == 1:
            gate_w = lazy.to_float32(p.weight)  # [1, H]: small, read now
        else:
            mlp.append(p)
    firsts, downs = firsts_and_downs(mlp, allowed)
    if len(downs) != 1:
        raise ModelError(f"find-moe: MoE layer {name}: cannot read its shared expert")
    ffn = classify_ffn(firsts, downs[0], allowed, name)
    weights = assemble([ffn])
    weights = ExpertWeights(
        gate=weights.gate,
        up=_one_expert(weights.up),
        down=_one_expert(weights.down),
        activation=weights.activation, alpha=weights.alpha, limit=weights.limit,
    )  # fmt: skip
    return SharedExpert(weights, gate_w)


def _one_expert(w: LazyArray) -> LazyArray:
    """``w`` with a leading expert axis of 1."""
    return w.reshape((1, *w.shape)) if w.ndim == 2 else w
