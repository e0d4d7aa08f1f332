"""Converters for the ops that take a shape operand, when that operand is a `ShapeValue`.

`modec.lowering.shape_eval` evaluates the graph's shape computations at import time; the ops
here consume such a value as a shape (``Reshape``, ``Expand``, ``ConstantOfShape``,
``Range``, ``Tile``, ``Slice``) and become one Relax op whose output shape is the symbolic
value itself, so that every tensor downstream keeps shapes in terms of the graph's input
dimensions. Each returns None when its operands are not of that kind (a data-dependent
shape): the importer then hands the node to the frontend.

ONNX semantics kept: Reshape's ``0`` copies the input dimension unless ``allowzero``, and
``-1`` is left to Relax's inference; Expand broadcasts both ways (a target ``1`` keeps the
data dimension); Slice clamps starts and ends into ``[0, dim]``, except that a computed one
known to be >= 0 is trusted to be in bounds, as the frontend does (positive steps; a
negative step is left to the frontend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax, tirx

from modec.lowering.shape_eval import ShapeEvaluator
from modec.lowering.shape_values import ShapeValue, onnx_numpy

__all__ = ["SHAPE_OPERAND_OPS", "convert_shape_op"]


def _int(e: Any) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _reshape(ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
    data, shape = x[0], x[1]
    dims = ev.shape_of(data)
    if not isinstance(shape, ShapeValue) or dims is None:
        return None
    target = shape.dims()
    if not int(attrs.get("allowzero", 0)):
        target = [dims[i] if _int(t) == 0 else t for i, t in enumerate(target)]
    return relax.op.reshape(data, relax.ShapeExpr(target))


def _broadcast_dim(ev: ShapeEvaluator, d: Any, t: Any) -> Any:
    """ONNX Expand of data dim ``d`` to target dim ``t`` (broadcasting both ways)."""
    if _int(t) in (1, -1):
        return d
    if _int(d) == 1 or ev.analyzer.can_prove_equal(d, t):
        return t
    if _int(t) is not None and _int(d) is not None:
        raise ValueError(f"ONNX Expand: cannot broadcast dimension {d} to {t}")
    if _int(t) is not None:
        return t  # d is 1 or t at run time
    if _int(d) is not None:
        return d  # t is 1 or d at run time
    return ev.analyzer.simplify(tirx.max(d, t))


def _expand(ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
    data, shape = x[0], x[1]
    dims = ev.shape_of(data)
    if not isinstance(shape, ShapeValue) or dims is None:
        return None
    target = shape.dims()
    rank = max(len(dims), len(target))
    one = tirx.IntImm("int64", 1)
    dims = [one] * (rank - len(dims)) + list(dims)
    target = [one] * (rank - len(target)) + target
    out = [_broadcast_dim(ev, d, t) for d, t in zip(dims, target, strict=True)]
    return relax.op.broadcast_to(data, relax.ShapeExpr(out))  # right-aligns a lower rank


def _constant_of_shape(
    ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]
) -> relax.Expr | None:
    shape = x[0]
    if not isinstance(shape, ShapeValue):
        return None
    value = attrs.get("value")
    arr = onnx_numpy(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    fill = relax.const(arr[0], str(arr.dtype))
    return relax.op.full(relax.ShapeExpr(shape.dims()), fill, str(arr.dtype))


def _scalar(v: Any) -> Any:
    if isinstance(v, ShapeValue) and v.values.size == 1:
        return v.values.reshape(-1)[0]
    return None


def _range(ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
    ends = [_scalar(v) for v in x[:3]]
    if any(e is None for e in ends) or not isinstance(x[0], ShapeValue):
        return None
    start, limit, delta = ends
    return relax.op.arange(start, limit, delta, x[0].dtype)


def _tile(ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
    data, reps = x[0], x[1]
    dims = ev.shape_of(data)
    if not isinstance(reps, ShapeValue) or dims is None:
        return None
    r = reps.dims()
    if len(r) != len(dims):
        return None
    # tile = broadcast [1, d0, 1, d1, ...] to [r0, d0, r1, d1, ...], then merge each pair
    one = tirx.IntImm("int64", 1)
    inter = [v for d in dims for v in (one, d)]
    wide = [v for rd in zip(r, dims, strict=True) for v in rd]
    y = relax.op.broadcast_to(relax.op.reshape(data, relax.ShapeExpr(inter)), relax.ShapeExpr(wide))
    merged = [ev.analyzer.simplify(a * d) for a, d in zip(r, dims, strict=True)]
    return relax.op.reshape(y, relax.ShapeExpr(merged))


def _clamp(ev: ShapeEvaluator, v: Any, dim: Any) -> Any:
    """A start or end into ``[0, dim]``; a symbolic one that is >= 0 is taken as in bounds.

    ``pos_emb[:seq]`` (a position table sliced to the sequence) is exactly ``min(seq,
    max_len)`` rows, which no later op can match with ``seq``; like the frontend, a computed
    bound is trusted to be within the dimension (the input must not outgrow the table).
    """
    zero = tirx.IntImm("int64", 0)
    if _int(v) is None and ev.analyzer.can_prove(tirx.GE(v, zero)):
        return v
    pos = tirx.Select(tirx.LT(v, zero), v + dim, v)
    return ev.analyzer.simplify(tirx.min(tirx.max(pos, zero), dim))


def _saturate(v: Any, dim: Any) -> Any:
    n = _int(v)
    if n is not None and abs(n) >= 2**62:
        return dim if n > 0 else tirx.IntImm("int64", 0)
    return v


def _slice(ev: ShapeEvaluator, x: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
    data = x[0]
    dims = ev.shape_of(data)
    params = [*x[1:5], None, None, None][:4]
    if dims is None or params[0] is None or params[1] is None:
        return None
    if not all(p is None or isinstance(p, ShapeValue) for p in params):
        return None
    starts, ends = params[0].dims(), params[1].dims()
    axes = params[2].static() if params[2] is not None else np.arange(len(starts))
    steps = params[3].static() if params[3] is not None else np.ones(len(starts), np.int64)
    if axes is None or steps is None or any(int(s) <= 0 for s in steps.reshape(-1)):
        return None
    axes_l = [int(a) % len(dims) for a in axes.reshape(-1)]
    # starts and ends beyond int64's half range mean "from the start" or "to the end"
    starts = [_saturate(s, dims[a]) for s, a in zip(starts, axes_l, strict=True)]
    ends = [_saturate(e, dims[a]) for e, a in zip(ends, axes_l, strict=True)]
    begin = [_clamp(ev, s, dims[a]) for s, a in zip(starts, axes_l, strict=True)]
    end = [_clamp(ev, e, dims[a]) for e, a in zip(ends, axes_l, strict=True)]
    return relax.op.strided_slice(
        data, axes_l, begin, end, [int(s) for s in steps.reshape(-1)], assume_inbound=True
    )


_Converter = Callable[[ShapeEvaluator, list[Any], dict[str, Any]], relax.Expr | None]

#: op type -> (converter, positions of the operands it reads as shapes)
SHAPE_OPERAND_OPS: dict[str, tuple[_Converter, tuple[int, ...]]] = {
    "Reshape": (_reshape, (1,)),
    "Expand": (_expand, (1,)),
    "ConstantOfShape": (_constant_of_shape, (0,)),
    "Range": (_range, (0, 1, 2)),
    "Tile": (_tile, (1,)),
    "Slice": (_slice, (1, 2, 3, 4)),
}


def convert_shape_op(
    ev: ShapeEvaluator,
    op: str,
    inputs: list[Any],
    attrs: dict[str, Any],
    tensor: Callable[[int], relax.Expr],
) -> relax.Expr | None:
    """The Relax expression of ``op`` when a shape operand is a symbolic `ShapeValue`.

    ``tensor(i)`` gives operand ``i`` as a Relax tensor (a data operand that is itself a
    shape value is materialized). Returns None when no shape operand is symbolic (the
    frontend folds constant ones as it always did) or the operands are not of the kind the
    converter handles.
    """
    entry = SHAPE_OPERAND_OPS.get(op)
    if entry is None:
        return None
    conv, positions = entry
    operands = [
        (ev.known(x) or x) if p in positions and x is not None else x for p, x in enumerate(inputs)
    ]
    if not any(
        isinstance(operands[p], ShapeValue) and operands[p].static() is None
        for p in positions
        if p < len(operands)
    ):
        return None
    operands = [
        tensor(p) if p not in positions and isinstance(x, ShapeValue) else x
        for p, x in enumerate(operands)
    ]
    return conv(ev, operands, attrs)
