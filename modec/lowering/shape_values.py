"""Shape values: the integer tensors of a graph that are computed from shapes and constants.

A `ShapeValue` is such a tensor known at import time up to the graph's symbolic dimensions
(``batch``, ``seq``): an object array of TIR integer expressions. Nothing is emitted for
it; a consumer that reads it as a shape gets its elements as a ``ShapeExpr``
(`modec.lowering.shape_ops`), one that reads it as data gets it through `materialize` (a
constant, or ``shape_to_tensor`` of its elements). `modec.lowering.shape_eval` computes
them; `modec.lowering.onnx_import` explains why the importer works this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import relax, tirx

__all__ = [
    "MAX_ELEMENTS",
    "ShapeValue",
    "as_bool",
    "as_i64",
    "materialize",
    "obj_array",
    "onnx_numpy",
    "static_ints",
]

#: The largest shape value tracked (elements); larger int tensors are data, not shapes.
MAX_ELEMENTS = 4096


@dataclass(frozen=True)
class ShapeValue:
    """An int or bool tensor known at import time up to the symbolic dimensions.

    Attributes:
        values: object array of ``tirx.PrimExpr`` (int64 expressions, or bool for ``bool``).
        dtype: the ONNX-side element type (``int64``, ``int32``, ``bool`` ...).
    """

    values: np.ndarray
    dtype: str

    def static(self) -> np.ndarray | None:
        """The numpy value when no element is symbolic, else None."""
        if not all(isinstance(v, tirx.IntImm) for v in self.values.flat):
            return None
        flat = [int(v.value) for v in self.values.flat]
        return np.array(flat, dtype=self.dtype).reshape(self.values.shape)

    def dims(self) -> list[Any]:
        """The elements of a 1-D int value as shape dimensions (int64 expressions)."""
        return [as_i64(v) for v in self.values.reshape(-1)]


def as_i64(v: Any) -> Any:
    if isinstance(v, int | np.integer):
        return tirx.IntImm("int64", int(v))
    return v if str(v.ty) == "int64" else tirx.Cast("int64", v)


def as_bool(v: Any) -> Any:
    return v if str(v.ty) == "bool" else tirx.NE(v, tirx.IntImm(str(v.ty), 0))


def obj_array(items: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        arr[i] = v
    return arr.reshape(tuple(shape))


def materialize(bb: relax.BlockBuilder, sv: ShapeValue) -> relax.Expr:
    """A shape value as a Relax tensor: a constant, or the int64 tensor of its elements."""
    st = sv.static()
    if st is not None:
        return relax.const(st, sv.dtype)
    flat = [tirx.Cast("int64", v) if sv.dtype == "bool" else as_i64(v) for v in sv.values.flat]
    out: relax.Expr = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr(flat)))
    if sv.values.ndim != 1:
        out = bb.normalize(relax.op.reshape(out, list(sv.values.shape)))
    if sv.dtype != "int64":
        out = bb.normalize(relax.op.astype(out, sv.dtype))
    return out


def static_ints(sv: ShapeValue | None) -> list[int] | None:
    st = sv.static() if sv is not None else None
    return None if st is None else [int(v) for v in st.reshape(-1)]


def onnx_numpy(t: Any) -> np.ndarray:
    """An ONNX TensorProto attribute as numpy."""
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(t))
