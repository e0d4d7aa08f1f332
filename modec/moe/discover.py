"""find-moe: locate every Mixture-of-Experts layer of an ONNX graph by its structure.

Reads the graph only; never relies on value or node names (the dynamo optimizer renames
initializers), only on dataflow and constants.

Rules, in order:

1. A router is a ``TopK`` with ``largest=1`` and a constant k whose input comes, through
   Softmax / Sigmoid / Cast / Add(constant) / Where(masked fill) / Reshape, from a MatMul or
   Gemm with a constant 2-D weight that has E columns (E > k). Several such TopKs on one
   router matmul are a group-limited router (DeepSeek-V3): the last one picks the experts,
   the earlier ones pick groups.
2. The hidden input is the router matmul's input, walked back through Reshape/Flatten/Cast.
3. The combine output is the first single value that all dataflow from the TopK passes
   through once an expert matmul has run, extended through Reshape / ReduceSum / Squeeze and
   an ``Add`` of a shared expert computed from the hidden input alone.
4. The region is ``forward(hidden) ∩ backward(output)``; it must read no float value from
   outside besides the hidden input.
5. The experts are classified as stacked gather (``Gather/GatherND`` over ``[E, N, K]``), or
   per-expert chains (dispatch, dense sparse-gate, ``If`` per expert) whose expert index comes
   from an ``Equal(idx, e)``, a gate column ``e`` or a position in a stack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.moe._graph import (
    SHAPE_OPS,
    GraphIndex,
    attr,
    const_array,
    direct_users,
    fine_backward,
    fine_forward,
    fine_forward_from,
    name_scope,
    scalar,
    shape_only,
    subgraph_nodes,
)

log = logging.getLogger(__name__)

ExpertForm = Literal["stacked_gather", "dispatch", "dense_add", "dense_einsum", "if_per_expert"]
GateLayout = Literal["separate", "concatenated", "interleaved", "none"]
Activation = Literal["silu", "gelu", "gpt_oss"]
Scoring = Literal["softmax", "sigmoid"]

_LINEAR = frozenset({"MatMul", "Gemm"})
_ACT_OPS = frozenset({"Sigmoid", "Erf", "Tanh", "Gelu", "Swish", "HardSwish"})
_RERUN_HINT = (
    'Re-export the model with experts_implementation="batched_mm" '
    '(model.set_experts_implementation("batched_mm") in transformers) and either exporter.'
)


@dataclass(frozen=True)
class FindMoEOptions:
    """Options of find-moe.

    Attributes:
        min_experts: routers over fewer experts than this are ignored.
    """

    min_experts: int = 2


@dataclass(frozen=True, eq=False)
class RouterSpec:
    """How a MoE layer picks experts and weights them.

    Attributes:
        weight: router weight ``[E, H]`` (``logits = x · weightᵀ + bias``).
        bias: router bias ``[E]`` or None.
        correction_bias: score correction added before top-k only (DeepSeek-V3) or None.
        scoring: softmax or sigmoid over the E logits.
        norm_topk_prob: the k chosen weights are divided by their sum.
        softmax_after_topk: softmax over the top-k logits (GPT-OSS) instead of over all E.
        n_group: expert groups for group-limited routing (1 = none).
        topk_group: groups kept per token.
        routed_scaling_factor: multiplies the final routing weights.
        initializers: names of the graph constants that hold the router parameters.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    correction_bias: np.ndarray | None
    scoring: Scoring
    norm_topk_prob: bool
    softmax_after_topk: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    initializers: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """Stacked expert weights in ``nn.Linear`` convention ``W[N, K]`` (y = x·Wᵀ).

    Attributes:
        gate: ``[E, I, H]`` or None when not gated.
        up: ``[E, I, H]``.
        down: ``[E, H, I]``.
        gate_bias / up_bias / down_bias: ``[E, I]`` / ``[E, I]`` / ``[E, H]`` or None.
        activation: silu, gelu (erf) or gpt_oss (clamped SwiGLU with alpha and limit).
        alpha / limit: GPT-OSS activation constants (0 otherwise).
    """

    gate: np.ndarray | None
    up: np.ndarray
    down: np.ndarray
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    activation: Activation = "silu"
    alpha: float = 0.0
    limit: float = 0.0

    @property
    def gated(self) -> bool:
        """True for GLU experts (act(gate) · up)."""
        return self.gate is not None


@dataclass(frozen=True, eq=False)
class SharedExpert:
    """An always-on expert added to the routed output (Qwen2-MoE, DeepSeek-V3).

    Attributes:
        weights: its projections with a leading expert axis of 1.
        expert_gate: ``[1, H]`` weight of a sigmoid gate on its output, or None.
    """

    weights: ExpertWeights
    expert_gate: np.ndarray | None


@dataclass(frozen=True, eq=False)
class MoERegion:
    """One MoE layer found in the graph.

    Attributes:
        index: position among the MoE layers, in graph order.
        name: the module path when the exporter recorded one, else ``moe.<index>``.
        nodes: the top-level nodes of the region, in graph order.
        hidden: the value the layer reads, ``[..., H]``.
        output: the value the layer produces, same shape as ``hidden``.
        num_experts / top_k: E and k.
        router: routing specification and weights.
        form: how the experts are written in the graph.
        gate_layout: how gate and up projections are stored.
        experts: the stacked expert weights.
        shared: the shared expert, if any.
        topk_node: the router's TopK node.
    """

    index: int
    name: str
    nodes: tuple[ir.Node, ...]
    hidden: ir.Value
    output: ir.Value
    num_experts: int
    top_k: int
    router: RouterSpec
    form: ExpertForm
    gate_layout: GateLayout
    experts: ExpertWeights
    shared: SharedExpert | None
    topk_node: ir.Node
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- routers


@dataclass
class _Router:
    topk: ir.Node
    matmul: ir.Node
    chain: list[ir.Node]
    weight: np.ndarray
    bias: np.ndarray | None
    correction_bias: np.ndarray | None
    scoring: Scoring | None
    k: int
    inits: list[str]


def _linear_weight(node: ir.Node) -> tuple[np.ndarray, ir.Value] | None:
    """``(W[N, K], data input)`` of a MatMul/Gemm with a constant 2-D weight, else None."""
    if node.op_type not in _LINEAR or len(node.inputs) < 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    wa, wb = const_array(a), const_array(b)
    if node.op_type == "Gemm":
        if wb is None or wa is not None or wb.ndim != 2 or a is None:
            return None
        if attr(node, "transA", 0):
            return None
        w = wb if attr(node, "transB", 0) else wb.T
        alpha = float(attr(node, "alpha", 1.0))
        return (w * alpha).astype(np.float32), a
    if wb is not None and wa is None and wb.ndim == 2 and a is not None:
        return wb.T.astype(np.float32), a
    return None


def _linear_bias(node: ir.Node, index: GraphIndex) -> tuple[np.ndarray | None, ir.Value]:
    """Bias of a linear node (Gemm C or a following Add of a constant) and the output after it."""
    out = node.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        if c is not None:
            beta = float(attr(node, "beta", 1.0))
            return (c.reshape(-1) * beta).astype(np.float32), out
    users = [u.node for u in out.uses()]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        c = const_array(other)
        if c is not None:
            return c.reshape(-1).astype(np.float32), add.outputs[0]
    return None, out


def _initializer_names(values: Iterable[ir.Value | None]) -> list[str]:
    names = []
    for v in values:
        if v is not None and v.is_initializer() and v.name:
            names.append(v.name)
    return names


def _router_of(topk: ir.Node, index: GraphIndex, opts: FindMoEOptions) -> _Router | None:
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
        if p.op_type in _LINEAR:
            lw = _linear_weight(p)
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
            inits += _initializer_names(p.inputs[1:])
            for c, before_scoring in adds:
                if before_scoring and scoring is not None:
                    corr = c
                else:
                    bias = c if bias is None else bias + c
            return _Router(topk, p, chain[::-1], w, bias, corr, scoring, int(k), inits)
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
            inits += _initializer_names(p.inputs)
            adds.append((c.reshape(-1).astype(np.float32), scoring is None))
        elif p.op_type == "Where":
            a, b = p.inputs[1], p.inputs[2]
            if const_array(a) is not None:
                cur = b
            elif const_array(b) is not None:
                cur = a
            else:
                return None
        else:
            return None
    return None


# --------------------------------------------------------------------------- regions


def _cut_after_experts(
    index: GraphIndex, topk: ir.Node, reach: set[ir.Node], is_expert: Callable[[ir.Node], bool]
) -> ir.Value | None:
    """First value all dataflow from ``topk`` passes through after an expert node ran."""
    remaining: dict[ir.Value, int] = {}
    open_vals: set[ir.Value] = set()

    def add_outputs(n: ir.Node) -> None:
        for v in n.outputs:
            cons = index.consumers(v)
            if cons or v.is_graph_output():
                remaining[v] = len(cons) + (1 if v.is_graph_output() else 0)
                open_vals.add(v)

    add_outputs(topk)
    seen_expert = False
    for n in index.ordered(reach):
        for v in index.all_inputs(n):
            if v in open_vals:
                remaining[v] -= 1
                if remaining[v] == 0:
                    open_vals.discard(v)
        add_outputs(n)
        seen_expert = seen_expert or is_expert(n)
        if seen_expert and len(open_vals) == 1:
            return next(iter(open_vals))
    return None


def _is_expert_node(n: ir.Node, router_mm: ir.Node) -> bool:
    if n is router_mm:
        return False
    if n.op_type == "If" or n.op_type == "Loop":
        return any(s.op_type in _LINEAR for s in subgraph_nodes(n))
    if n.op_type in _LINEAR:
        return True
    return n.op_type == "Einsum"


def _region_name(router: _Router, i: int) -> str:
    for n in (router.matmul, router.topk):
        scope = name_scope(n)
        if scope:
            parts = scope.split(".")
            # the router module sits inside the MoE block: report the block.
            return ".".join(parts[:-1]) if len(parts) > 1 else scope
    return f"moe.{i}"


def _ins(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None]


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def find_moe(model: ir.Model, options: FindMoEOptions | None = None) -> list[MoERegion]:
    """Find every MoE layer of ``model``'s main graph.

    Args:
        model: the model; it is not modified.
        options: detection options.

    Returns:
        The MoE regions in graph order.

    Raises:
        ModelError: a router was found but its experts are written in a form modec cannot
            canonicalize (the message names the layer, the form and how to re-export).
    """
    opts = options or FindMoEOptions()
    graph = model.graph
    index = GraphIndex(graph)
    cands = [
        r for n in index.nodes if n.op_type == "TopK" for r in [_router_of(n, index, opts)] if r
    ]
    by_mm: dict[ir.Node, list[_Router]] = {}
    for r in cands:
        by_mm.setdefault(r.matmul, []).append(r)
    regions: list[MoERegion] = []
    for mm in index.ordered(by_mm):
        group = by_mm[mm]
        finals = [
            r for r in group
            if not any(o is not r and r.topk in index.backward(_ins(o.topk)) for o in group)
        ]  # fmt: skip
        router = max(finals, key=lambda r: index.pos[r.topk])
        grouped = [r for r in group if r is not router]
        region = _build_region(index, router, grouped, len(regions))
        if region is not None:
            regions.append(region)
    log.info("find-moe: %d MoE layer(s)", len(regions))
    return regions


def _build_region(
    index: GraphIndex, router: _Router, grouped: list[_Router], i: int
) -> MoERegion | None:
    name = _region_name(router, i)
    x_r = router.matmul.inputs[0]
    assert x_r is not None
    h_chain = [x_r]
    while True:
        p = h_chain[-1].producer()
        if p is None or p.op_type not in ("Reshape", "Flatten", "Cast", "Identity"):
            break
        h_chain.append(p.inputs[0])  # type: ignore[arg-type]
    h0 = h_chain[-1]
    reach = index.forward(router.topk.outputs)
    # Dataflow "after an expert ran": downstream of any non-router projection of the hidden
    # input (dense forms run the experts outside the routed dataflow).
    h_fwd = index.forward([h0])
    experts_all = {n for n in h_fwd if _is_expert_node(n, router.matmul)}
    expert_fed = experts_all | index.forward([v for n in experts_all for v in n.outputs])

    def after_expert(n: ir.Node) -> bool:
        if n in experts_all:
            return True
        return any(index.producer(v) in expert_fed for v in index.all_inputs(n))

    cut = _cut_after_experts(index, router.topk, reach, after_expert)
    if cut is None:
        log.warning("find-moe: router %s has no single combine value; skipped", name)
        return None
    topk_fwd = reach
    h_bwd = index.backward([h0])
    out = cut
    shared_val: ir.Value | None = None
    while not out.is_graph_output():
        cons = index.consumers(out)
        if len(cons) != 1:
            break
        c = cons[0]
        if c.op_type in (
            "Reshape",
            "ReduceSum",
            "Squeeze",
            "Unsqueeze",
            "Cast",
            "Identity",
            "Flatten",
        ):
            if c.inputs[0] is not out:
                break
            out = c.outputs[0]
        elif c.op_type == "Add" and shared_val is None:
            other = c.inputs[1] if c.inputs[0] is out else c.inputs[0]
            p = index.producer(other)
            if other is None or p is None or p not in h_fwd or p in topk_fwd or p in h_bwd:
                break
            shared_val = other
            out = c.outputs[0]
        else:
            break
    # The hidden value: the one of the reshape chain with the output's rank.
    hidden = h0
    r_out = _rank(out)
    if r_out is not None and _rank(h0) != r_out:
        for v in h_chain:
            if _rank(v) == r_out:
                hidden = v
                break
    region_set = index.forward([hidden]) & (index.backward([out]) | {index.producer(out)})
    region_set.discard(None)
    nodes = tuple(index.ordered(region_set))
    produced = {v for n in nodes for v in n.outputs}
    for n in nodes:
        for v in index.all_inputs(n):
            if v in produced or v is hidden or shape_only(v):
                continue
            if v.dtype is not None and v.dtype.is_floating_point():
                raise ModelError(
                    f"find-moe: MoE layer {name} reads {v.name!r} besides its hidden input "
                    f"{hidden.name!r}; modec cannot cut it out as one MoE node. {_RERUN_HINT}"
                )
    allowed_fine = set(nodes) | {s for n in nodes for s in subgraph_nodes(n)}
    spec = _routing_spec(index, router, grouped, nodes, allowed_fine, name)
    experts, form, layout = _experts(index, router, nodes, allowed_fine, name, shared_val)
    shared = None
    if shared_val is not None:
        shared = _shared_expert(index, shared_val, h_fwd, router, name)
    return MoERegion(
        index=i, name=name, nodes=nodes, hidden=hidden, output=out,
        num_experts=router.weight.shape[0], top_k=router.k, router=spec, form=form,
        gate_layout=layout, experts=experts, shared=shared, topk_node=router.topk,
    )  # fmt: skip


# --------------------------------------------------------------------------- routing spec


def _routing_spec(
    index: GraphIndex, router: _Router, grouped: list[_Router], nodes: tuple[ir.Node, ...],
    allowed: set[ir.Node], name: str,
) -> RouterSpec:  # fmt: skip
    region = set(nodes)
    after = index.forward(router.topk.outputs, within=region)
    experts = [n for n in after if _is_expert_node(n, router.matmul)]
    downstream = index.forward([v for n in experts for v in n.outputs], within=region)
    routing = [n for n in after if n not in downstream and n not in experts]
    # Stacked expert weights gathered by the chosen indices are not routing nodes.
    routing = [n for n in routing if n.op_type not in _LINEAR]
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
                arr = const_array(v)
                if arr is not None and arr.size == 1 and np.issubdtype(arr.dtype, np.floating):
                    scale *= float(arr.reshape(()))
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
        weight=router.weight, bias=router.bias, correction_bias=router.correction_bias,
        scoring=scoring, norm_topk_prob=norm, softmax_after_topk=softmax_after,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
        initializers=tuple(router.inits),
    )  # fmt: skip


# --------------------------------------------------------------------------- experts


@dataclass
class _Proj:
    """One projection: its node, weight ``[..., N, K]``, bias, and output after the bias."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    out: ir.Value


def _through(v: ir.Value, ops: frozenset[str] = SHAPE_OPS) -> list[ir.Node]:
    """Direct users of ``v``, looking through shape ops (and `If`s made of them)."""
    res: dict[ir.Node, None] = {}
    for u in direct_users(v):
        if u.op_type in ops and u.inputs[0] is v:
            res.update(dict.fromkeys(_through(u.outputs[0], ops)))
        else:
            res[u] = None
    return list(res)


RowSel = Callable[[int], np.ndarray]


def _first_half(n: int) -> np.ndarray:
    return np.arange(n)[: n // 2]


def _second_half(n: int) -> np.ndarray:
    return np.arange(n)[n // 2 :]


def _every_other(start: int) -> RowSel:
    def sel(n: int) -> np.ndarray:
        return np.arange(n)[start::2]

    return sel


def _parts(proj_out: ir.Value) -> list[tuple[ir.Value, RowSel]] | None:
    """Split of a gate_up output into two halves: each with a row selector, else None."""
    users = _through(proj_out)
    splits = [u for u in users if u.op_type == "Split" and len(u.outputs) == 2]
    if splits:
        s = splits[0]
        return [(s.outputs[0], _first_half), (s.outputs[1], _second_half)]
    # torch.chunk(2) without the exporter's optimizer: SplitToSequence + SequenceAt(0 / 1).
    seqs = [u for u in users if u.op_type == "SplitToSequence"]
    if len(seqs) == 1:
        ats = [a for a in direct_users(seqs[0].outputs[0]) if a.op_type == "SequenceAt"]
        pos = [scalar(a.inputs[1]) for a in ats]
        if len(ats) == 2 and sorted(p for p in pos if p is not None) == [0.0, 1.0]:
            return [(a.outputs[0], _first_half if p == 0 else _second_half)
                    for a, p in zip(ats, pos, strict=True)]  # fmt: skip
    slices = [u for u in users if u.op_type == "Slice"]
    if len(slices) != 2:
        return None
    res: list[tuple[ir.Value, RowSel]] = []
    for s in slices:
        start = const_array(s.inputs[1])
        steps = const_array(s.inputs[4]) if len(s.inputs) > 4 else None
        st = int(steps.reshape(-1)[0]) if steps is not None else 1
        s0 = int(start.reshape(-1)[0]) if start is not None else None
        if st == 2 and s0 is not None:
            res.append((s.outputs[0], _every_other(s0)))
        elif st == 1:
            # TorchScript computes the chunk bounds from shapes: the half starting at 0 is first.
            res.append((s.outputs[0], _first_half if s0 == 0 else _second_half))
        else:
            return None
    return res


def _act_info(
    start: list[ir.Value], others: list[ir.Value], allowed: set[ir.Node]
) -> tuple[Activation, float, float] | None:
    """Activation of the path from ``start`` that ``others`` do not share."""
    mine = fine_forward_from(start, allowed)
    theirs = fine_forward_from(others, allowed) if others else set()
    own = mine - theirs
    ops = {n.op_type for n in own}
    if ops & {"Erf", "Gelu", "Tanh"}:
        return "gelu", 0.0, 0.0
    clips = [n for n in own if n.op_type in ("Clip", "Min")]
    if clips and "Sigmoid" in ops:
        limit = 0.0
        c = clips[0]
        if c.op_type == "Clip" and len(c.inputs) > 2:
            limit = scalar(c.inputs[2]) or 0.0
        elif c.op_type == "Min":
            limit = next((s for s in (scalar(v) for v in c.inputs) if s is not None), 0.0)
        alpha = 1.0
        for n in own:
            if n.op_type == "Sigmoid":
                p = n.inputs[0].producer() if n.inputs[0] is not None else None
                if p is not None and p.op_type == "Mul":
                    alpha = next((s for s in (scalar(v) for v in p.inputs) if s is not None), 1.0)
        return "gpt_oss", float(alpha), float(limit)
    if ops & {"Sigmoid", "Swish"}:
        return "silu", 0.0, 0.0
    return None


@dataclass
class _FFN:
    gate: _Proj | None
    up: _Proj
    down: _Proj
    layout: GateLayout
    gate_rows: Callable[[int], np.ndarray] | None
    up_rows: Callable[[int], np.ndarray] | None
    activation: Activation
    alpha: float
    limit: float


def _classify_ffn(firsts: list[_Proj], down: _Proj, allowed: set[ir.Node], name: str) -> _FFN:
    """Work out gate / up / down and the activation of one expert (or stacked experts)."""
    if len(firsts) == 2:
        a, b = firsts
        ia = _act_info([a.out], [b.out], allowed)
        ib = _act_info([b.out], [a.out], allowed)
        act: tuple[Activation, float, float]
        if ia is not None and ib is None:
            g, u, act = a, b, ia
        elif ib is not None and ia is None:
            g, u, act = b, a, ib
        else:
            raise ModelError(f"find-moe: MoE layer {name}: cannot tell gate from up projection")
        return _FFN(g, u, down, "separate", None, None, *act)
    if len(firsts) != 1:
        raise ModelError(
            f"find-moe: MoE layer {name}: an expert has {len(firsts)} input projections; "
            "modec handles gate+up (separate or fused) or a single up projection."
        )
    (p,) = firsts
    parts = _parts(p.out)
    if parts is None:
        only = _act_info([p.out], [], allowed)
        if only is None:
            raise ModelError(f"find-moe: MoE layer {name}: unsupported expert activation")
        return _FFN(None, p, down, "none", None, None, *only)
    (va, ra), (vb, rb) = parts
    ia = _act_info([va], [vb], allowed)
    ib = _act_info([vb], [va], allowed)
    if ia is not None and (ib is None or ia[0] == "gpt_oss"):
        gate_rows, up_rows, act = ra, rb, ia
    elif ib is not None:
        gate_rows, up_rows, act = rb, ra, ib
    else:
        raise ModelError(f"find-moe: MoE layer {name}: cannot tell gate half from up half")
    n = p.weight.shape[-2]
    interleaved = not np.array_equal(np.sort(np.concatenate([ra(n)[:1], rb(n)[:1]])), [0, n // 2])
    layout: GateLayout = "interleaved" if interleaved else "concatenated"
    return _FFN(p, p, down, layout, gate_rows, up_rows, *act)


def _assemble(ffns: list[_FFN]) -> ExpertWeights:
    """Stack per-expert (or already stacked) FFNs into ExpertWeights."""

    pre_stacked = len(ffns) == 1 and ffns[0].up.weight.ndim == 3

    def stack(arrs: list[np.ndarray]) -> np.ndarray:
        return arrs[0] if pre_stacked else np.stack(arrs)

    def rows(
        w: np.ndarray | None, sel: Callable[[int], np.ndarray] | None, axis: int
    ) -> np.ndarray | None:
        if w is None or sel is None:
            return w
        return np.take(w, sel(w.shape[axis]), axis=axis)

    f0 = ffns[0]
    gate = up = None
    gate_b = up_b = None
    if f0.layout in ("concatenated", "interleaved"):
        ws = stack([f.up.weight for f in ffns])
        gate = rows(ws, f0.gate_rows, -2)
        up = rows(ws, f0.up_rows, -2)
        if f0.up.bias is not None:
            bs = stack([f.up.bias for f in ffns if f.up.bias is not None])
            gate_b, up_b = rows(bs, f0.gate_rows, -1), rows(bs, f0.up_rows, -1)
    else:
        up = stack([f.up.weight for f in ffns])
        if f0.up.bias is not None:
            up_b = stack([f.up.bias for f in ffns if f.up.bias is not None])
        if f0.gate is not None:
            gate = stack([f.gate.weight for f in ffns if f.gate is not None])
            if f0.gate.bias is not None:
                gate_b = stack(
                    [f.gate.bias for f in ffns if f.gate is not None and f.gate.bias is not None]
                )
    down = stack([f.down.weight for f in ffns])
    down_b = None
    if f0.down.bias is not None:
        down_b = stack([f.down.bias for f in ffns if f.down.bias is not None])
    assert up is not None

    def f32(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a, dtype=np.float32)

    return ExpertWeights(
        gate=f32(gate), up=f32(up), down=f32(down),  # type: ignore[arg-type]
        gate_bias=f32(gate_b), up_bias=f32(up_b), down_bias=f32(down_b),
        activation=f0.activation, alpha=f0.alpha, limit=f0.limit,
    )  # fmt: skip


def _experts(
    index: GraphIndex, router: _Router, nodes: tuple[ir.Node, ...], allowed: set[ir.Node],
    name: str, shared_val: ir.Value | None,
) -> tuple[ExpertWeights, ExpertForm, GateLayout]:  # fmt: skip
    e = router.weight.shape[0]
    region = set(nodes)
    shared_nodes = index.backward([shared_val], within=region) if shared_val is not None else set()
    topk_fwd = index.forward(router.topk.outputs, within=region)
    # --- stacked gather: Gather/GatherND over constants [E, ...] with routed indices.
    gathers: dict[ir.Value, list[ir.Node]] = {}
    for n in nodes:
        if n.op_type in ("Gather", "GatherND") and n in topk_fwd:
            data = n.inputs[0]
            w = const_array(data)
            if w is None or w.ndim < 2 or w.shape[0] != e or const_array(n.inputs[1]) is not None:
                continue
            if n.op_type == "Gather" and int(attr(n, "axis", 0)) != 0:
                continue
            gathers.setdefault(data, []).append(n)  # type: ignore[arg-type]
    if gathers:
        if any(len(g) > 1 for g in gathers.values()):
            raise ModelError(
                f"find-moe: MoE layer {name}: the experts are an unrolled per-expert loop that "
                "gathers each stacked weight several times (transformers 'eager' experts "
                "exported with TorchScript bake in the experts the sample input hit, which is "
                f"wrong for other inputs). {_RERUN_HINT}"
            )
        return _stacked(index, gathers, nodes, allowed, name)
    # --- per-expert chains.
    projs: list[_Proj] = []
    for n in sorted(allowed, key=lambda n: (index.pos[index.owner[n]], n.name or "")):
        if n is router.matmul or index.owner.get(n) in shared_nodes:
            continue
        lw = _linear_weight(n)
        if lw is None:
            continue
        b, o = _linear_bias(n, index)
        projs.append(_Proj(n, lw[0], b, o))
    if not projs:
        raise ModelError(f"find-moe: MoE layer {name}: no expert projections found")
    by_node = {p.node: p for p in projs}
    proj_nodes = set(by_node)
    downstream = {p.node: fine_forward([p.node], allowed) & proj_nodes for p in projs}
    upstream_any = {n for p in projs for n in downstream[p.node]}
    firsts = [p for p in projs if p.node not in upstream_any]
    chains: dict[ir.Node, list[_Proj]] = {}
    for f in firsts:
        ds = downstream[f.node]
        if len(ds) != 1:
            raise ModelError(
                f"find-moe: MoE layer {name}: expert projection {f.node.name!r} feeds "
                f"{len(ds)} down projections; expected one."
            )
        chains.setdefault(next(iter(ds)), []).append(f)
    has_if = any(n.op_type == "If" for n in nodes)
    has_nonzero = any(n.op_type == "NonZero" for n in allowed)
    has_einsum = any(n.op_type == "Einsum" for n in nodes)
    form: ExpertForm = (
        "if_per_expert" if has_if else "dispatch" if has_nonzero
        else "dense_einsum" if has_einsum else "dense_add"
    )  # fmt: skip
    ids: dict[int, _FFN] = {}
    for down_node, fs in chains.items():
        eid = _expert_id(fs, by_node[down_node], allowed, router, e)
        if eid is None or eid in ids:
            raise ModelError(
                f"find-moe: MoE layer {name} ({form}): cannot tell which expert the "
                f"projection {down_node.name!r} belongs to. {_RERUN_HINT}"
            )
        ids[eid] = _classify_ffn(fs, by_node[down_node], allowed, name)
    if sorted(ids) != list(range(e)):
        raise ModelError(
            f"find-moe: MoE layer {name} ({form}): found experts {sorted(ids)} of {e}; the "
            f"graph does not hold every expert (an export that baked in the experts the "
            f"sample input hit?). {_RERUN_HINT}"
        )
    ffns = [ids[i] for i in range(e)]
    return _assemble(ffns), form, ffns[0].layout


def _expert_id(
    firsts: list[_Proj], down: _Proj, allowed: set[ir.Node], router: _Router, e: int
) -> int | None:
    """Which expert a per-expert chain computes."""
    idx_out = router.topk.outputs[1]
    # (a) dispatch / If: Equal(indices, e) upstream of the expert input.
    ups = fine_backward([v for f in firsts for v in f.node.inputs if v is not None], allowed)
    for n in ups:
        if n.op_type == "Equal":
            for a, b in ((0, 1), (1, 0)):
                s = scalar(n.inputs[b])
                if s is not None and n.inputs[a] is not None:
                    up2 = fine_backward([n.inputs[a]], allowed | {router.topk})  # type: ignore[list-item]
                    if n.inputs[a] is idx_out or router.topk in up2:
                        return int(s)
    # (b) dense: the output multiplied by gate column e.
    for u in fine_forward_from([down.out], allowed):
        if u.op_type != "Mul":
            continue
        for v in u.inputs:
            p = v.producer() if v is not None else None
            while p is not None and p.op_type in SHAPE_OPS:
                p = p.inputs[0].producer() if p.inputs[0] is not None else None
            if p is None:
                continue
            if p.op_type == "Gather" and int(attr(p, "axis", 0)) in (1, -1):
                s = scalar(p.inputs[1])
                if s is not None:
                    return int(s)
            if p.op_type == "Slice":
                s = scalar(p.inputs[1])
                if s is not None:
                    return int(s)
        break
    # (c) einsum: position in the stack of expert outputs.
    v = down.out
    for _ in range(4):
        users = [u.node for u in v.uses()]
        if len(users) != 1:
            return None
        u = users[0]
        if u.op_type == "Concat":
            return next(i for i, x in enumerate(u.inputs) if x is v)
        if u.op_type not in SHAPE_OPS:
            return None
        v = u.outputs[0]
    return None


def _stacked(
    index: GraphIndex, gathers: dict[ir.Value, list[ir.Node]], nodes: tuple[ir.Node, ...],
    allowed: set[ir.Node], name: str,
) -> tuple[ExpertWeights, ExpertForm, GateLayout]:  # fmt: skip
    projs: dict[ir.Node, _Proj] = {}
    biases: list[tuple[ir.Node, np.ndarray]] = []
    for data, (g,) in gathers.items():
        w = const_array(data)
        assert w is not None
        v = g.outputs[0]
        transposed = False
        users = _through(v, frozenset({"Reshape", "Squeeze", "Identity", "Cast"}))
        while len(users) == 1 and users[0].op_type == "Transpose":
            perm = attr(users[0], "perm")
            # An identity perm (unoptimized dynamo exports emit them) changes nothing.
            if perm is None or list(perm) != list(range(len(perm))):
                transposed = not transposed
            users = _through(users[0].outputs[0], frozenset({"Reshape", "Squeeze", "Identity"}))
        if w.ndim == 3 and len(users) == 1 and users[0].op_type in ("MatMul", "Einsum"):
            mm = users[0]
            lhs = mm.inputs[0]
            left = lhs is v or (lhs is not None and g in fine_backward([lhs], allowed))
            # W_sel @ x: stored [E, N, K]; x @ W_sel: stored [E, K, N] (a Transpose flips it).
            w_nk = w.transpose(0, 2, 1) if (left == transposed) else w
            projs[mm] = _Proj(mm, w_nk.astype(np.float32), None, mm.outputs[0])
        elif w.ndim == 2 and len(users) == 1 and users[0].op_type == "Add":
            biases.append((users[0], w.astype(np.float32)))
        else:
            raise ModelError(
                f"find-moe: MoE layer {name}: stacked weight {data.name!r} is used in a way "
                f"modec does not recognize ({[u.op_type for u in users]}). {_RERUN_HINT}"
            )
    # Attach biases to the projection whose output the Add reads.
    for add, b in biases:
        for mm, p in projs.items():
            if add in fine_forward([mm], allowed) and p.bias is None:
                cone = fine_backward([x for x in add.inputs if x is not None], allowed)
                if mm in cone and not any(
                    o in cone for o in projs if o is not mm and o in fine_forward([mm], allowed)
                ):
                    p.bias = b
                    p.out = add.outputs[0]
                    break
    proj_nodes = set(projs)
    downstream = {n: fine_forward([n], allowed) & proj_nodes for n in projs}
    later = {d for ds in downstream.values() for d in ds}
    firsts = [projs[n] for n in projs if n not in later]
    downs = [projs[n] for n in projs if n in later]
    if len(downs) != 1:
        raise ModelError(
            f"find-moe: MoE layer {name}: expected one down projection, found {len(downs)}"
        )
    ffn = _classify_ffn(firsts, downs[0], allowed, name)
    return _assemble([ffn]), "stacked_gather", ffn.layout


# --------------------------------------------------------------------------- shared expert


def _shared_expert(
    index: GraphIndex, value: ir.Value, h_fwd: set[ir.Node], router: _Router, name: str
) -> SharedExpert:
    cone = index.backward([value]) & h_fwd
    allowed = set(cone)
    projs = []
    for n in index.ordered(cone):
        lw = _linear_weight(n)
        if lw is None:
            continue
        b, o = _linear_bias(n, index)
        projs.append(_Proj(n, lw[0], b, o))
    gate_w = None
    mlp = []
    for p in projs:
        if p.weight.shape[0] == 1:
            gate_w = p.weight
        else:
            mlp.append(p)
    proj_nodes = {p.node for p in mlp}
    later = {d for p in mlp for d in (fine_forward([p.node], allowed) & proj_nodes)}
    firsts = [p for p in mlp if p.node not in later]
    downs = [p for p in mlp if p.node in later]
    if len(downs) != 1:
        raise ModelError(f"find-moe: MoE layer {name}: cannot read its shared expert")
    ffn = _classify_ffn(firsts, downs[0], allowed, name)
    weights = _assemble([ffn])
    weights = ExpertWeights(
        gate=weights.gate,
        up=weights.up[None] if weights.up.ndim == 2 else weights.up,
        down=weights.down[None] if weights.down.ndim == 2 else weights.down,
        activation=weights.activation, alpha=weights.alpha, limit=weights.limit,
    )  # fmt: skip
    return SharedExpert(weights, gate_w)
