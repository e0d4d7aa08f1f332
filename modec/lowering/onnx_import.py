"""Phase 1 of the dense lowering: an ONNX model → a Relax module with detached weights.

`import_onnx` runs the Relax ONNX frontend's importer with ``keep_params_in_input=True``.
Float initializers become weight parameters of ``main`` (after the model inputs, in
initializer order, named as the frontend names them: the initializer name without an
``onnx::`` prefix); integer and 0-d initializers (shapes, axes, scalars) become ``Constant``
nodes first, so that they are known at import time (as weight parameters nobody can read
them; Reshape then fails). Custom ONNX ops (such as ``ai.modec::MoE``) are imported through
``op_converters``; a few standard ops whose frontend converter fails on graphs modec lowers
get their own converter here (``_FRONTEND_FIXES``). Ops that cannot be imported raise
`ModelError` naming the op and the node. The later phases are in `modec.lowering.dense`.

**Weights are declared, not read** (issue #15: a paper-sized model's dense weights are
~1.5 B parameters). An initializer named in ``weights`` is declared from its ``dims`` and
``data_type`` alone (its proto entry may hold no data: an external reference that points
nowhere) and its `DenseModule.params` value is the given `modec.moe.lazy.LazyArray`, read
when the artifact is written. Other initializers are read from the proto as the frontend
reads them. With ``upcast=True`` (a graph that `modec.executor.upcast_float16` made compute
in float32, all but its weights), a 16-bit float weight keeps its stored dtype as a
parameter and is cast to float32 where it is read (`_Importer._read_as`): its
``Cast``-to-float32 uses cast it once, ops that only move data (``Gather``, ``Transpose``,
reshapes: `_MOVES`) run on the 16-bit value and their result is cast the same way, and
every other op reads one ``astype(w, "float32")`` emitted at its first use. The scheduled
matmuls then take the 16-bit weight itself (`modec.lowering.dense`).

**Shapes are evaluated, not imported.** Exported transformers graphs compute every reshape
target, mask size and position range at run time from ``Shape`` ops (TorchScript: ``Shape →
Gather → Unsqueeze → Concat``, its ``ConstantOfShape → Mul(-1) → Equal → Where → Expand``
guard; dynamo: ``Max → Shape → Expand``). The frontend follows such chains only in part;
where it falls off it builds runtime int64 tensors whose values it cannot read, and the op
that needs a shape from them fails (a 0-d ``ConstantOfShape``: "broadcast_to expects the
input shape to have the number of ndim at least…"; ``Expand``: "'NoneType' object is not
iterable") or invents a dimension (``Range`` → ``range_len_0``) that no later op can match
with ``seq``, so the MoE node downstream cannot be lowered. So this importer runs its own
node loop: a node whose operands are all known — `ShapeValue` s, small int/bool constants,
the shape of a tensor — is evaluated by `modec.lowering.shape_eval` into a `ShapeValue` (TIR
expressions of the graph's ``batch``/``seq``, nothing emitted); an op that takes a symbolic
shape operand (Reshape, Expand, ConstantOfShape, Range, Tile, Slice) is converted by
`modec.lowering.shape_ops` into one Relax op of exactly that shape; every other node goes to
the frontend as before, with the shape values it reads as data materialized.

Why this and not the alternatives, measured on the tiny transformers families of
``tests/fixtures/models.py`` (6 families × TorchScript and dynamo):

- *onnxscript's optimizer* (constant folding with symbolic shape inference) cannot fold what
  depends on batch and seq: Mixtral's dynamo graph comes out unchanged (155 → 155 nodes,
  6 Expand), its TorchScript graph keeps 5 Expand, 6 Where and 3 ConstantOfShape on runtime
  shapes. Smaller, still not importable.
- *a converter per failing op* (``_FRONTEND_FIXES``) fixes the op that raises, not the
  shapes already lost upstream of it.
- *running dense segments in onnxruntime inside the artifact* gives up TVM for the dense
  ops and adds a second runtime; not needed.

Evaluating is exact (ONNX integer semantics) and local: a graph the frontend imported before
is imported the same (the bundled digits-vlm gives the same Relax module, byte for byte, so
the same ``model.so``), and a node the evaluator does not know is the frontend's as before.
What it does not cover: shapes computed in floating point (a float ``Range`` to a
``Cast(seq)``), multi-output ops on shapes (``Split``), data-dependent shapes (``NonZero``)
— those stay with the frontend. Graph input dimensions are taken to be ≥ 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx
import tvm
import tvm.relax.frontend.onnx
from onnx import helper
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend

from modec import kv_cache
from modec.artifact import TensorSpec
from modec.errors import InternalError, ModecError, ModelError
from modec.frontend import ONNX_DTYPES as _ONNX_DTYPES
from modec.lowering.shape_eval import ShapeEvaluator
from modec.lowering.shape_ops import convert_shape_op
from modec.lowering.shape_values import ShapeValue, materialize
from modec.moe.lazy import LazyArray

__all__ = ["DenseModule", "OpConverter", "import_onnx", "static_extent"]

logger = logging.getLogger(__name__)

#: A converter for a custom ONNX op: (block builder, inputs, attributes) -> Relax expression.
OpConverter: TypeAlias = Callable[[relax.BlockBuilder, list[Any], dict[str, Any]], relax.Expr]


@dataclass
class DenseModule:
    """A Relax module plus what the artifact needs to run it.

    Attributes:
        mod: the IRModule; ``main(*inputs, *params)``.
        params: weights in the order of ``main``'s parameters after the inputs; the keys
            are the Relax parameter names (the artifact's tensor names). A value is an
            array, or a `LazyArray` (a weight `import_onnx` was given, read when written).
        inputs: the ONNX graph inputs (name, dtype, shape with symbolic dims as strings).
        outputs: the ONNX graph outputs, in ``main``'s return order.
        stats: counters of what the lowering did (matmuls scheduled, left to the default).
    """

    mod: tvm.IRModule
    params: dict[str, np.ndarray | LazyArray]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    stats: dict[str, int] = field(default_factory=dict)


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    try:
        return onnx.load(str(path))
    except FileNotFoundError as exc:
        raise ModelError(
            f"ONNX model {path} does not exist; pass the path of a .onnx file"
        ) from exc
    except Exception as exc:  # onnx raises DecodeError and friends; name the file instead
        raise ModelError(f"cannot read ONNX model {path}: {exc}; is it an .onnx file?") from exc


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or f"{vi.name}_dim{i}")
    return tuple(out)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    elem = vi.type.tensor_type.elem_type
    if elem not in _ONNX_DTYPES:
        raise ModelError(
            f"graph value {vi.name!r} has ONNX element type {elem}, which modec does not lower"
        )
    return TensorSpec(vi.name, _ONNX_DTYPES[elem], _dims(vi))


#: 16-bit float element types: with ``upcast``, weights of these types are cast at use.
_HALF = frozenset({"float16", "bfloat16"})

#: Ops that only move the data of their first input: with ``upcast``, they run on a 16-bit
#: weight and their (16-bit) result is cast where it is read, so that an embedding
#: ``Gather`` casts the rows it takes, not the whole table.
_MOVES = frozenset({"Gather", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                    "Identity"})  # fmt: skip


#: Names a symbolic dimension cannot keep: the frontend makes each one a TIR variable, which
#: the CUDA code generator writes as a kernel parameter of that name (HF exports name the new
#: tokens' dimension ``new``).
_RESERVED_WORDS = (
    "alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t "
    "char16_t char32_t class compl concept const consteval constexpr constinit const_cast "
    "continue co_await co_return co_yield decltype default delete do double dynamic_cast else "
    "enum explicit export extern false float for friend goto if inline int long mutable "
    "namespace new noexcept not not_eq nullptr operator or or_eq private protected public "
    "register reinterpret_cast requires restrict return short signed sizeof static "
    "static_assert static_cast struct switch template this thread_local throw true try typedef "
    "typeid typename union unsigned using virtual void volatile wchar_t while xor xor_eq "
    "blockIdx blockDim threadIdx gridDim warpSize dim3 half uint uchar ushort"
)
_RESERVED = frozenset(_RESERVED_WORDS.split(" "))


def _identifier_dims(g: onnx.GraphProto) -> None:
    """Rename, in place, the symbolic dimensions of ``g``'s inputs, outputs and value infos
    that are not C identifiers, or are C/C++/CUDA reserved words: ``new`` becomes ``new_``,
    ``batch size`` ``batch_size`` (a suffix more where that name is taken). The manifest
    keeps the ONNX names: it is written from the original graph."""
    infos = [*g.input, *g.output, *g.value_info]
    names = {d.dim_param for vi in infos for d in vi.type.tensor_type.shape.dim if d.dim_param}
    renamed: dict[str, str] = {}
    for name in sorted(names):
        safe = re.sub(r"\W", "_", name)
        if not safe or safe[0].isdigit():
            safe = f"d_{safe}"
        if safe in _RESERVED:
            safe = f"{safe}_"
        while safe != name and (safe in names or safe in renamed.values()):
            safe = f"{safe}_"
        if safe != name:
            renamed[name] = safe
    for vi in infos:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in renamed:
                d.dim_param = renamed[d.dim_param]


def _constants_to_nodes(model: onnx.ModelProto, weights: Mapping[str, Any]) -> onnx.ModelProto:
    """Integer and 0-d initializers become Constant nodes (see the module docstring); the
    ``weights`` stay initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep: list[onnx.TensorProto] = []
    consts: list[onnx.NodeProto] = []
    for t in g.initializer:
        if t.name in weights or (
            t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and t.dims
        ):
            keep.append(t)
        else:
            consts.append(helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_c"))
    if consts:
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = consts + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    return out


@dataclass
class _OneNode:
    """A one-node stand-in for a GraphProto (the frontend's node loop reads ``.node``)."""

    node: onnx.NodeProto

    def __post_init__(self) -> None:
        self.node = [self.node]  # type: ignore[assignment]


def _tie_mask_length(importer: Any, names: list[str]) -> None:
    """Give ``attention_mask`` the length ``past + seq`` in a model with a KV cache
    (`modec.kv_cache`: ``past_key_values.{i}.*`` inputs of length ``past``, the new tokens'
    ``input_ids`` or ``inputs_embeds`` of length ``seq``). The mask's own symbol is replaced
    in every input that uses it; the VM checks the expression when the model is called."""
    past = next((n for n in names if kv_cache.is_past(n)), None)
    tokens = next((n for n in ("input_ids", "inputs_embeds") if n in names), None)
    if past is None or tokens is None or "attention_mask" not in names:
        return

    def dims(name: str) -> list[Any] | None:
        ty = importer._nodes[name].ty
        shape = getattr(ty, "shape", None)
        return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None

    mask, past_dims, token_dims = dims("attention_mask"), dims(past), dims(tokens)
    if mask is None or past_dims is None or token_dims is None or len(mask) != 2:
        return
    total, p, t = mask[1], past_dims[2], token_dims[1]
    if not isinstance(total, tirx.Var) or any(total.same_as(v) for v in (p, t)):
        return
    length = p + t
    for name in names:
        shape = dims(name)
        if shape is None or not any(isinstance(d, tirx.Var) and d.same_as(total) for d in shape):
            continue
        new = [length if isinstance(d, tirx.Var) and d.same_as(total) else d for d in shape]
        var = importer._nodes[name]
        importer._nodes[name] = importer._inputs[name] = relax.Var(
            var.name, relax.TensorType(new, var.ty.dtype)
        )


class _Importer(onnx_frontend.ONNXGraphImporter):
    """The frontend's importer with custom-op converters, node-naming errors, declared
    weights and 16-bit weights cast at use (see the module docstring)."""

    def __init__(
        self, converters: Mapping[str, OpConverter], weights: Mapping[str, LazyArray],
        upcast: bool,
    ) -> None:  # fmt: skip
        super().__init__({}, {}, keep_params_in_input=True, sanitize=True)
        self._custom = dict(converters)
        self._shapes = ShapeEvaluator()
        self._values: dict[str, ShapeValue] = {}
        self._weights = weights
        self._upcast = upcast
        #: values that hold 16-bit floats where the graph reads float32 (``upcast``): the
        #: 16-bit value, and its float32 cast once emitted
        self._half: dict[str, Any] = {}
        self._cast: dict[str, Any] = {}
        self.current: onnx.NodeProto | None = None

    def _parse_graph_input(self, graph: onnx.GraphProto) -> None:
        """The frontend's, then the length of a KV-cache model's ``attention_mask`` tied to
        the cache: the exporter names it freshly (``total``), the graph adds the mask's bias
        to scores over ``past + seq`` keys, and without the tie no later shape can be proven
        equal (`_tie_mask_length`)."""
        super()._parse_graph_input(graph)
        _tie_mask_length(self, [vi.name for vi in graph.input if vi.name in self._inputs])

    def _parse_graph_initializers(self, graph: onnx.GraphProto) -> None:
        """The frontend's, except that a weight in ``weights`` is declared, not read."""
        for t in graph.initializer:
            if not t.name.strip():
                raise ValueError("Tensor's name is required.")
            value: Any = self._weights.get(t.name)
            if value is not None:
                dtype = _ONNX_DTYPES[t.data_type]
                shape = [int(d) for d in t.dims]
                if list(value.shape) != shape or str(value.dtype) != dtype:
                    raise InternalError(
                        f"import-onnx: weight {t.name!r} is {value.dtype}{list(value.shape)}, "
                        f"its initializer {dtype}{shape}"
                    )
            elif t.data_location == onnx.TensorProto.EXTERNAL:
                raise ModelError(
                    f"initializer {t.name!r} is stored in external data that was not loaded; "
                    "load the model from its path (onnx.load reads the data beside it)"
                )
            else:
                value = self._parse_array(t)
                dtype, shape = str(value.dtype), list(value.shape)
            # As the frontend names it: PyTorch's "onnx::" prefix removed, nothing sanitized.
            name = t.name.removeprefix("onnx::")
            var = self._new_var(name, shape=shape, dtype=dtype)
            self._nodes[t.name] = var
            self._params[name] = (var, value)
            if self._upcast and dtype in _HALF:
                self._half[t.name] = var

    def _read_as(self, node: onnx.NodeProto) -> None:
        """Make each 16-bit input of ``node`` read as the node needs it: itself for a custom
        op, a ``Cast`` and the data input of a `_MOVES` op; float32 for every other op."""
        if not self._half:
            return
        op, std = node.op_type, node.domain in ("", "ai.onnx")
        if op in ("If", "Loop", "Scan"):  # a subgraph may read any value by name
            names = list(self._half)
        else:
            names = [i for i in node.input if i in self._half]
        for name in names:
            raw = op in self._custom or (std and op in ("Cast", *_MOVES) and name == node.input[0])
            self._nodes[name] = self._half[name] if raw else self._float32(name)

    def _float32(self, name: str) -> Any:
        if name not in self._cast:
            self._cast[name] = self.bb.emit(relax.op.astype(self._half[name], "float32"))
        return self._cast[name]

    def _moved_half(self, node: onnx.NodeProto) -> None:
        """The 16-bit results of a `_MOVES` op on a 16-bit input are read as its input is."""
        if node.op_type in _MOVES and node.input and node.input[0] in self._half:
            for out in node.output:
                ty = getattr(self._nodes.get(out), "ty", None)
                if isinstance(ty, relax.TensorType) and str(ty.dtype) in _HALF:
                    self._half[out] = self._nodes[out]

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        known = onnx_frontend._get_convert_map()
        for node in graph.node:
            op = node.op_type
            if op in self._custom or op in ("Constant", "If"):
                continue
            if op not in known or node.domain not in ("", "ai.onnx"):
                dom = f"{node.domain}::" if node.domain else ""
                raise ModelError(
                    f"ONNX op {dom}{op} (node {node.name or node.output[0]!r}) is not supported "
                    "by the TVM Relax frontend; rewrite it to standard ops or register a "
                    "converter in op_converters"
                )

    def _construct_nodes(self, graph: onnx.GraphProto) -> None:
        """Convert the nodes in order; shape computations become `ShapeValue` instead."""
        for var in self._inputs.values():
            self._shapes.bound_inputs(self._shapes.shape_of(var) or [])
        for node in graph.node:
            self.current = node
            self._construct_node(node)
            self._moved_half(node)
        for out in graph.output:
            if out.name in self._half:
                self._nodes[out.name] = self._float32(out.name)
            self._materialize(out.name)

    def _construct_node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if node.domain in ("", "ai.onnx") and op not in ("If", "Loop", "Scan"):
            operands = [self._operand(i) for i in node.input]
            attrs = self._parse_attr(node.attribute)
            if len(node.output) == 1:
                # Shape computations read the operands' shapes only: no cast emitted yet.
                value = self._shapes.evaluate(op, operands, attrs)
                if value is not None:
                    self._values[node.output[0]] = value
                    return
            if any(i in self._half for i in node.input):
                self._read_as(node)
                operands = [self._operand(i) for i in node.input]
            expr = convert_shape_op(
                self._shapes, op, operands, attrs, lambda i: self._materialize(node.input[i])
            )
            if expr is not None:
                self._nodes[node.output[0]] = self.bb.normalize(expr)
                return
        else:
            self._read_as(node)
        names = [i for i in node.input if i] if op not in ("If", "Loop", "Scan") else self._values
        for name in list(names):
            self._materialize(name)
        super()._construct_nodes(_OneNode(node))

    def _operand(self, name: str) -> Any:
        if not name:
            return None
        return self._values[name] if name in self._values else self._nodes[name]

    def _materialize(self, name: str) -> Any:
        """The Relax value of ``name`` (a shape value becomes a tensor here, once)."""
        if name in self._values and name not in self._nodes:
            self._nodes[name] = materialize(self.bb, self._values[name])
        return self._nodes[name]

    def _convert_operator(self, op_name: str, inputs: Any, attrs: Any, opset: int) -> Any:
        if op_name in self._custom:
            sym = self._custom[op_name](self.bb, list(inputs), dict(attrs))
            return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
        fix = _FRONTEND_FIXES.get(op_name)
        fixed = fix(self.bb, list(inputs), dict(attrs)) if fix is not None else None
        if fixed is not None:
            return self.bb.normalize(fixed)
        return super()._convert_operator(op_name, inputs, attrs, opset)


def _expand_const_shape(
    bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]
) -> relax.Expr | None:  # fmt: skip
    """ONNX Expand to a constant shape of data with symbolic dims (None: not this case).

    The frontend's Expand reads ``dim.value`` of every data dim when the target shape is a
    constant and fails on a symbolic one (digits-vlm's attention-mask broadcast). ONNX
    broadcasting: a target dim of 1 keeps the data dim; otherwise the data dim is 1 or equal.
    """
    data, shape = inputs
    if not isinstance(shape, tvm.ir.GenericConst) or not isinstance(data.ty, relax.TensorType):
        return None
    dims = list(data.ty.shape.values) if data.ty.shape is not None else None
    if dims is None or all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    target = [int(v) for v in np.asarray(shape.value.numpy()).reshape(-1)]
    rank = max(len(target), len(dims))
    dims = [tirx.IntImm("int64", 1)] * (rank - len(dims)) + dims
    target = [1] * (rank - len(target)) + target
    out: list[Any] = []
    for d, s in zip(dims, target, strict=True):
        if s in (1, -1):
            out.append(d)
        elif isinstance(d, tirx.IntImm) and int(d) not in (1, s):
            raise ModelError(f"ONNX Expand: cannot broadcast data shape {dims} to {target}")
        else:
            out.append(tirx.IntImm("int64", s))
    return relax.op.broadcast_to(data, relax.ShapeExpr(out))


def _gather_elements(
    bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]
) -> relax.Expr | None:  # fmt: skip
    """ONNX GatherElements (the frontend's reads ``ty.dtype.dtype`` and always fails).

    Negative indices count from the end of ``axis``, as ONNX specifies (static extent only;
    a symbolic one falls back to the frontend).
    """
    data, indices = inputs
    axis = int(attrs.get("axis", 0))
    if not isinstance(data.ty, relax.TensorType) or not isinstance(indices.ty, relax.TensorType):
        return None
    if data.ty.shape is None:
        return None
    extent = static_extent(data.ty.shape.values[axis])
    if extent is None:
        return None
    dtype = str(indices.ty.dtype)
    wrapped = relax.op.where(
        relax.op.less(indices, relax.const(0, dtype)),
        relax.op.add(indices, relax.const(extent, dtype)),
        indices,
    )
    return relax.op.gather_elements(data, wrapped, axis)


def _permuted(bb: relax.BlockBuilder, x: Any) -> tuple[relax.Expr, list[int]] | None:
    """``(y, perm)`` when ``x`` is ``permute_dims(y, perm)`` or bound to it (None otherwise)."""
    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else x
    if not isinstance(bound, relax.Call) or bound.op != tvm.ir.Op.get("relax.permute_dims"):
        return None
    if bound.attrs.axes is None:
        return None
    return bound.args[0], [int(a) for a in bound.attrs.axes]


def _transpose(
    bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]
) -> relax.Expr | None:  # fmt: skip
    """ONNX Transpose of a transposed value as one transpose of the original (nothing when
    the two cancel); None when the input is not a transpose.

    The dynamo exporter writes ``x[..., :k] = v`` as Transpose, ScatterND, Transpose back
    (fused with the next transpose, e.g. the keys' for ``q @ kᵀ``); with `_scatter_nd` the
    scatter happens before the first transpose, and TVM never sees the pair: its reshape
    detection stops on some symbolic transposes (an internal check of its iterator
    analysis, RewriteDataflowReshape).
    """
    inner = _permuted(bb, inputs[0])
    perm = attrs.get("perm")
    if inner is None or perm is None:
        return None
    y, p = inner
    axes = [p[int(q)] for q in perm]
    return y if axes == list(range(len(axes))) else relax.op.permute_dims(y, axes)


def _scatter_nd(
    bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]
) -> relax.Expr | None:  # fmt: skip
    """ONNX ScatterND writing a constant run of rows ``a, a+1, …`` of axis 0, as a
    concatenation (None for any other ScatterND: the frontend's converter takes it).

    This is how the dynamo exporter writes ``z[..., :8] = v`` (DeepSeek's keys assembled from
    their two parts, with ``past + new`` positions in a cached export): both operands are
    transposed to put the written axis first, scattered, and transposed back. Relax's
    legalization of ``scatter_nd`` fails on it: topi checks each dimension with ``==``, which
    is object identity for two ``past + new`` expressions, and TVM's reshape detection stops
    (an internal check of its iterator analysis) on the transposes around it. Here the
    dimensions are proved equal, and the result is ``concat(data[:a], updates, data[a+K:])``,
    taken on the untransposed operands when both come from the same transpose (the transpose
    back then cancels, `_transpose`). Reduction ``none`` only; anything else goes to the
    frontend.
    """
    data, indices, updates = inputs
    if not isinstance(indices, tvm.ir.GenericConst):
        return None
    reduction = attrs.get("reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    table = np.asarray(indices.value.numpy())
    if reduction != "none" or table.ndim != 2 or table.shape[1] != 1 or table.shape[0] == 0:
        return None
    axis = 0
    pd, pu = _permuted(bb, data), _permuted(bb, updates)
    if pd is not None and pu is not None and pd[1] == pu[1]:
        (data, perm), updates = pd, pu[0]
        axis = perm[0]
    else:
        perm = None
    tys = [getattr(x, "ty", None) for x in (data, updates)]
    if not all(isinstance(t, relax.TensorType) and t.shape is not None for t in tys):
        return None
    d_dims, u_dims = (list(t.shape.values) for t in tys)  # type: ignore[union-attr]
    n = static_extent(d_dims[axis])
    if n is None or len(u_dims) != len(d_dims):
        return None
    rows = table[:, 0]
    rows = np.where(rows < 0, rows + n, rows)
    a, k = int(rows[0]), int(rows.size)
    if not np.array_equal(rows, np.arange(a, a + k)) or a < 0 or a + k > n:
        return None
    analyzer = tvm.sym.Analyzer()
    others = [i for i in range(len(d_dims)) if i != axis]
    if static_extent(u_dims[axis]) != k or not all(
        analyzer.can_prove_equal(u_dims[i], d_dims[i]) for i in others
    ):
        return None
    parts: list[relax.Expr] = []
    if a > 0:
        parts.append(bb.normalize(relax.op.strided_slice(data, [axis], [0], [a])))
    parts.append(updates)
    if a + k < n:
        parts.append(bb.normalize(relax.op.strided_slice(data, [axis], [a + k], [n])))
    out = parts[0] if len(parts) == 1 else relax.op.concat(parts, axis=axis)
    return out if perm is None else relax.op.permute_dims(bb.normalize(out), perm)


#: Ops whose frontend converter fails on graphs modec lowers: op type -> converter that
#: returns the Relax expression, or None to fall back to the frontend's.
_FRONTEND_FIXES: dict[
    str, Callable[[relax.BlockBuilder, list[Any], dict[str, Any]], relax.Expr | None]
] = {
    "Expand": _expand_const_shape,
    "GatherElements": _gather_elements,
    "ScatterND": _scatter_nd,
    "Transpose": _transpose,
}


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def import_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    op_converters: Mapping[str, OpConverter] | None = None,
    *,
    weights: Mapping[str, LazyArray] | None = None,
    upcast: bool = False,
) -> DenseModule:
    """Import an ONNX model into Relax with its weights detached as parameters.

    Args:
        model: an in-memory model or the path of a .onnx file (external data is read from
            beside it).
        op_converters: converters for ops the frontend does not know, by op type.
        weights: values of float initializers (with ``dims``) by initializer name: each is
            declared from its proto entry (which need not hold data) and becomes its
            parameter's value unread (see the module docstring).
        upcast: the graph computes in float32 where its 16-bit float weights are read
            (`modec.executor.upcast_float16` left the weights as stored): each such weight
            stays a 16-bit parameter, cast to float32 where it is read.

    Returns:
        The imported `DenseModule` (no kernels scheduled yet).

    Raises:
        ModelError: the file is unreadable, an initializer's external data was not loaded,
            or an op cannot be imported (names op and node).
    """
    proto = _load(model)
    weights = weights or {}
    init_names = {t.name for t in proto.graph.initializer}
    unknown = sorted(set(weights) - init_names)
    if unknown:
        raise InternalError(f"import-onnx: weights {unknown[:4]} are not initializers")
    inputs = [_spec(vi) for vi in proto.graph.input if vi.name not in init_names]
    outputs = [_spec(vi) for vi in proto.graph.output]
    prepared = _constants_to_nodes(proto, weights)
    _identifier_dims(prepared.graph)
    importer = _Importer(op_converters or {}, weights, upcast)
    captured = io.StringIO()
    try:
        # The frontend prints the failing op's inputs to stdout; keep it in the debug log.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            # Input names with dots (past_key_values.0.key) become Relax names with
            # underscores; the manifest keeps the ONNX names, so the rename is not news.
            warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
            mod = importer.from_onnx(prepared.graph, _opset(prepared))
    except ModecError:  # a converter's own error already says what is wrong
        raise
    except Exception as exc:
        failed = importer.current
        where = f"{failed.op_type} (node {failed.name or failed.output[0]!r})" if failed else "?"
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else type(exc).__name__
        logger.debug("frontend output: %s", captured.getvalue())
        raise ModelError(
            f"the TVM Relax frontend failed on ONNX op {where}: {detail}; simplify the graph "
            "(onnxsim) or export with static shapes for that op"
        ) from exc
    mod, values = _detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    if num_input != len(inputs):
        raise InternalError(
            f"import-onnx: Relax main has {num_input} inputs, the ONNX graph {len(inputs)}"
        )
    names = [p.name for p in main.params[num_input:]]
    if len(names) != len(values) or len(set(names)) != len(names):
        raise InternalError("import-onnx: detached parameters do not match main's parameters")
    params = {
        n: v if isinstance(v, LazyArray) else v.numpy() for n, v in zip(names, values, strict=True)
    }
    logger.info("imported %d inputs, %d weight tensors", num_input, len(params))
    return DenseModule(mod, params, inputs, outputs, {"onnx_nodes": len(proto.graph.node)})


def _detach_params(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[Any]]:
    """`relax.frontend.detach_params` for ``main``, whose ``params`` attribute also holds
    the `LazyArray` weights (which that function refuses): the values, in order, and the
    module without the attribute (built as that function builds it)."""
    detached = tvm.IRModule()
    values: list[Any] = []
    for gv, func in mod.functions_items():
        if gv.name_hint == "main" and "params" in func.attrs:
            values = list(func.attrs["params"])
            func = func.without_attr("params")
        detached[gv] = func
    return detached, values


def static_extent(e: Any) -> int | None:
    """The value of a static dimension (``tirx.IntImm``); None for a symbolic one."""
    return int(e.value) if isinstance(e, tirx.IntImm) else None
