"""Router matching: the TopK that picks experts, its scoring chain and the routing spec.

1. A router is a ``TopK`` with ``largest=1`` and a constant k whose input comes, through
   Softmax / Sigmoid / Cast / Add(constant) / Where(masked fill) / Reshape, from a MatMul or
   Gemm with a constant 2-D weight that has E columns (E > k). An ``Add`` met before the
   scoring op (walking back from the TopK) is a score correction (DeepSeek-V3), one met after
   it is the router bias.
2. Several such TopKs on one router matmul are a group-limited router (DeepSeek-V3): the last
   one picks the experts, the earlier ones pick groups (`routing_spec` reads n_group and
   topk_group from them).
3. Between the TopK and the experts: a Softmax is softmax-after-top-k (GPT-OSS), a Div by a
   ReduceSum renormalizes the top-k weights, a Mul by a float scalar is the routed scaling
   factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.moe import lazy
from modec.moe._graph import SHAPE_OPS, GraphIndex, attr, const_array, const_lazy, is_const, scalar
from modec.moe.discover.common import LINEAR, initializer_names, is_expert_node, linear_weight
from modec.moe.discover.region import FindMoEOptions, RouterSpec, Scoring
from modec.moe.lazy import LazyArray


@dataclass
class Router:
    """A router candidate: its TopK, router matmul and the nodes between them (matmul first);
    ``weight`` ``[E, H]`` is read only for a router that `routing_spec` describes."""

    topk: ir.Node
    matmul: ir.Node
    chain: list[ir.Node]
    weight: LazyArray
    bias: np.ndarray | None
    correction_bias: np.ndarray | None
    scoring: Scoring | None
    k: int
    inits: list[str]


def router_of(topk: ir.Node, opts: FindMoEOptions) -> Router | None:
    """The router ``topk`` selects for (rule 1), or None when ``topk`` is not a router."""
    if int(attr(topk, "largest", 1)) != 1:
        return None
    k = scalar(topk.inputs[1]) if len(topk.inputs) > 1 else None
    if k is None:
        return None
    chain: list[ir.Node] = []
    cur = topk.inputs[0]
    bias: np.ndarray | None = None
    corr: np.ndarray | None = None
    scoring: Scoring | None = None
    inits: list[str] = []
    # Walking back from the TopK: an Add met before the Softmax/Sigmoid is a score
    # correction (DeepSeek-V3), one met after it (nearer the matmul) is the router bias.
    adds: list[tuple[np.ndarray, bool]] = []
    for _ in range(24):
        p = cur.producer() if cur is not None else None
        if p is None:
            return None
        if p.op_type in LINEAR:
            lw = linear_weight(p)
            if lw is None:
                return None
            w, _x = lw
            e = w.shape[0]
            if e < opts.min_experts or e <= k:
                return None
            if p.op_type == "Gemm" and len(p.inputs) > 2 and p.inputs[2] is not None:
                c = const_array(p.inputs[2])
                if c is not None and c.size == e:
                    bias = c.reshape(-1).astype(np.float32)
            inits += initializer_names(p.inputs[1:])
            for c, before_scoring in adds:
                if before_scoring and scoring is not None:
                    corr = c
                else:
                    bias = c if bias is None else bias + c
            return Router(topk, p, chain[::-1], w, bias, corr, scoring, int(k), inits)
        chain.append(p)
        if p.op_type in ("Softmax", "Sigmoid"):
            scoring = scoring or ("softmax" if p.op_type == "Softmax" else "sigmoid")
            cur = p.inputs[0]
        elif p.op_type in SHAPE_OPS:
            cur = p.inputs[0]
        elif p.op_type == "Add":
            ca, cb = const_array(p.inputs[0]), const_array(p.inputs[1])
            c, cur = (ca, p.inputs[1]) if ca is not None else (cb, p.inputs[0])
            if c is None:
                return None
            inits += initializer_names(p.inputs)
            adds.append((c.reshape(-1).astype(np.float32), scoring is None))
        elif p.op_type == "Where":
            a, b = p.inputs[1], p.inputs[2]
            if is_const(a):
                cur = b
            elif is_const(b):
                cur = a
            else:
                return None
        else:
            return None
    return None


def routing_spec(
    index: GraphIndex, router: Router, grouped: list[Router], nodes: tuple[ir.Node, ...],
    name: str,
) -> RouterSpec:  # fmt: skip
    """The routing of the region ``nodes`` (rules 2 and 3); ``grouped``: its group TopKs."""
    region = set(nodes)
    after = index.forward(router.topk.outputs, within=region)
    experts = [n for n in after if is_expert_node(n, router.matmul)]
    downstream = index.forward([v for n in experts for v in n.outputs], within=region)
    routing = [n for n in after if n not in downstream and n not in experts]
    # Stacked expert weights gathered by the chosen indices are not routing nodes.
    routing = [n for n in routing if n.op_type not in LINEAR]
    norm = False
    softmax_after = False
    scale = 1.0
    for n in routing:
        if n.op_type == "Softmax":
            softmax_after = True
        elif n.op_type == "Div":
            div_cone = index.backward([n.inputs[1]], within=region)  # type: ignore[list-item]
            if any(d.op_type == "ReduceSum" for d in div_cone):
                norm = True
        elif n.op_type == "Mul":
            for v in n.inputs:
                c = const_lazy(v)
                if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating):
                    scale *= float(np.asarray(c.numpy()).reshape(()))
    scoring = router.scoring
    if scoring is None:
        if not softmax_after:
            raise ModelError(
                f"find-moe: MoE layer {name}: router {router.topk.name!r} uses neither softmax "
                "nor sigmoid scores; modec supports softmax, softmax over the top-k, and "
                "sigmoid routers."
            )
        scoring = "softmax"
    n_group, topk_group = 1, 1
    if grouped:
        inner = [g for g in grouped if any(c.op_type == "Reshape" for c in g.chain)]
        if inner:
            reshape = next(c for c in inner[0].chain if c.op_type == "Reshape")
            shape = const_array(reshape.inputs[1])
            e = router.weight.shape[0]
            if shape is not None and len(shape) >= 2 and int(shape[-1]) > 0:
                n_group = e // int(shape[-1])
            # the group-selecting TopK sits between the in-group TopK and the router TopK.
            between = index.forward(inner[0].topk.outputs) & index.backward(
                [v for v in router.topk.inputs if v is not None]
            )
            ks = [
                k
                for t in between
                if t.op_type == "TopK"
                for k in [scalar(t.inputs[1])]
                if k is not None
            ]
            topk_group = int(ks[0]) if ks else n_group
    return RouterSpec(
        weight=lazy.to_float32(router.weight), bias=router.bias,
        correction_bias=router.correction_bias,
        scoring=scoring, norm_topk_prob=norm, softmax_after_topk=softmax_after,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
        initializers=tuple(router.inits),
    )  # fmt: skip
