"""The dense sparse-gate expert forms: every expert runs on every token, and the top-k
weights scattered into a dense ``[T, E]`` gate pick what counts.

1. ``dense_add``: expert ``e``'s output is multiplied by gate column ``e`` (a ``Gather`` on
   the last axis or a ``Slice`` starting at ``e``), and the products are summed.
2. ``dense_einsum``: the expert outputs are stacked (``Concat``, through shape ops) and
   combined with the gate by an ``Einsum``; expert ``e`` is position ``e`` of the stack.
"""

from __future__ import annotations

import onnx_ir as ir

from modec.moe._graph import SHAPE_OPS, attr, fine_forward_from, scalar
from modec.moe.discover.common import Proj


def gate_column_expert_id(down: Proj, allowed: set[ir.Node]) -> int | None:
    """Rule 1: the gate column ``down``'s output is multiplied by, else None."""
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
    return None


def stack_position_expert_id(down: Proj) -> int | None:
    """Rule 2: the position of ``down``'s output in the stack of expert outputs, else None."""
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
