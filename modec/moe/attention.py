"""find-attention: the self-attention of the decoder block that feeds each MoE node.

Walks back from the MoE node's hidden input through the residual stream, latest producer
first, stopping at the previous MoE node. The first match wins:

1. a ``Softmax`` whose result (through Cast/Dropout/Identity) is the left operand of a
   MatMul with a non-constant right operand (``probs @ V``): the attention probabilities
   ``[B, heads, Tq, Tk]``;
2. a fused attention op (``Attention``, ``com.microsoft`` ``MultiHeadAttention`` /
   ``GroupQueryAttention``): its Q and K inputs.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from modec.moe._graph import GraphIndex, is_const
from modec.moe.canonical import is_moe_node

log = logging.getLogger(__name__)

_FUSED = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


@dataclass(frozen=True, eq=False)
class AttentionTap:
    """Where to read the attention of the block feeding one MoE node.

    Attributes:
        moe_node: the canonical MoE node.
        kind: ``probs`` (a Softmax over keys) or ``qk`` (fused attention: Q and K).
        probs: the probabilities value for ``probs``.
        q / k: query and key values for ``qk``.
        node: the Softmax or fused attention node.
    """

    moe_node: ir.Node
    kind: Literal["probs", "qk"]
    node: ir.Node
    probs: ir.Value | None = None
    q: ir.Value | None = None
    k: ir.Value | None = None


def _is_attention_softmax(n: ir.Node) -> bool:
    v = n.outputs[0]
    for _ in range(3):
        users = [u.node for u in v.uses()]
        mms = [u for u in users if u.op_type == "MatMul" and u.inputs[0] is v]
        if mms:
            return all(not is_const(mm.inputs[1]) for mm in mms)
        nxt = [u for u in users if u.op_type in ("Cast", "Dropout", "Identity")]
        if len(nxt) != 1:
            return False
        v = nxt[0].outputs[0]
    return False


def find_attention(model: ir.Model) -> list[AttentionTap | None]:
    """For each canonical MoE node (graph order), the attention feeding it, or None.

    Also records the choice on the MoE node: ``metadata_props["modec.attention.kind"]`` and
    ``"modec.attention.probs"`` (or ``".q"`` / ``".k"``) value names.
    """
    index = GraphIndex(model.graph)
    taps: list[AttentionTap | None] = []
    for moe in [n for n in index.nodes if is_moe_node(n)]:
        tap = _search(index, moe)
        taps.append(tap)
        if tap is None:
            log.warning("find-attention: no attention found for %s", moe.name)
            continue
        moe.metadata_props["modec.attention.kind"] = tap.kind
        if tap.probs is not None:
            moe.metadata_props["modec.attention.probs"] = tap.probs.name or ""
        if tap.q is not None and tap.k is not None:
            moe.metadata_props["modec.attention.q"] = tap.q.name or ""
            moe.metadata_props["modec.attention.k"] = tap.k.name or ""
    return taps


def _search(index: GraphIndex, moe: ir.Node) -> AttentionTap | None:
    heap: list[tuple[int, int]] = []
    seen: set[ir.Node] = set()

    def push(v: ir.Value | None) -> None:
        p = index.producer(v)
        if p is not None and p not in seen:
            seen.add(p)
            heapq.heappush(heap, (-index.pos[p], id(p)))

    by_id = {id(n): n for n in index.nodes}
    push(moe.inputs[0])
    while heap:
        _, nid = heapq.heappop(heap)
        n = by_id[nid]
        if is_moe_node(n):
            continue
        if n.op_type == "Softmax" and _is_attention_softmax(n):
            return AttentionTap(moe, "probs", n, probs=n.outputs[0])
        if n.op_type in _FUSED:
            return AttentionTap(
                moe, "qk", n, q=n.inputs[0], k=n.inputs[1] if len(n.inputs) > 1 else None
            )
        for v in index.all_inputs(n):
            push(v)
    return None
