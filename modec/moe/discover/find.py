"""The find-moe driver: routers → regions → experts, in graph order.

1. Every router TopK (`router`) is grouped by its router matmul; per matmul the last TopK
   not upstream of another picks the experts, the others are group TopKs.
2. The hidden input is the router matmul's input, walked back through Reshape/Flatten/Cast.
3. The combine output is the first single value that all dataflow from the TopK passes
   through once an expert matmul has run, extended through Reshape / ReduceSum / Squeeze and
   an ``Add`` of a shared expert computed from the hidden input alone.
4. The region is ``forward(hidden) ∩ backward(output)``; it must read no float value from
   outside besides the hidden input.
5. The experts are read by their form: `stacked` when the region gathers stacked weights by
   the routed indices, else `per_expert` chains; the shared expert by `shared`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

from modec.errors import ModelError
from modec.moe._graph import GraphIndex, name_scope, shape_only, subgraph_nodes
from modec.moe.discover.common import RERUN_HINT, is_expert_node
from modec.moe.discover.per_expert import read_per_expert
from modec.moe.discover.region import (
    ExpertForm,
    ExpertWeights,
    FindMoEOptions,
    GateLayout,
    MoERegion,
)
from modec.moe.discover.router import Router, router_of, routing_spec
from modec.moe.discover.shared import read_shared_expert
from modec.moe.discover.stacked import find_gathers, read_stacked

log = logging.getLogger(__name__)

# Ops the combine output is followed through to the layer's output (rule 3).
_OUTPUT_OPS = frozenset(
    {"Reshape", "ReduceSum", "Squeeze", "Unsqueeze", "Cast", "Identity", "Flatten"}
)


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
    cands = [r for n in index.nodes if n.op_type == "TopK" for r in [router_of(n, opts)] if r]
    by_mm: dict[ir.Node, list[Router]] = {}
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
    index: GraphIndex, router: Router, grouped: list[Router], i: int
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
    experts_all = {n for n in h_fwd if is_expert_node(n, router.matmul)}
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
        if c.op_type in _OUTPUT_OPS:
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
                    f"{hidden.name!r}; modec cannot cut it out as one MoE node. {RERUN_HINT}"
                )
    allowed_fine = set(nodes) | {s for n in nodes for s in subgraph_nodes(n)}
    spec = routing_spec(index, router, grouped, nodes, name)
    experts, form, layout = _experts(index, router, nodes, allowed_fine, name, shared_val)
    shared = None
    if shared_val is not None:
        shared = read_shared_expert(index, shared_val, h_fwd, name)
    return MoERegion(
        index=i, name=name, nodes=nodes, hidden=hidden, output=out,
        num_experts=router.weight.shape[0], top_k=router.k, router=spec, form=form,
        gate_layout=layout, experts=experts, shared=shared, topk_node=router.topk,
    )  # fmt: skip


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


def _experts(
    index: GraphIndex, router: Router, nodes: tuple[ir.Node, ...], allowed: set[ir.Node],
    name: str, shared_val: ir.Value | None,
) -> tuple[ExpertWeights, ExpertForm, GateLayout]:  # fmt: skip
    """The routed experts of the region, read by their form (rule 5)."""
    region = set(nodes)
    topk_fwd = index.forward(router.topk.outputs, within=region)
    gathers = find_gathers(nodes, topk_fwd, router.weight.shape[0])
    if gathers:
        return read_stacked(gathers, allowed, name)
    shared_nodes = index.backward([shared_val], within=region) if shared_val is not None else set()
    return read_per_expert(index, router, nodes, allowed, shared_nodes, name)


def _region_name(router: Router, i: int) -> str:
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
