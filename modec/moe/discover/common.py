"""Projections: what every find-moe matcher (router, experts, shared expert) reads alike."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modec.moe._graph import attr, const_array, const_lazy, subgraph_nodes
from modec.moe.lazy import LazyArray

LINEAR = frozenset({"MatMul", "Gemm"})
RERUN_HINT = (
    'Re-export the model with experts_implementation="batched_mm" '
    '(model.set_experts_implementation("batched_mm") in transformers) and either exporter.'
)


@dataclass
class Proj:
    """One projection: its node, weight ``[..., N, K]`` (float32, read on demand), bias, and
    output after the bias."""

    node: ir.Node
    weight: LazyArray
    bias: np.ndarray | None
    out: ir.Value


def linear_weight(node: ir.Node) -> tuple[LazyArray, ir.Value] | None:
    """``(W[N, K], data input)`` of a MatMul/Gemm with a constant 2-D weight, else None.

    ``W`` is float32 and lazy: only its shape is known until it is read.
    """
    if node.op_type not in LINEAR or len(node.inputs) < 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    wa, wb = const_lazy(a), const_lazy(b)
    if node.op_type == "Gemm":
        if wb is None or wa is not None or wb.ndim != 2 or a is None:
            return None
        if attr(node, "transA", 0):
            return None
        w = wb if attr(node, "transB", 0) else wb.T
        alpha = float(attr(node, "alpha", 1.0))
        if alpha != 1.0 or w.dtype.kind != "f":  # x * 1.0 == x for floats
            w = w.map(lambda x: x * alpha)
        return w.astype(np.float32), a
    if wb is not None and wa is None and wb.ndim == 2 and a is not None:
        return wb.T.astype(np.float32), a
    return None


def linear_bias(node: ir.Node) -> tuple[np.ndarray | None, ir.Value]:
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


def linear_proj(node: ir.Node) -> Proj | None:
    """The `Proj` of a MatMul/Gemm with a constant 2-D weight (bias folded in), else None."""
    lw = linear_weight(node)
    if lw is None:
        return None
    b, o = linear_bias(node)
    return Proj(node, lw[0], b, o)


def initializer_names(values: Iterable[ir.Value | None]) -> list[str]:
    """Names of the graph initializers among ``values``."""
    names = []
    for v in values:
        if v is not None and v.is_initializer() and v.name:
            names.append(v.name)
    return names


def is_expert_node(n: ir.Node, router_mm: ir.Node) -> bool:
    """Whether top-level ``n`` computes (part of) an expert: any projection but the router's."""
    if n is router_mm:
        return False
    if n.op_type == "If" or n.op_type == "Loop":
        return any(s.op_type in LINEAR for s in subgraph_nodes(n))
    if n.op_type in LINEAR:
        return True
    return n.op_type == "Einsum"
