"""canonicalize-moe: replace each MoE region by one ``ai.modec::MoE`` node (docs/ir.md).

Reads the regions find-moe returned; writes new initializers (stacked expert weights in
``nn.Linear`` convention, router and shared-expert weights), one node per region, and removes
the region's nodes and the constants only they used. Router and shared-expert initializers
carry ``metadata_props["modec.quantize"] = "never"``; expert weights carry ``"expert"``.

The routed and shared expert weights are `LazyWeight`s: float32 tensors computed from the
original initializers (often memory-mapped fp16/bf16 external data) each time they are read,
so canonicalizing reads no expert weight. `expert_slice` reads one expert of one projection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.moe import lazy
from modec.moe._graph import GraphIndex, subgraph_nodes
from modec.moe.discover import MoERegion, find_moe
from modec.moe.lazy import LazyArray
from modec.moe.reference import INPUT_NAMES

log = logging.getLogger(__name__)

DOMAIN = "ai.modec"
OP_TYPE = "MoE"
QUANTIZE_KEY = "modec.quantize"


def is_moe_node(node: ir.Node) -> bool:
    """Whether ``node`` is a canonical MoE node."""
    return node.domain == DOMAIN and node.op_type == OP_TYPE


class LazyWeight(ir.LazyTensor):
    """A float32 canonical weight ``[E, N, K]`` computed from the source initializer(s) on every
    access (``cache=False``): the slice, transpose, gate/up split, per-expert stack and cast
    recorded in `source`, applied to the source data (read through its memory map, which is
    released after the read when nothing else holds it).

    ``numpy()`` / ``tobytes()`` build the whole stack (one layer's projection);
    `expert_slice` builds one expert.

    Attributes:
        source: the value as a `LazyArray` (float32).
    """

    __slots__ = ("source",)

    def __init__(self, source: LazyArray, name: str) -> None:
        def build() -> ir.TensorProtocol:
            return ir.Tensor(lazy.to_float32(source), dtype=ir.DataType.FLOAT, name=name)

        super().__init__(
            build, dtype=ir.DataType.FLOAT, shape=ir.Shape(source.shape), cache=False, name=name
        )
        self.source = source


def expert_slice(weight: ir.Value | ir.TensorProtocol, e: int) -> np.ndarray:
    """Expert ``e`` of a stacked weight ``[E, N, K]``: a new float32 array ``[N, K]``.

    For a `LazyWeight` only expert ``e``'s part of the source is read and converted; any other
    tensor (e.g. one written back by the quantizer) is indexed as it is. Equal to
    ``weight.numpy()[e]``, bit for bit.

    Args:
        weight: a canonical node's gate / up / down input (an initializer) or its tensor.
        e: the expert, ``0 <= e < E``.
    """
    t = weight.const_value if isinstance(weight, ir.Value) else weight
    if t is None:
        raise ModelError(f"{weight.name!r} is not a constant; cannot read expert {e}")
    src = t.source if isinstance(t, LazyWeight) else lazy.source(t)
    return lazy.to_float32(src.expert(e))


def _init(graph: ir.Graph, name: str, arr: np.ndarray | LazyArray, quantize: str) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name = f"{base}_{i}"
        i += 1
    tensor: ir.TensorProtocol
    if isinstance(arr, LazyArray):
        tensor = LazyWeight(arr if arr.dtype == np.float32 else arr.astype(np.float32), name)
    else:
        tensor = ir.tensor(np.ascontiguousarray(arr, dtype=np.float32), name=name)
    v = ir.Value(
        name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
        const_value=tensor,
    )  # fmt: skip
    v.metadata_props[QUANTIZE_KEY] = quantize
    graph.register_initializer(v)
    return v


def _node_for(graph: ir.Graph, r: MoERegion) -> ir.Node:
    prefix = f"modec.moe{r.index}"
    x = r.experts
    rt = r.router
    arrays: dict[str, tuple[np.ndarray | LazyArray | None, str]] = {
        "router_weight": (rt.weight, "never"),
        "router_bias": (rt.bias, "never"),
        "gate": (x.gate, "expert"),
        "up": (x.up, "expert"),
        "down": (x.down, "expert"),
        "gate_bias": (x.gate_bias, "never"),
        "up_bias": (x.up_bias, "never"),
        "down_bias": (x.down_bias, "never"),
        "correction_bias": (rt.correction_bias, "never"),
    }
    shared_act = "silu"
    if r.shared is not None:
        sw = r.shared.weights
        arrays["shared_gate"] = (None if sw.gate is None else sw.gate.expert(0), "never")
        arrays["shared_up"] = (sw.up.expert(0), "never")
        arrays["shared_down"] = (sw.down.expert(0), "never")
        arrays["shared_expert_gate"] = (r.shared.expert_gate, "never")
        shared_act = sw.activation
    inputs: list[ir.Value | None] = [r.hidden]
    for name in INPUT_NAMES[1:]:
        arr, q = arrays.get(name, (None, "never"))
        inputs.append(None if arr is None else _init(graph, f"{prefix}.{name}", arr, q))
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = {
        "num_experts": r.num_experts,
        "top_k": r.top_k,
        "scoring": rt.scoring,
        "norm_topk_prob": int(rt.norm_topk_prob),
        "softmax_after_topk": int(rt.softmax_after_topk),
        "n_group": rt.n_group,
        "topk_group": rt.topk_group,
        "routed_scaling_factor": float(rt.routed_scaling_factor),
        "activation": x.activation,
        "alpha": float(x.alpha),
        "limit": float(x.limit),
        "gated": int(x.gated),
        "has_shared": int(r.shared is not None),
        "shared_gated": int(r.shared is not None and r.shared.expert_gate is not None),
        "shared_activation": shared_act,
    }
    # The reference runs in float32; the output keeps the hidden input's shape.
    out = ir.Value(
        name=f"{prefix}.output", shape=r.output.shape or r.hidden.shape,
        type=ir.TensorType(ir.DataType.FLOAT),
    )  # fmt: skip
    node = ir.Node(
        DOMAIN, OP_TYPE, inputs,
        attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
        outputs=[out], name=f"{prefix}/MoE",
    )  # fmt: skip
    node.metadata_props["modec.moe.form"] = r.form
    node.metadata_props["modec.moe.gate_layout"] = r.gate_layout
    node.metadata_props["modec.moe.source"] = r.name
    node.metadata_props["modec.moe.layer"] = str(r.index)
    node.metadata_props["modec.moe.original_output"] = r.output.name or ""
    return node


def canonicalize_moe(model: ir.Model, regions: Sequence[MoERegion] | None = None) -> list[ir.Node]:
    """Replace every MoE region of ``model`` by one canonical node, in place.

    Args:
        model: the model to rewrite.
        regions: the regions to replace (default: `find_moe(model)`).

    Returns:
        The new MoE nodes in graph order (empty when the model has no MoE layer).
    """
    graph = model.graph
    regions = list(find_moe(model) if regions is None else regions)
    new_nodes: list[ir.Node] = []
    for r in regions:
        node = _node_for(graph, r)
        producer = r.output.producer()
        assert producer is not None
        graph.insert_after(producer, node)
        old_out = r.output
        # A graph output keeps its name: hand it over before rewiring (onnx_ir refuses to
        # rewire a value that is still a graph output).
        if old_out.is_graph_output():
            name = old_out.name
            old_out.name = f"{name}.replaced"
            node.outputs[0].name = name
            outs = graph.outputs
            for i, v in enumerate(outs):
                if v is old_out:
                    outs[i] = node.outputs[0]
        ir.convenience.replace_all_uses_with(old_out, node.outputs[0])
        _remove_dead(graph, r)
        new_nodes.append(node)
    if regions:
        model.opset_imports.setdefault(DOMAIN, 1)
        graph.opset_imports.setdefault(DOMAIN, 1)
    log.info("canonicalize-moe: replaced %d MoE region(s)", len(new_nodes))
    return new_nodes


def _remove_dead(graph: ir.Graph, r: MoERegion) -> None:
    """Remove the region's nodes, and helpers and initializers only they used."""
    index = GraphIndex(graph)
    candidates = index.backward([r.output]) | set(r.nodes)
    used_inits: set[ir.Value] = set()
    for n in sorted(candidates, key=lambda n: -index.pos.get(n, -1)):
        if n not in index.pos:
            continue
        if any(v.uses() or v.is_graph_output() for v in n.outputs):
            continue
        used_inits.update(v for v in index.all_inputs(n) if v.is_initializer())
        # Subgraph nodes hold uses of outer values: drop them so those values can die too.
        for sub in list(subgraph_nodes(n)):
            for i in range(len(sub.inputs)):
                sub.replace_input_with(i, None)
        graph.remove(n, safe=True)
    for v in used_inits:
        if v.name and not v.uses() and not v.is_graph_output() and v.name in graph.initializers:
            del graph.initializers[v.name]
