"""Which dense weights quantize-dense quantizes, and their simulated (dequantized) values.

MODE allocates widths to the routed experts only. At decode the attention projections and
the output head are read in full every step, so once the experts are at 2–4 bits those
dense weights are most of the bytes a step reads (docs/performance.md, "Where a modec step
goes"); ``--dense-bits`` quantizes them at one width, outside MODE's allocation.

A weight qualifies when:
1. it is a 2-D float initializer;
2. every one of its uses reaches the second input of a ``MatMul`` through at most one
   ``Transpose`` (perm [1, 0]) and any ``Cast`` to float, the same way for all of them
   (torch's ``Linear`` reads its [out, in] weight transposed);
3. the ``MatMul``'s activation comes from the text decoder: it depends on the token ids (a
   ``Gather`` of an integer graph input from a float table). The vision tower, which reads
   only the pixels, stays in full precision, as do the router (inside the canonical MoE
   node), the embedding table (read by a ``Gather``) and everything that is not a matmul
   weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modec.numerics.quant import QuantizedWeight

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class DenseWeight:
    """One qualifying weight: its value, whether the matmuls read it transposed, and the
    ``MatMul`` nodes that read it."""

    value: ir.Value
    transposed: bool
    matmuls: tuple[ir.Node, ...]


def _text_nodes(model: ir.Model) -> set[ir.Node]:
    """Every node that depends on the token ids: downstream of a ``Gather`` whose indices are
    an integer graph input and whose data is a float initializer (the embedding lookup)."""
    ints = {v for v in model.graph.inputs if v.dtype is not None and v.dtype.is_integer()}
    seeds = [
        n for n in model.graph
        if n.op_type == "Gather" and n.domain == "" and len(n.inputs) == 2
        and n.inputs[1] in ints and n.inputs[0] is not None
        and n.inputs[0].const_value is not None and n.inputs[0].dtype in _FLOATS
    ]  # fmt: skip
    seen: set[ir.Node] = set()
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for out in node.outputs:
            stack.extend(user for user, _ in out.uses())
    return seen


def _reads(value: ir.Value) -> tuple[bool, list[ir.Node]] | None:
    """``(transposed, matmuls)`` when every use of ``value`` is a MatMul's weight, through
    Casts to float and at most one Transpose [1, 0] on every path, the same on all; else
    None."""
    found: list[tuple[bool, ir.Node]] = []
    stack = [(value, False)]
    while stack:
        v, flipped = stack.pop()
        uses = list(v.uses())
        if not uses:
            return None
        for node, index in uses:
            if node.domain != "":
                return None
            if node.op_type == "MatMul" and index == 1:
                found.append((flipped, node))
            elif node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
                stack.append((node.outputs[0], flipped))
            elif node.op_type == "Transpose" and not flipped:
                perm = node.attributes.get_ints("perm")
                if perm is not None and list(perm) != [1, 0]:
                    return None
                stack.append((node.outputs[0], True))
            else:
                return None
    kinds = {flipped for flipped, _ in found}
    if len(kinds) != 1:
        return None
    return kinds.pop(), [n for _, n in found]


def dense_weights(model: ir.Model) -> list[DenseWeight]:
    """The weights quantize-dense quantizes, in graph order (module docstring)."""
    text = _text_nodes(model)
    out = []
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or v.dtype not in _FLOATS or len(t.shape) != 2:
            continue
        reads = _reads(v)
        if reads is None:
            continue
        transposed, matmuls = reads
        if all(m.inputs[0] is not None and m.inputs[0].producer() in text for m in matmuls):
            out.append(DenseWeight(v, transposed, tuple(matmuls)))
    return out


def weight_rows(value: ir.Value, transposed: bool) -> np.ndarray:
    """The weight as [N, K] float32 (output rows, reduction), whatever its stored layout."""
    assert value.const_value is not None
    w = np.asarray(value.const_value.numpy()).astype(np.float32)
    return w if transposed else np.ascontiguousarray(w.T)


def dequantized_dense(qw: QuantizedWeight, transposed: bool, name: str | None) -> ir.LazyTensor:
    """The weight's simulated value in its stored layout, float32, computed from the codes
    when read (the graph holds the one-byte codes, not four-byte weights)."""
    n, k = qw.q.shape
    shape = [n, k] if transposed else [k, n]

    def build() -> ir.TensorProtocol:
        w = qw.dequantize()
        return ir.tensor(w if transposed else np.ascontiguousarray(w.T), name=name)

    return ir.LazyTensor(build, ir.DataType.FLOAT, ir.Shape(shape), name=name)
