"""Dataflow helpers over an `onnx_ir` graph shared by find-moe, canonicalize-moe,
find-attention and the executor.

Values captured by a subgraph (an ``If`` branch reading an outer-scope value) count as inputs
of the node that owns the subgraph, so reachability at the top level sees through them. The
fine walks (direct uses, any depth) continue from a value an ``If`` branch returns to the
``If``'s output, so that e.g. TorchScript's ``squeeze(dim)`` on a dynamic dimension, exported
as ``If(dim == 1, Squeeze(x), Identity(x))``, is seen through like a plain ``Squeeze``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.moe import lazy
from modec.moe.lazy import LazyArray

SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"})


_OWNER = "modec.owner"


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def subgraph_nodes(node: ir.Node) -> Iterator[ir.Node]:
    """Every node inside ``node``'s subgraphs, recursively."""
    for g in _subgraphs(node):
        for sub in g:
            yield sub
            yield from subgraph_nodes(sub)


def mark_subgraph_owners(node: ir.Node) -> None:
    """Record in each subgraph's ``meta`` the node that owns it (read by `if_continuation`)."""
    for g in _subgraphs(node):
        g.meta[_OWNER] = node
        for sub in g:
            mark_subgraph_owners(sub)


def if_continuation(value: ir.Value) -> ir.Value | None:
    """The ``If`` output that ``value`` becomes when it is returned by one of its branches.

    Needs `mark_subgraph_owners` (done by `GraphIndex`); None for any other value.
    """
    p = value.producer()
    g = p.graph if p is not None else None
    owner = g.meta.get(_OWNER) if g is not None else None
    if owner is None or owner.op_type != "If":
        return None
    for i, out in enumerate(g.outputs):  # type: ignore[union-attr]
        if out is value and i < len(owner.outputs):
            outer: ir.Value = owner.outputs[i]
            return outer
    return None


def direct_users(value: ir.Value) -> list[ir.Node]:
    """Nodes reading ``value`` (any depth), continuing through ``If`` branch outputs."""
    out: dict[ir.Node, None] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        for u in v.uses():
            out[u.node] = None
        cont = if_continuation(v)
        if cont is not None:
            stack.append(cont)
    return list(out)


class GraphIndex:
    """Top-level producers and consumers of a graph, with subgraph uses lifted to their owner.

    Args:
        graph: the main graph; the index is a snapshot, rebuild it after editing the graph.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = list(graph)
        self.pos: dict[ir.Node, int] = {n: i for i, n in enumerate(self.nodes)}
        self.owner: dict[ir.Node, ir.Node] = {}
        for n in self.nodes:
            self.owner[n] = n
            mark_subgraph_owners(n)
            for sub in subgraph_nodes(n):
                self.owner[sub] = n
        self._implicit: dict[ir.Node, list[ir.Value]] = {}

    def top(self, node: ir.Node | None) -> ir.Node | None:
        """The top-level node that is ``node`` or owns it."""
        return None if node is None else self.owner.get(node)

    def producer(self, value: ir.Value | None) -> ir.Node | None:
        """Top-level producer of ``value`` (None for inputs and initializers)."""
        return None if value is None else self.top(value.producer())

    def consumers(self, value: ir.Value) -> list[ir.Node]:
        """Top-level consumers of ``value``, in graph order, each once."""
        found = {self.owner[u.node] for u in value.uses() if u.node in self.owner}
        return sorted(found, key=self.pos.__getitem__)

    def implicit_inputs(self, node: ir.Node) -> list[ir.Value]:
        """Outer-scope values that ``node``'s subgraphs read."""
        if node not in self._implicit:
            seen: dict[ir.Value, None] = {}
            for sub in subgraph_nodes(node):
                for v in sub.inputs:
                    if v is None:
                        continue
                    p = v.producer()
                    outer = (
                        (p is not None and self.owner.get(p) is not node)
                        or (p is None and v.graph is self.graph)
                    )  # fmt: skip
                    if outer:
                        seen[v] = None
            self._implicit[node] = list(seen)
        return self._implicit[node]

    def all_inputs(self, node: ir.Node) -> list[ir.Value]:
        """Explicit and implicit (subgraph-captured) inputs of a top-level node."""
        vals = [v for v in node.inputs if v is not None]
        return vals + [v for v in self.implicit_inputs(node) if v not in vals]

    def forward(
        self, values: Iterable[ir.Value], within: set[ir.Node] | None = None
    ) -> set[ir.Node]:
        """Top-level nodes reachable downstream of ``values`` (optionally inside ``within``)."""
        out: set[ir.Node] = set()
        stack = list(values)
        while stack:
            v = stack.pop()
            for c in self.consumers(v):
                if c in out or (within is not None and c not in within):
                    continue
                out.add(c)
                stack.extend(c.outputs)
        return out

    def backward(
        self, values: Iterable[ir.Value], within: set[ir.Node] | None = None
    ) -> set[ir.Node]:
        """Top-level nodes upstream of ``values`` (optionally inside ``within``)."""
        out: set[ir.Node] = set()
        stack = list(values)
        while stack:
            p = self.producer(stack.pop())
            if p is None or p in out or (within is not None and p not in within):
                continue
            out.add(p)
            stack.extend(self.all_inputs(p))
        return out

    def ordered(self, nodes: Iterable[ir.Node]) -> list[ir.Node]:
        """``nodes`` in graph (topological) order."""
        return sorted(nodes, key=self.pos.__getitem__)


def fine_forward(start: Iterable[ir.Node], allowed: set[ir.Node]) -> set[ir.Node]:
    """Nodes (at any nesting depth) downstream of ``start``'s outputs via direct uses.

    ``allowed`` bounds the walk (nodes at any depth); the start nodes themselves are excluded
    unless reached again.
    """
    return fine_forward_from([v for n in start for v in n.outputs], allowed)


def fine_forward_from(values: Iterable[ir.Value], allowed: set[ir.Node]) -> set[ir.Node]:
    """Nodes (at any nesting depth, inside ``allowed``) downstream of ``values``.

    Shape readers (``Shape``, ``Size``) end the walk: they carry no data.
    """
    out: set[ir.Node] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        for c in direct_users(v):
            if c in out or c not in allowed or c.op_type in _SHAPE_READERS:
                continue
            out.add(c)
            stack.extend(c.outputs)
    return out


_SHAPE_READERS = frozenset({"Shape", "Size"})


def shape_only(value: ir.Value, depth: int = 0) -> bool:
    """Whether ``value`` is computed from constants and tensor shapes alone (no data)."""
    if depth > 32:
        return False
    if is_const(value):
        return True
    p = value.producer()
    if p is None:
        return False
    if p.op_type in _SHAPE_READERS:
        return True
    return all(v is None or shape_only(v, depth + 1) for v in p.inputs)


def fine_backward(values: Iterable[ir.Value], allowed: set[ir.Node]) -> set[ir.Node]:
    """Nodes (at any nesting depth) upstream of ``values`` via direct producers."""
    out: set[ir.Node] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or p in out or p not in allowed:
            continue
        out.add(p)
        stack.extend(x for x in p.inputs if x is not None)
    return out


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_lazy(value: ir.Value | None, depth: int = 0) -> LazyArray | None:
    """``value`` as a `LazyArray` if it is a constant or a simple op over constants.

    Folds Identity, Cast, Transpose, Gather, Squeeze, Unsqueeze, Reshape, Slice, Neg and the
    four arithmetic ops (this covers the dynamo optimizer's ``Gather(W_stacked, e)`` and
    TorchScript's ``Transpose(W)``); anything else is not a constant. Reads only the small
    operands that decide the shape (indices, axes, shapes, slice bounds), never the data.
    """
    if value is None or depth > 8:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return lazy.source(tensor)
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDED:
        return None
    ins = [const_lazy(v, depth + 1) if v is not None else None for v in node.inputs]
    try:
        return _fold(node, ins)
    except (ValueError, IndexError, TypeError):
        return None


_FOLDED = frozenset(
    {"Identity", "Neg", "Cast", "Transpose", "Squeeze", "Unsqueeze", "Reshape", "Gather",
     "Slice", "Add", "Sub", "Mul", "Div"}
)  # fmt: skip
_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _ints(x: LazyArray | None) -> list[int] | None:
    return None if x is None else [int(a) for a in np.atleast_1d(x.numpy())]


def _fold(node: ir.Node, ins: list[LazyArray | None]) -> LazyArray | None:
    op = node.op_type
    x = ins[0] if ins else None
    if op in _ARITH:
        if len(ins) != 2 or ins[0] is None or ins[1] is None:
            return None
        a, b = ins[0], ins[1]
        np.asarray(_ARITH[op](np.ones(1, a.dtype), np.ones(1, b.dtype)))  # the dtypes combine
        return lazy.binary(_ARITH[op], a, b, a.dtype)
    if x is None:
        return None
    if op == "Identity":
        return x
    if op == "Neg":
        return x.map(np.negative)
    if op == "Cast":
        return x.astype(ir.DataType(int(attr(node, "to"))).numpy())
    if op == "Transpose":
        return x.transpose(attr(node, "perm"))
    if op == "Squeeze":
        # an axes input that is not a constant squeezes every unit axis, as np.squeeze(None)
        axes = _ints(ins[1]) if len(ins) > 1 else attr(node, "axes")
        return x.reshape(_squeezed(x.shape, axes))
    if op == "Unsqueeze":
        axes = _ints(ins[1]) if len(ins) > 1 else attr(node, "axes")
        if axes is None:
            return None
        return x.reshape(_unsqueezed(x.shape, [int(a) for a in np.atleast_1d(axes)]))
    if op == "Reshape":
        target = _ints(ins[1]) if len(ins) > 1 else None
        if target is None:
            return None
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(target)])
    if op == "Gather":
        if len(ins) < 2 or ins[1] is None:
            return None
        return x.take(ins[1].numpy().astype(np.int64), int(attr(node, "axis", 0)))
    if op == "Slice":
        if any(i is None for i in ins[1 : len(node.inputs)]) or len(ins) < 3:
            return None
        starts, ends = _ints(ins[1]), _ints(ins[2])
        assert starts is not None and ends is not None
        axes = _ints(ins[3]) if len(ins) > 3 else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for lo, hi, ax, st in zip(starts, ends, axes, steps, strict=True):  # type: ignore[arg-type]
            if st == 0:
                raise ValueError("slice step cannot be zero")
            sl[ax] = slice(lo, hi, st)
        return x.slice(sl)
    return None


def _squeezed(shape: tuple[int, ...], axes: Any) -> list[int]:
    if axes is None:
        return [d for d in shape if d != 1]
    drop = {_norm_axis(int(a), len(shape)) for a in np.atleast_1d(axes)}
    if any(shape[a] != 1 for a in drop):
        raise ValueError("cannot squeeze an axis whose size is not 1")
    return [d for i, d in enumerate(shape) if i not in drop]


def _unsqueezed(shape: tuple[int, ...], axes: list[int]) -> list[int]:
    n = len(shape) + len(axes)
    new = {_norm_axis(a, n) for a in axes}
    if len(new) != len(axes):
        raise ValueError("repeated axis")
    rest = iter(shape)
    return [1 if i in new else next(rest) for i in range(n)]


def _norm_axis(a: int, ndim: int) -> int:
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {a} out of range for {ndim} dimensions")
    return a % ndim


def const_array(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The numpy value of ``value`` if it folds to a constant (`const_lazy`), else None.

    Reads the data: for a weight that only needs its shape or a lazy value, use
    `const_lazy`.
    """
    x = const_lazy(value, depth)
    if x is None:
        return None
    try:
        return np.asarray(x.numpy())
    except (ValueError, IndexError, TypeError):
        return None


def is_const(value: ir.Value | None) -> bool:
    """Whether ``value`` folds to a constant (nothing is read)."""
    return const_lazy(value) is not None


def scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else None (a larger constant is not read)."""
    x = const_lazy(value)
    if x is None or x.size != 1:
        return None
    try:
        return float(np.asarray(x.numpy()).reshape(()))
    except (ValueError, IndexError, TypeError):
        return None


def name_scope(node: ir.Node) -> str | None:
    """The module path the dynamo exporter recorded for ``node``, if any."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    parts = [p.strip().strip("'\"") for p in raw.strip("[]").split(",")]
    parts = [p for p in parts if p]
    return parts[-2] if len(parts) >= 2 else None
