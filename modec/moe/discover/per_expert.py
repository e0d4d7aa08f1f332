"""Per-expert chains: the forms that write each expert as its own projections (dispatch,
dense sparse-gate, ``If`` per expert), read into one stack of expert weights.

1. Every projection with a constant 2-D weight in the region (at any nesting depth) is an
   expert projection, except the router's and the shared expert's.
2. Input projections (fed by no other) group by the one projection they feed: its down
   projection. Each group is one expert.
3. The form: any ``If`` is if_per_expert, else a ``NonZero`` is dispatch, else an ``Einsum``
   is dense_einsum, else dense_add.
4. The expert's index: the ``Equal(indices, e)`` it is dispatched by (`dispatch`), else the
   gate column its output is multiplied by or its place in the stack of outputs (`dense`).
   Every expert 0..E-1 must be found exactly once.
"""

from __future__ import annotations

import onnx_ir as ir

from modec.errors import ModelError
from modec.moe._graph import GraphIndex, fine_forward
from modec.moe.discover.common import RERUN_HINT, Proj, linear_proj
from modec.moe.discover.dense import gate_column_expert_id, stack_position_expert_id
from modec.moe.discover.dispatch import equal_expert_id
from modec.moe.discover.ffn import FFN, assemble, classify_ffn
from modec.moe.discover.region import ExpertForm, ExpertWeights, GateLayout
from modec.moe.discover.router import Router


def read_per_expert(
    index: GraphIndex, router: Router, nodes: tuple[ir.Node, ...], allowed: set[ir.Node],
    shared_nodes: set[ir.Node], name: str,
) -> tuple[ExpertWeights, ExpertForm, GateLayout]:  # fmt: skip
    """The experts of the region ``nodes`` (``allowed``: them and their subgraph nodes)."""
    e = router.weight.shape[0]
    projs: list[Proj] = []
    for n in sorted(allowed, key=lambda n: (index.pos[index.owner[n]], n.name or "")):
        if n is router.matmul or index.owner.get(n) in shared_nodes:
            continue
        p = linear_proj(n)
        if p is not None:
            projs.append(p)
    if not projs:
        raise ModelError(f"find-moe: MoE layer {name}: no expert projections found")
    by_node = {p.node: p for p in projs}
    proj_nodes = set(by_node)
    downstream = {p.node: fine_forward([p.node], allowed) & proj_nodes for p in projs}
    upstream_any = {n for p in projs for n in downstream[p.node]}
    firsts = [p for p in projs if p.node not in upstream_any]
    chains: dict[ir.Node, list[Proj]] = {}
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
    ids: dict[int, FFN] = {}
    for down_node, fs in chains.items():
        eid = _expert_id(fs, by_node[down_node], allowed, router)
        if eid is None or eid in ids:
            raise ModelError(
                f"find-moe: MoE layer {name} ({form}): cannot tell which expert the "
                f"projection {down_node.name!r} belongs to. {RERUN_HINT}"
            )
        ids[eid] = classify_ffn(fs, by_node[down_node], allowed, name)
    if sorted(ids) != list(range(e)):
        raise ModelError(
            f"find-moe: MoE layer {name} ({form}): found experts {sorted(ids)} of {e}; the "
            f"graph does not hold every expert (an export that baked in the experts the "
            f"sample input hit?). {RERUN_HINT}"
        )
    ffns = [ids[i] for i in range(e)]
    return assemble(ffns), form, ffns[0].layout


def _expert_id(firsts: list[Proj], down: Proj, allowed: set[ir.Node], router: Router) -> int | None:
    """Which expert a per-expert chain computes (rule 4)."""
    eid = equal_expert_id(firsts, allowed, router)
    if eid is None:
        eid = gate_column_expert_id(down, allowed)
    if eid is None:
        eid = stack_position_expert_id(down)
    return eid
