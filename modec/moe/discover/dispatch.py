"""The dispatch expert form (``Equal → NonZero → Gather rows → MLP → ScatterND``), and ``If``
per expert (``torch.cond``: the same dispatch inside one branch per expert).

Both compute expert ``e`` on the tokens where ``Equal(topk_indices, e)`` holds, so the
expert's index is the scalar of the ``Equal`` upstream of its input projections.
"""

from __future__ import annotations

import onnx_ir as ir

from modec.moe._graph import fine_backward, scalar
from modec.moe.discover.common import Proj
from modec.moe.discover.router import Router


def equal_expert_id(firsts: list[Proj], allowed: set[ir.Node], router: Router) -> int | None:
    """The ``e`` of an ``Equal(indices, e)`` on the router's indices feeding ``firsts``."""
    idx_out = router.topk.outputs[1]
    ups = fine_backward([v for f in firsts for v in f.node.inputs if v is not None], allowed)
    for n in ups:
        if n.op_type == "Equal":
            for a, b in ((0, 1), (1, 0)):
                s = scalar(n.inputs[b])
                if s is not None and n.inputs[a] is not None:
                    up2 = fine_backward([n.inputs[a]], allowed | {router.topk})  # type: ignore[list-item]
                    if n.inputs[a] is idx_out or router.topk in up2:
                        return int(s)
    return None
