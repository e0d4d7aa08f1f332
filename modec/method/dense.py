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

With ``--dense-act-bits 8`` the activation of each quantized matmul is rounded to int8 per
group as well (`int8_rows`), in standard ONNX operators, so that the simulated model
computes what the artifact's int8 kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modec.numerics.activations import QMAX
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


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def int8_rows(
    graph: ir.Graph, x: ir.Value, k: int, group_size: int, opset: int
) -> tuple[ir.Value, list[ir.Node]]:
    """The nodes that replace ``x [..., k]`` by its int8 approximation per group of
    ``group_size`` along the last axis (`modec.numerics.activations.fake_quantize`, bit for
    bit: ``d = max|x| / 127``, ``q · d`` with ``q = Round(x / d)``, 0 for an all-zero group;
    the last axis padded with zeros to whole groups and cut back), inserted after ``x``'s
    producer (at the top of the graph for a graph input). Returns the new value and the
    nodes; the constants they read become initializers of ``graph``."""
    g = group_size
    kp = -(-k // g) * g
    pre = f"modec.int8/{x.name}"
    nodes: list[ir.Node] = []

    def const(tag: str, array: np.ndarray) -> ir.Value:
        v = _const(f"{pre}/{tag}", array)
        graph.register_initializer(v)
        return v

    def op(tag: str, op_type: str, inputs: list[ir.Value], dtype: ir.DataType,
           **attrs: int | list[int]) -> ir.Value:  # fmt: skip
        node = ir.node(op_type, inputs, attrs, name=f"{pre}/{tag}")
        out = node.outputs[0]
        out.name, out.dtype = f"{pre}/{tag}", dtype
        nodes.append(node)
        return out

    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    shape = op("shape", "Shape", [x], i64)
    rows = op("rows", "Reshape", [x, const("rows_shape", np.array([-1, k], np.int64))], f32)
    if kp != k:
        pads = const("pads", np.array([0, 0, 0, kp - k], np.int64))
        rows = op("pad", "Pad", [rows, pads], f32)
    groups = op(
        "groups", "Reshape", [rows, const("groups_shape", np.array([-1, g], np.int64))], f32
    )
    mag = op("abs", "Abs", [groups], f32)
    if opset >= 18:
        amax = op("amax", "ReduceMax", [mag, const("axes", np.array([1], np.int64))], f32,
                  keepdims=1)  # fmt: skip
    else:
        amax = op("amax", "ReduceMax", [mag], f32, axes=[1], keepdims=1)
    step = op("step", "Div", [amax, const("qmax", np.array(QMAX, np.float32))], f32)
    codes = op("codes", "Round", [op("scaled", "Div", [groups, step], f32)], f32)
    approx = op("approx", "Mul", [codes, step], f32)
    zero = const("zero", np.array(0.0, np.float32))
    nonzero = op("nonzero", "Greater", [step, zero], ir.DataType.BOOL)
    kept = op("kept", "Where", [nonzero, approx, zero], f32)
    back = op("back", "Reshape", [kept, const("back_shape", np.array([-1, kp], np.int64))], f32)
    if kp != k:
        back = op("cut", "Slice", [back, const("starts", np.array([0], np.int64)),
                                   const("ends", np.array([k], np.int64)),
                                   const("cut_axes", np.array([1], np.int64))], f32)  # fmt: skip
    out = op("out", "Reshape", [back, shape], f32)
    out.shape = x.shape
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    elif len(graph):
        graph.insert_before(graph[0], nodes)
    else:
        graph.extend(nodes)
    return out, nodes


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
