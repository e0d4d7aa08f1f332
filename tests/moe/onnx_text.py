"""ONNX text to ``ir.Model``, and canonical MoE graphs written by hand.

`onnx_model` turns the text of one graph (``onnx.parser`` syntax) plus a dict of constants into
an ``ir.Model``: the constants become initializers, so the text holds only the dataflow.
`moe_attrs` and `canonical_model` write the Expected side: ``ai.modec::MoE`` nodes with their
attributes and the annotations canonicalize-moe adds (docs/ir.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir

H, E, I, K = 8, 4, 6, 2  # hidden, experts, expert intermediate size, top-k of the test layers


def onnx_model(
    text: str, constants: Mapping[str, np.ndarray] | None = None,
    opsets: Mapping[str, int] | None = None,
) -> ir.Model:  # fmt: skip
    """An ``ir.Model`` from the ONNX text of one graph and its constants.

    Args:
        text: ``name (inputs) => (outputs) [<value infos>] { nodes }``; names with dots are
            written quoted (``"modec.moe0.up"``).
        constants: the initializers, by name.
        opsets: opset imports (default: the standard domain at 18).
    """
    imports = ", ".join(f'"{d}" : {v}' for d, v in (opsets or {"": 18}).items())
    proto = onnx.parser.parse_model(f"<ir_version: 9, opset_import: [{imports}]>\n{text}")
    used = {v for n in proto.graph.node for v in n.input}
    for name, arr in (constants or {}).items():
        assert name in used, f"constant {name!r} is not used by the graph"
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    return ir.from_proto(proto)


#: Attributes of a canonical MoE node of a softmax top-2 router over E experts, SiLU GLU
#: experts and no shared expert (docs/ir.md); tests override what their layer changes.
MOE_ATTRS: dict[str, int | float | str] = {
    "num_experts": E, "top_k": K, "scoring": "softmax", "norm_topk_prob": 0,
    "softmax_after_topk": 0, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    "activation": "silu", "alpha": 0.0, "limit": 0.0, "gated": 1, "has_shared": 0,
    "shared_gated": 0, "shared_activation": "silu",
}  # fmt: skip


def moe_attrs(**overrides: int | float | str) -> str:
    """The attribute list of a canonical MoE node in ONNX text: `MOE_ATTRS` | ``overrides``."""
    attrs = {**MOE_ATTRS, **overrides}
    assert attrs.keys() == MOE_ATTRS.keys(), f"unknown attributes {overrides}"
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in attrs.items())


def canonical_model(
    text: str, weights: Mapping[str, np.ndarray], *, layers: Sequence[Mapping[str, str]],
    opsets: Mapping[str, int] | None = None,
) -> ir.Model:  # fmt: skip
    """A hand-written graph with canonical MoE nodes, annotated as canonicalize-moe does.

    Args:
        text: the graph in ONNX text.
        weights: its initializers.
        layers: per MoE node (graph order), its ``metadata_props``.
        opsets: opset imports (default: the standard domain at 18 and ``ai.modec`` 1).

    The MoE weights (``modec.moe<i>.*``) get ``metadata_props["modec.quantize"]``: ``expert``
    on the routed gate / up / down projections, ``never`` on everything else (docs/ir.md).
    """
    model = onnx_model(text, weights, opsets or {"": 18, "ai.modec": 1})
    for name, v in model.graph.initializers.items():
        if name.startswith("modec.moe"):
            expert = name.rsplit(".", 1)[1] in ("gate", "up", "down")
            v.metadata_props["modec.quantize"] = "expert" if expert else "never"
    nodes = [n for n in model.graph if n.domain == "ai.modec" and n.op_type == "MoE"]
    assert len(nodes) == len(layers), f"{len(nodes)} MoE nodes, {len(layers)} layers"
    for node, meta in zip(nodes, layers, strict=True):
        node.metadata_props.update(meta)
    return model
