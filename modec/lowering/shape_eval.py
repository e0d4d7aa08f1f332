"""Import-time evaluation of a graph's shape computations (`ShapeValue`, element-wise).

`ShapeEvaluator.evaluate` computes one ONNX node whose operands are all known — shape
values, small int/bool constants, or (for ``Shape``/``Size``) any tensor with a known
Relax shape — and returns its value, or None when the node is not a shape computation
(a data operand, a float cast, a data-dependent index, a result over `MAX_ELEMENTS`).

Semantics are ONNX's, on integers: ``Div`` truncates, ``Mod`` follows ``fmod``, ``Where``
is a ``Select``, narrowing casts of static values wrap as numpy's do. Every element is
simplified by one analyzer that knows each symbolic dimension is in ``[0, 2**62]``, which
folds TorchScript's ``Equal(shape, -1)`` guards and dynamo's ``Max(dim, 1)`` broadcasts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from modec.lowering.shape_values import (
    MAX_ELEMENTS,
    ShapeValue,
    as_bool,
    as_i64,
    obj_array,
    onnx_numpy,
    static_ints,
)

__all__ = ["ShapeEvaluator"]

_INT = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")

#: What `ShapeEvaluator.known` reads: tracked values and constants.
_KNOWN = (ShapeValue, tvm.ir.GenericConst)


class ShapeEvaluator:
    """Evaluates ONNX nodes on `ShapeValue` operands (see the module docstring)."""

    def __init__(self) -> None:
        self.analyzer = tvm.sym.Analyzer()
        self._bounded: set[Any] = set()

    # -- operands --------------------------------------------------------------------------

    def known(self, x: Any) -> ShapeValue | None:
        """The shape value of an operand: a tracked value or a small int/bool constant."""
        if isinstance(x, ShapeValue):
            return x
        if isinstance(x, tvm.ir.GenericConst):
            return self.from_numpy(x.value.numpy())
        return None

    def from_numpy(self, arr: np.ndarray) -> ShapeValue | None:
        """A small int/bool array as a shape value (None for other dtypes or sizes)."""
        if arr.dtype.kind not in "iub" or arr.size > MAX_ELEMENTS:
            return None
        dtype = str(arr.dtype)
        elem = "bool" if dtype == "bool" else "int64"
        items = [tirx.const(bool(v) if elem == "bool" else int(v), elem) for v in arr.flat]
        return ShapeValue(obj_array(items, arr.shape), dtype)

    def bound_inputs(self, dims: Sequence[Any]) -> None:
        """The graph inputs' symbolic dimensions are at least 1 (a batch, a sequence)."""
        for d in dims:
            if isinstance(d, tirx.Var):
                self._bounded.add(d)
                self.analyzer.update(d, tvm.sym.ConstIntBound(1, 2**62), override=True)

    def shape_of(self, x: Any) -> list[Any] | None:
        """The dimensions of a tensor operand (symbolic ones bounded to be >= 0)."""
        if isinstance(x, ShapeValue):
            return [tirx.IntImm("int64", d) for d in x.values.shape]
        ty = getattr(x, "ty", None)
        if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
            return None
        dims = list(ty.shape.values)
        for d in dims:
            for v in _vars(d):
                if v not in self._bounded:
                    self._bounded.add(v)
                    self.analyzer.update(v, tvm.sym.ConstIntBound(0, 2**62))
        return dims

    def _make(self, items: Sequence[Any], shape: Sequence[int], dtype: str) -> ShapeValue | None:
        if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
            return None
        simple = [self.analyzer.simplify(v) for v in items]
        return ShapeValue(obj_array(simple, shape), dtype)

    def _wrap(self, arr: np.ndarray, dtype: str) -> ShapeValue | None:
        arr = np.asarray(arr, dtype=object)
        return self._make(list(arr.flat), arr.shape, dtype)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, op: str, inputs: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
        """The value of a single-output node, or None if it is not a shape computation."""
        if op == "Shape":
            dims = self.shape_of(inputs[0])
            if dims is None:
                return None
            rank = len(dims)
            start, end = int(attrs.get("start", 0)), int(attrs.get("end", rank))
            picked = dims[slice(*slice(start, end).indices(rank))]
            return self._make(picked, [len(picked)], "int64")
        if op == "Size":
            dims = self.shape_of(inputs[0])
            if dims is None:
                return None
            n: Any = tirx.IntImm("int64", 1)
            for d in dims:
                n = n * d
            return self._make([n], [], "int64")
        rule = _RULES.get(op)
        if rule is None or not all(x is None or isinstance(x, _KNOWN) for x in inputs):
            return None  # a data operand: not a shape computation
        vals = [self.known(x) if x is not None else None for x in inputs]
        return rule(self, vals, attrs) if vals and vals[0] is not None else None

    def _elementwise(
        self, vals: list[ShapeValue | None], fn: Callable[..., Any], dtype: str | None = None
    ) -> ShapeValue | None:
        if any(v is None for v in vals):
            return None
        arrays = [v.values for v in vals if v is not None]
        out = np.frompyfunc(fn, len(arrays), 1)(*arrays)
        return self._wrap(out, dtype or (vals[0].dtype if vals[0] is not None else "int64"))


def _vars(e: Any) -> list[Any]:
    return list(tvm.tirx.analysis.undefined_vars(e))


def _axes(attrs: dict[str, Any], vals: list[ShapeValue | None], rank: int) -> list[int] | None:
    """Axes from the second operand (opset >= 13) or the attribute; None if not static."""
    given = vals[1] if len(vals) > 1 else None  # None here: the operand is absent
    got = static_ints(given) if given is not None else list(attrs.get("axes", ()))
    return None if got is None else [a + rank if a < 0 else a for a in got]


def _squeeze(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    x = vals[0].values
    axes = _axes(attrs, vals, x.ndim)
    if axes is None:
        return None
    axes = axes or [i for i, d in enumerate(x.shape) if d == 1]
    return ev._wrap(np.squeeze(x, axis=tuple(axes)), vals[0].dtype)


def _unsqueeze(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    x = vals[0].values
    given = static_ints(vals[1]) if len(vals) > 1 else list(attrs.get("axes", ()))
    axes = None if given is None else _axes({"axes": given}, vals[:1], x.ndim + len(given))
    if axes is None:
        return None
    return ev._wrap(np.expand_dims(x, tuple(axes)), vals[0].dtype)


def _gather(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    idx = vals[1].static() if vals[1] is not None else None
    if idx is None:
        return None
    x = vals[0].values
    axis = int(attrs.get("axis", 0)) % max(x.ndim, 1)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return ev._wrap(np.take(x, idx, axis=axis), vals[0].dtype)


def _concat(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    if any(v is None for v in vals):
        return None
    axis = int(attrs.get("axis", 0))
    return ev._wrap(np.concatenate([v.values for v in vals], axis=axis), vals[0].dtype)


def _slice(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    x = vals[0].values
    given = [*vals[1:5], None, None, None, None][:4]  # None: absent
    params = [static_ints(v) if v is not None else None for v in given]
    if any(v is not None and p is None for v, p in zip(given, params, strict=True)):
        return None  # a symbolic start, end, axis or step
    starts, ends, axes, steps = params
    if starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[a % x.ndim] = slice(s, e, st)
    return ev._wrap(x[tuple(index)], vals[0].dtype)


def _reshape(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    target = static_ints(vals[1])
    if target is None:
        return None
    x = vals[0].values
    if not int(attrs.get("allowzero", 0)):
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return ev._wrap(x.reshape(target), vals[0].dtype)


def _flatten(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    x = vals[0].values
    axis = int(attrs.get("axis", 1)) % (x.ndim + 1)
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return ev._wrap(x.reshape(lead, -1), vals[0].dtype)


def _expand(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    target = static_ints(vals[1])
    if target is None:
        return None
    x = vals[0].values
    shape = np.broadcast_shapes(x.shape, tuple(target))
    return ev._wrap(np.broadcast_to(x, shape), vals[0].dtype)


def _tile(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    reps = static_ints(vals[1])
    return None if reps is None else ev._wrap(np.tile(vals[0].values, reps), vals[0].dtype)


def _constant_of_shape(
    ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]
) -> ShapeValue | None:
    shape = static_ints(vals[0])
    value = attrs.get("value")
    arr = onnx_numpy(value) if value is not None else np.zeros(1, np.float32)
    if shape is None or arr.dtype.kind not in "iub" or np.prod(shape) > MAX_ELEMENTS:
        return None
    return ev.from_numpy(np.full(shape, arr.reshape(-1)[0], arr.dtype))


def _range(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    ends = [static_ints(v) for v in vals]
    if any(e is None for e in ends) or len(ends) != 3:
        return None
    start, limit, delta = (e[0] for e in ends if e is not None)
    if delta == 0 or -(-(limit - start) // delta) > MAX_ELEMENTS:
        return None
    return ev.from_numpy(np.arange(start, limit, delta, dtype=vals[0].dtype))


def _cast(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    from onnx import helper

    to = str(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    st = vals[0].static()
    if st is not None and (to == "bool" or to in _INT):
        return ev.from_numpy(st.astype(to))  # numpy's wrap-around for narrowing casts
    if to == "bool":
        return ev._elementwise(vals, as_bool, "bool")
    if to in _INT:
        return ev._elementwise(vals, as_i64, to)
    return None


def _where(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    dtype = vals[1].dtype if vals[1] is not None else "int64"
    return ev._elementwise(vals, lambda c, a, b: tirx.Select(as_bool(c), a, b), dtype)


def _variadic(fn: Callable[[Any, Any], Any]) -> Any:
    def rule(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
        out: ShapeValue | None = vals[0]
        for v in vals[1:]:
            out = ev._elementwise([out, v], fn) if out is not None else None
        return out

    return rule


def _pointwise(fn: Callable[..., Any], arity: int = 2, dtype: str | None = None) -> Any:
    def rule(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
        return ev._elementwise(vals[:arity], fn, dtype)

    return rule


def _reduce(fn: Callable[[Any, Any], Any]) -> Any:
    def rule(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
        x = vals[0].values
        axes = _axes(attrs, vals, x.ndim)
        if axes is None:
            return None
        if not axes:
            if int(attrs.get("noop_with_empty_axes", 0)):
                return ev._wrap(x, vals[0].dtype)
            axes = list(range(x.ndim))
        out = x
        for a in sorted(axes, reverse=True):  # object ufuncs reduce one axis at a time
            out = np.frompyfunc(fn, 2, 1).reduce(out, axis=a, keepdims=True)
        if not int(attrs.get("keepdims", 1)):
            out = np.squeeze(out, axis=tuple(axes))
        return ev._wrap(out, vals[0].dtype)

    return rule


def _mod(ev: ShapeEvaluator, vals: list[Any], attrs: dict[str, Any]) -> ShapeValue | None:
    # fmod=0: the result takes the divisor's sign (floormod); fmod=1: the dividend's (C fmod)
    return ev._elementwise(vals[:2], tirx.truncmod if attrs.get("fmod") else tirx.floormod)


_RULES: dict[str, Callable[[ShapeEvaluator, list[Any], dict[str, Any]], ShapeValue | None]] = {
    "Identity": lambda ev, vals, attrs: vals[0],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Gather": _gather,
    "Concat": _concat,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "Where": _where,
    "Add": _pointwise(lambda a, b: a + b),
    "Sub": _pointwise(lambda a, b: a - b),
    "Mul": _pointwise(lambda a, b: a * b),
    "Div": _pointwise(tirx.truncdiv),
    "Mod": _mod,
    "Max": _variadic(tirx.max),
    "Min": _variadic(tirx.min),
    "Neg": _pointwise(lambda a: -a, 1),
    "Abs": _pointwise(lambda a: tirx.Select(tirx.LT(a, tirx.IntImm("int64", 0)), -a, a), 1),
    "Equal": _pointwise(tirx.EQ, 2, "bool"),
    "Less": _pointwise(tirx.LT, 2, "bool"),
    "LessOrEqual": _pointwise(tirx.LE, 2, "bool"),
    "Greater": _pointwise(tirx.GT, 2, "bool"),
    "GreaterOrEqual": _pointwise(tirx.GE, 2, "bool"),
    "And": _pointwise(lambda a, b: tirx.And(as_bool(a), as_bool(b)), 2, "bool"),
    "Or": _pointwise(lambda a, b: tirx.Or(as_bool(a), as_bool(b)), 2, "bool"),
    "Not": _pointwise(lambda a: tirx.Not(as_bool(a)), 1, "bool"),
    "ReduceProd": _reduce(lambda a, b: a * b),
    "ReduceSum": _reduce(lambda a, b: a + b),
    "ReduceMax": _reduce(tirx.max),
    "ReduceMin": _reduce(tirx.min),
}
