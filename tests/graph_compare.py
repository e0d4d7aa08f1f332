"""Structural equality of two ONNX models, for Before/Expected graph tests (as TVM's
``tvm.ir.assert_structural_equal``).

Both models are rendered to a canonical text in which a value is named by where it comes
from, not by its name: a graph input by its name, an initializer by ``@name``, the output of
the i-th node (graph order) by ``%i`` (``%i.j`` for multi-output nodes), a missing optional
input by ``_``. Two models are equal when their renderings are (same opset imports, graph
inputs and outputs with types and shapes, initializer names, types, shapes and
``metadata_props``, and, node by node in graph order: domain, op type, attributes,
``metadata_props``, wiring and output types), and their initializer values are equal
(`numpy.testing`). Node names and intermediate value names do not count. A value used before
it is produced renders as ``?name``, so an unsorted graph never equals a sorted Expected.

On failure the message is a unified diff of the two renderings (``-`` expected, ``+`` actual).
"""

from __future__ import annotations

import difflib

import numpy as np
import onnx_ir as ir

__all__ = ["assert_graph_equal", "render"]


def assert_graph_equal(
    actual: ir.Model, expected: ir.Model, *, metadata: bool = True, rtol: float = 0.0
) -> None:
    """Assert that ``actual`` and ``expected`` are the same graph (see the module docstring).

    Args:
        actual: the model the code under test produced.
        expected: the model written by hand.
        metadata: also compare node and initializer ``metadata_props``.
        rtol: relative tolerance for initializer values (0: exactly equal).

    Raises:
        AssertionError: with a unified diff of the renderings, or naming the initializer
            whose values differ.
    """
    got, want = render(actual, metadata=metadata), render(expected, metadata=metadata)
    if got != want:
        diff = difflib.unified_diff(want, got, "expected", "actual", lineterm="", n=2)
        raise AssertionError("graphs differ (- expected, + actual):\n" + "\n".join(diff))
    inits = expected.graph.initializers
    for name, value in actual.graph.initializers.items():
        a, e = _array(value), _array(inits[name])
        if rtol:
            np.testing.assert_allclose(a, e, rtol=rtol, err_msg=f"initializer {name!r}")
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"initializer {name!r}")


def render(model: ir.Model, *, metadata: bool = True) -> list[str]:
    """The canonical text of ``model``: one line per opset import, graph input, initializer,
    node, attribute, metadata entry and graph output; attribute and metadata lines repeat
    their node's key, so a diff line says which node it is about."""
    graph = model.graph
    lines = [f"opset {d or '<default>'} {v}" for d, v in sorted(model.opset_imports.items())]
    names: dict[ir.Value, str] = {}
    for v in graph.inputs:
        names[v] = v.name or "?"
        lines.append(f"input {v.name}: {_type(v)}")
    for name, v in sorted(graph.initializers.items()):
        names[v] = f"@{name}"
        lines.append(f"initializer @{name}: {_type(v)}")
        lines += _meta(f"  @{name}", v.metadata_props, metadata)
    lines += _nodes(graph, names, "%", metadata, "")
    for v in graph.outputs:
        lines.append(f"output {v.name}: {_type(v)} = {_ref(v, names)}")
    return lines


def _nodes(
    graph: ir.Graph, names: dict[ir.Value, str], prefix: str, metadata: bool, indent: str
) -> list[str]:
    lines = []
    for i, node in enumerate(graph):
        key = f"{prefix}{i}"
        ins = ", ".join(_ref(v, names) for v in node.inputs)
        outs = []
        for j, v in enumerate(node.outputs):
            names[v] = key if len(node.outputs) == 1 else f"{key}.{j}"
            outs.append(f"{names[v]}: {_type(v)}")
        op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        lines.append(f"{indent}{', '.join(outs)} = {op}({ins})")
        graphs = []
        for k, a in sorted(node.attributes.items()):
            if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs.append((k, a))
            else:
                lines.append(f"{indent}  {key} .{k} = {_attr(a)}")
        lines += _meta(f"{indent}  {key}", node.metadata_props, metadata)
        for k, a in graphs:
            subs = a.as_graphs() if a.type == ir.AttributeType.GRAPHS else [a.as_graph()]
            for s, sub in enumerate(subs):
                tag = f"{key}.{k}" + (f"[{s}]" if len(subs) > 1 else "")
                inner = dict(names)
                for j, v in enumerate(sub.inputs):
                    inner[v] = f"{tag}.in{j}"
                lines.append(f"{indent}  {tag}({', '.join(_type(v) for v in sub.inputs)}):")
                lines += _nodes(sub, inner, f"{tag}/%", metadata, indent + "    ")
                rets = ", ".join(_ref(v, inner) for v in sub.outputs)
                lines.append(f"{indent}    return {rets}")
    return lines


def _ref(v: ir.Value | None, names: dict[ir.Value, str]) -> str:
    if v is None:
        return "_"
    return names.get(v, f"?{v.name}")


def _type(v: ir.Value) -> str:
    dtype = v.dtype.name if v.dtype is not None else "?"
    if v.shape is None:
        return dtype
    dims = ",".join(str(d) if isinstance(d, int) else str(d.value) for d in v.shape)
    return f"{dtype}[{dims}]"


def _meta(key: str, props: dict[str, str], on: bool) -> list[str]:
    return [f"{key} meta {k} = {v!r}" for k, v in sorted(props.items())] if on else []


def _attr(a: ir.Attr) -> str:
    if a.is_ref():
        return f"@ref({a.ref_attr_name})"
    t, v = a.type, a.value
    if t == ir.AttributeType.FLOAT:
        return repr(float(np.float32(v)))
    if t == ir.AttributeType.FLOATS:
        return repr([float(np.float32(x)) for x in v])
    if t in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return repr(list(v))
    if t == ir.AttributeType.TENSOR:
        arr = np.asarray(v.numpy())
        return f"tensor({v.dtype.name}{list(arr.shape)} {arr.reshape(-1).tolist()!r})"
    return repr(v)


def _array(v: ir.Value) -> np.ndarray:
    tensor = v.const_value
    assert tensor is not None, f"initializer {v.name!r} has no value"
    return np.asarray(tensor.numpy())
