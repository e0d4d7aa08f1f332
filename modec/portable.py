"""A canonical model that can travel to another process or machine without its weights.

The Ray tasks of measure-sensitivity need the analysed model (the canonical graph whose
expert stacks are lazy views of the input's weights). An ``ir.Model`` cannot be pickled as
it is (its graph is a deep web of nodes and values; a memory-mapped tensor holds its
mapping), and serializing it to ONNX would materialize every lazy expert stack. So
`PortableModel.of` writes:

- the graph as ONNX bytes with every initializer replaced by an empty placeholder (names,
  types and shapes only, as `modec.cache.hash_model` hashes it);
- per initializer, what its value is made of: a tensor in the input's external data as its
  file reference (absolute path, offset, length: mapped again where it is loaded, never
  copied), a canonical `~modec.moe.canonical.LazyWeight` as its recipe over such references,
  any other tensor as its array.

`PortableModel.load` puts the two back together. The loaded model computes exactly what the
original does (the same graph, the same bytes behind every weight). On several machines the
input model's files must be at the same path on each (a shared file system); small models
with their weights inline travel whole.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["PortableModel"]


def _external(
    base_dir: str, location: str, offset: int | None, length: int | None, dtype: int,
    shape: tuple[int, ...], name: str,
) -> ir.ExternalTensor:  # fmt: skip
    return ir.ExternalTensor(
        location, offset, length, ir.DataType(dtype), shape=ir.Shape(shape), name=name,
        base_dir=base_dir,
    )  # fmt: skip


def _pickler(buf: io.BytesIO) -> pickle.Pickler:
    import cloudpickle  # the lazy recipes hold small functions (casts, scales)

    class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, ir.ExternalTensor):  # the file reference, not the mapping
                return _external, (
                    os.path.abspath(os.fspath(obj.base_dir)), os.fspath(obj.location),
                    obj.offset, obj.length, int(obj.dtype), tuple(obj.shape.numpy()),
                    obj.name or "",
                )  # fmt: skip
            return super().reducer_override(obj)

    p: pickle.Pickler = _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    return p


@dataclass(frozen=True, eq=False)
class PortableModel:
    """A model as bytes that hold no weight of the input's external data; see the module
    docstring.

    Attributes:
        token: names this model in a worker's cache (one executor per model, not per task).
        graph: the ONNX graph with placeholder initializers.
        tensors: the pickled initializer values (`_Pickler`).
    """

    token: str
    graph: bytes
    tensors: bytes

    @classmethod
    def of(cls, model: ir.Model) -> PortableModel:
        from modec.moe.canonical import LazyWeight

        values: dict[str, tuple[str, Any]] = {}
        swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
        try:
            for name, v in model.graph.initializers.items():
                t = v.const_value
                if t is None:
                    continue
                if isinstance(t, LazyWeight):
                    values[name] = ("lazy", t.source)
                elif isinstance(t, ir.ExternalTensor):
                    values[name] = ("tensor", t)
                elif isinstance(t, ir.LazyTensor):  # e.g. dequantized codes: its values
                    values[name] = ("tensor", ir.tensor(np.asarray(t.numpy()), name=name))
                else:
                    values[name] = ("tensor", t)
                v.const_value = ir.ExternalTensor(
                    "modec-portable", 0, t.nbytes, t.dtype, shape=ir.Shape(t.shape.numpy()),
                    name=name,
                )  # fmt: skip
                swapped.append((v, t))
            graph = ir.to_proto(model).SerializeToString()
        finally:
            for v, t in swapped:
                v.const_value = t
        buf = io.BytesIO()
        _pickler(buf).dump(values)
        return cls(uuid.uuid4().hex, graph, buf.getvalue())

    def load(self) -> ir.Model:
        """The model, its weights mapped from their files (or held, when they were inline)."""
        from modec.moe.canonical import LazyWeight

        model = ir.serde.deserialize_model(onnx.ModelProto.FromString(self.graph))
        values: dict[str, tuple[str, Any]] = pickle.loads(self.tensors)
        for name, (kind, value) in values.items():
            v = model.graph.initializers[name]
            v.const_value = LazyWeight(value, name) if kind == "lazy" else value
        return model
