"""The stacked-gather expert form (transformers' ``batched_mm`` experts, both exporters).

1. The experts are ``Gather`` (axis 0) / ``GatherND`` nodes downstream of the router TopK
   that pick rows of a constant ``[E, ...]`` by a routed (non-constant) index.
2. A gathered ``[E, N, K]`` weight feeds one MatMul / Einsum (through shape ops and
   Transposes; an identity perm changes nothing): ``W_sel @ x`` stores ``[E, N, K]``,
   ``x @ W_sel`` stores ``[E, K, N]``. A gathered ``[E, N]`` constant feeds an ``Add``: the bias
   of the projection whose output that Add reads.
3. Each weight gathered more than once is an unrolled eager loop: an error, since the export
   baked in the experts the sample input hit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.moe import lazy
from modec.moe._graph import attr, const_lazy, fine_backward, fine_forward, is_const
from modec.moe.discover.common import RERUN_HINT, Proj
from modec.moe.discover.ffn import assemble, classify_ffn, firsts_and_downs, through
from modec.moe.discover.region import ExpertForm, ExpertWeights, GateLayout


def find_gathers(
    nodes: tuple[ir.Node, ...], topk_fwd: set[ir.Node], e: int
) -> dict[ir.Value, list[ir.Node]]:
    """The routed gathers of each stacked constant ``[E, ...]`` (rule 1); empty if none."""
    gathers: dict[ir.Value, list[ir.Node]] = {}
    for n in nodes:
        if n.op_type in ("Gather", "GatherND") and n in topk_fwd:
            data = n.inputs[0]
            w = const_lazy(data)
            if w is None or w.ndim < 2 or w.shape[0] != e or is_const(n.inputs[1]):
                continue
            if n.op_type == "Gather" and int(attr(n, "axis", 0)) != 0:
                continue
            gathers.setdefault(data, []).append(n)  # type: ignore[arg-type]
    return gathers


def read_stacked(
    gathers: dict[ir.Value, list[ir.Node]], allowed: set[ir.Node], name: str
) -> tuple[ExpertWeights, ExpertForm, GateLayout]:
    """The expert weights behind ``gathers`` (rules 2 and 3)."""
    if any(len(g) > 1 for g in gathers.values()):
        raise ModelError(
            f"find-moe: MoE layer {name}: the experts are an unrolled per-expert loop that "
            "gathers each stacked weight several times (transformers 'eager' experts "
            "exported with TorchScript bake in the experts the sample input hit, which is "
            f"wrong for other inputs). {RERUN_HINT}"
        )
    projs: dict[ir.Node, Proj] = {}
    biases: list[tuple[ir.Node, np.ndarray]] = []
    for data, (g,) in gathers.items():
        w = const_lazy(data)
        assert w is not None
        v = g.outputs[0]
        transposed = False
        users = through(v, frozenset({"Reshape", "Squeeze", "Identity", "Cast"}))
        while len(users) == 1 and users[0].op_type == "Transpose":
            perm = attr(users[0], "perm")
            # An identity perm (unoptimized dynamo exports emit them) changes nothing.
            if perm is None or list(perm) != list(range(len(perm))):
                transposed = not transposed
            users = through(users[0].outputs[0], frozenset({"Reshape", "Squeeze", "Identity"}))
        if w.ndim == 3 and len(users) == 1 and users[0].op_type in ("MatMul", "Einsum"):
            mm = users[0]
            lhs = mm.inputs[0]
            left = lhs is v or (lhs is not None and g in fine_backward([lhs], allowed))
            # W_sel @ x: stored [E, N, K]; x @ W_sel: stored [E, K, N] (a Transpose flips it).
            w_nk = w.transpose((0, 2, 1)) if (left == transposed) else w
            projs[mm] = Proj(mm, w_nk.astype(np.float32), None, mm.outputs[0])
        elif w.ndim == 2 and len(users) == 1 and users[0].op_type == "Add":
            biases.append((users[0], lazy.to_float32(w)))  # [E, N]: small, read now
        else:
            raise ModelError(
                f"find-moe: MoE layer {name}: stacked weight {data.name!r} is used in a way "
                f"modec does not recognize ({[u.op_type for u in users]}). {RERUN_HINT}"
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
    firsts, downs = firsts_and_downs(list(projs.values()), allowed)
    if len(downs) != 1:
        raise ModelError(
            f"find-moe: MoE layer {name}: expected one down projection, found {len(downs)}"
        )
    ffn = classify_ffn(firsts, downs[0], allowed, name)
    return assemble([ffn]), "stacked_gather", ffn.layout
