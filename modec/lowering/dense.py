"""Dense lowering: ONNX → Relax with scheduled matmul kernels → a compiled VM executable.

The flow, in numbered phases:

1. `import_onnx`: the Relax ONNX frontend with ``keep_params_in_input=True`` and
   `relax.frontend.detach_params`. Float initializers become weight parameters of ``main``
   (after the model inputs, in initializer order); integer and 0-d initializers (shapes,
   axes, scalars) become ``Constant`` nodes first, so that the frontend folds them and keeps
   shapes symbolic (as weight parameters it cannot read them; Reshape then fails).
   Ops the frontend cannot import raise `ModelError` naming the op and the node.
2. Hooks (`RelaxHook`): callables ``DenseModule -> DenseModule`` run in order, e.g. the
   lead's MoE lowering that swaps regions for `call_tir` kernels and adds packed-weight
   parameters. Custom ONNX ops (such as ``ai.modec::MoE``) are imported through
   ``op_converters``.
3. `schedule_dense_ops`: every fp32 ``relax.matmul`` whose operands have known shapes and
   either a 2-D right operand (projections) or equal batch dimensions (attention's QKᵀ and
   PV) becomes a `call_tir` to a scheduled kernel from `modec.lowering.matmul_kernels`.
   DESIGN.md: the default pipeline leaves matmuls unscheduled (~100x slower than ORT).
   Softmax, LayerNorm and element-wise ops stay with the default legalization; at these
   sizes they are not the bottleneck (see docs/artifact.md, "Performance").
4. `compile_module`: `tvm.compile` with the default Relax pipeline.

The calling convention of the compiled ``main`` is ``main(*inputs, *params)``: the model
inputs in ONNX order, then the weights in `DenseModule.params` order.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx
import tvm
import tvm.relax.frontend.onnx
from onnx import helper
from tvm import relax, tirx
from tvm.relax import expr_functor
from tvm.relax.frontend.onnx import onnx_frontend

from modec.artifact import TensorSpec
from modec.errors import InternalError, ModelError
from modec.frontend import ONNX_DTYPES as _ONNX_DTYPES
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.lowering.matmul_kernels import matmul_primfunc

logger = logging.getLogger(__name__)

#: A converter for a custom ONNX op: (block builder, inputs, attributes) -> Relax expression.
OpConverter: TypeAlias = Callable[[relax.BlockBuilder, list[Any], dict[str, Any]], relax.Expr]


@dataclass
class DenseModule:
    """A Relax module plus what the artifact needs to run it.

    Attributes:
        mod: the IRModule; ``main(*inputs, *params)``.
        params: weight arrays in the order of ``main``'s parameters after the inputs; the
            keys are the Relax parameter names (the artifact's tensor names).
        inputs: the ONNX graph inputs (name, dtype, shape with symbolic dims as strings).
        outputs: the ONNX graph outputs, in ``main``'s return order.
        stats: counters of what the lowering did (matmuls scheduled, left to the default).
    """

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    stats: dict[str, int] = field(default_factory=dict)


#: A lowering hook: receives the module after import and returns the changed one.
RelaxHook: TypeAlias = Callable[[DenseModule], DenseModule]


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


def _constants_to_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Integer and 0-d initializers become Constant nodes (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep: list[onnx.TensorProto] = []
    consts: list[onnx.NodeProto] = []
    for t in g.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and t.dims:
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


class _Importer(onnx_frontend.ONNXGraphImporter):
    """The frontend's importer with custom-op converters and node-naming errors."""

    def __init__(self, converters: Mapping[str, OpConverter]) -> None:
        super().__init__({}, {}, keep_params_in_input=True, sanitize=True)
        self._custom = dict(converters)

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

    def _convert_operator(self, op_name: str, inputs: Any, attrs: Any, opset: int) -> Any:
        if op_name in self._custom:
            sym = self._custom[op_name](self.bb, list(inputs), dict(attrs))
            return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
        fix = _FRONTEND_FIXES.get(op_name)
        fixed = fix(list(inputs), dict(attrs)) if fix is not None else None
        if fixed is not None:
            return self.bb.normalize(fixed)
        return super()._convert_operator(op_name, inputs, attrs, opset)


def _expand_const_shape(inputs: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
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


def _gather_elements(inputs: list[Any], attrs: dict[str, Any]) -> relax.Expr | None:
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
    extent = _static(data.ty.shape.values[axis])
    if extent is None:
        return None
    dtype = str(indices.ty.dtype)
    wrapped = relax.op.where(
        relax.op.less(indices, relax.const(0, dtype)),
        relax.op.add(indices, relax.const(extent, dtype)),
        indices,
    )
    return relax.op.gather_elements(data, wrapped, axis)


#: Ops whose frontend converter fails on graphs modec lowers: op type -> converter that
#: returns the Relax expression, or None to fall back to the frontend's.
_FRONTEND_FIXES: dict[str, Callable[[list[Any], dict[str, Any]], relax.Expr | None]] = {
    "Expand": _expand_const_shape,
    "GatherElements": _gather_elements,
}


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def import_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    op_converters: Mapping[str, OpConverter] | None = None,
) -> DenseModule:
    """Import an ONNX model into Relax with its weights detached as parameters.

    Args:
        model: an in-memory model or the path of a .onnx file (external data is read from
            beside it).
        op_converters: converters for ops the frontend does not know, by op type.

    Returns:
        The imported `DenseModule` (no kernels scheduled yet).

    Raises:
        ModelError: the file is unreadable or an op cannot be imported (names op and node).
    """
    proto = _load(model)
    init_names = {t.name for t in proto.graph.initializer}
    inputs = [_spec(vi) for vi in proto.graph.input if vi.name not in init_names]
    outputs = [_spec(vi) for vi in proto.graph.output]
    prepared = _constants_to_nodes(proto)
    importer = _Importer(op_converters or {})
    captured = io.StringIO()
    try:
        # The frontend prints the failing op's inputs to stdout; keep it in the debug log.
        with contextlib.redirect_stdout(captured):
            mod = importer.from_onnx(prepared.graph, _opset(prepared))
    except ModelError:
        raise
    except Exception as exc:
        failed = next(
            (n for n in prepared.graph.node if n.output and n.output[0] not in importer._nodes),
            None,
        )
        where = f"{failed.op_type} (node {failed.name or failed.output[0]!r})" if failed else "?"
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else type(exc).__name__
        logger.debug("frontend output: %s", captured.getvalue())
        raise ModelError(
            f"the TVM Relax frontend failed on ONNX op {where}: {detail}; simplify the graph "
            "(onnxsim) or export with static shapes for that op"
        ) from exc
    mod, detached = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    if num_input != len(inputs):
        raise InternalError(
            f"import-onnx: Relax main has {num_input} inputs, the ONNX graph {len(inputs)}"
        )
    names = [p.name for p in main.params[num_input:]]
    values = detached.get("main", [])
    if len(names) != len(values) or len(set(names)) != len(names):
        raise InternalError("import-onnx: detached parameters do not match main's parameters")
    params = {n: v.numpy() for n, v in zip(names, values, strict=True)}
    logger.info("imported %d inputs, %d weight tensors", num_input, len(params))
    return DenseModule(mod, params, inputs, outputs, {"onnx_nodes": len(proto.graph.node)})


def _static(e: Any) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _prod(dims: Sequence[Any]) -> Any:
    out: Any = tirx.IntImm("int64", 1)
    for d in dims:
        out = out * d
    return tvm.sym.Analyzer().simplify(out)


@expr_functor.mutator
class _MatmulRewriter(relax.PyExprMutator):
    """Replaces fp32 `relax.matmul` calls with `call_tir` to scheduled kernels."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels: dict[tuple[Any, ...], Any] = {}
        self.counts: Counter[str] = Counter()
        self._analyzer = tvm.sym.Analyzer()

    def _kernel(self, batched: bool, m: int | None, n: int | None, k: int | None) -> Any:
        key = (batched, m, n, k)
        if key not in self.kernels:
            dims = "_".join(
                f"{c}{v if v is not None else 'x'}" for c, v in zip("mnk", key[1:], strict=True)
            )
            name = f"modec_{'bmm' if batched else 'dense'}_{dims}"
            func = (
                matmul_primfunc(batched, m, n, k)
                .with_attr("global_symbol", name)
                .with_attr("op_pattern", 8)  # kOpaque: FuseOps must not merge into it
            )
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _equal(self, a: Sequence[Any], b: Sequence[Any]) -> bool:
        return len(a) == len(b) and all(
            self._analyzer.can_prove_equal(x, y) for x, y in zip(a, b, strict=True)
        )

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.take" and str(call.attrs.mode) == "fast":
            # "fast" reads out of bounds on a bad index (a token id >= vocab): clamp instead,
            # so that bad input gives a wrong answer, never a crash. Same result in bounds.
            self.counts["take_clipped"] += 1
            return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
        if call.op.name != "relax.matmul":
            return call
        a, b = call.args
        ta, tb = a.ty, b.ty
        out_dtype = call.attrs.out_dtype
        if (
            not isinstance(ta, relax.TensorType)
            or not isinstance(tb, relax.TensorType)
            or ta.shape is None
            or tb.shape is None
            or ta.dtype != "float32"
            or tb.dtype != "float32"
            or (out_dtype and str(out_dtype) not in ("float32", "void"))
            or ta.ndim < 2
        ):
            self.counts["matmul_default"] += 1
            return call
        sa, sb = list(ta.shape.values), list(tb.shape.values)
        bld = self.builder_
        if len(sb) == 2 and _static(sb[0]) is not None and _static(sb[1]) is not None:
            lead, kd = sa[:-1], sa[-1]
            nd = sb[1]
            m = _prod(lead)
            x2 = a if len(sa) == 2 else bld.emit(relax.op.reshape(a, [m, kd]))
            gv = self._kernel(False, _static(m), _static(nd), _static(kd))
            y = bld.emit(relax.call_tir(gv, [x2, b], relax.TensorType([m, nd], "float32")))
            self.counts["matmul_dense"] += 1
            return y if len(sa) == 2 else relax.op.reshape(y, [*lead, nd])
        if len(sa) == len(sb) >= 3 and self._equal(sa[:-2], sb[:-2]):
            batch = sa[:-2]
            md, kd, nd = sa[-2], sa[-1], sb[-1]
            bt = _prod(batch)
            a3 = a if len(sa) == 3 else bld.emit(relax.op.reshape(a, [bt, md, kd]))
            b3 = b if len(sb) == 3 else bld.emit(relax.op.reshape(b, [bt, kd, nd]))
            gv = self._kernel(True, _static(md), _static(nd), _static(kd))
            y = bld.emit(relax.call_tir(gv, [a3, b3], relax.TensorType([bt, md, nd], "float32")))
            self.counts["matmul_batched"] += 1
            return y if len(sa) == 3 else relax.op.reshape(y, [*batch, md, nd])
        self.counts["matmul_default"] += 1
        return call


def schedule_dense_ops(dm: DenseModule) -> DenseModule:
    """Replace the dense matmuls of every Relax function by scheduled CPU kernels.

    Reads and writes `DenseModule.mod`; adds the counters ``matmul_dense``,
    ``matmul_batched``, ``matmul_default`` (left to the default legalization) and
    ``kernels`` (distinct PrimFuncs) to `DenseModule.stats`.
    """
    rw = _MatmulRewriter(dm.mod)
    for gv, func in dm.mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    mod = relax.transform.DeadCodeElimination()(rw.builder_.get())
    stats = {**dm.stats, **{k: int(v) for k, v in rw.counts.items()}, "kernels": len(rw.kernels)}
    logger.info("scheduled dense ops: %s", stats)
    return replace(dm, mod=mod, stats=stats)


def lower_dense(
    model: onnx.ModelProto | str | os.PathLike[str],
    target: TargetLike = "llvm",
    hooks: Sequence[RelaxHook] = (),
    op_converters: Mapping[str, OpConverter] | None = None,
) -> DenseModule:
    """Phases 1-3: import, run the hooks, schedule the dense ops (CPU targets only).

    Args:
        model: ONNX model or path.
        target: "llvm" (kernels scheduled) or a CUDA target (left to `compile_module`'s
            GPU default schedules).
        hooks: Relax hooks run after import and before dense scheduling, in order.
        op_converters: converters for custom ONNX ops (see `import_onnx`).

    Returns:
        The lowered module, ready for `compile_module`.
    """
    dm = import_onnx(model, op_converters)
    for hook in hooks:
        dm = hook(dm)
        _check_params(dm, getattr(hook, "__name__", repr(hook)))
    if not is_cuda(resolve_target(target)):
        dm = schedule_dense_ops(dm)
    return dm


def _check_params(dm: DenseModule, after: str) -> None:
    main = dm.mod["main"]
    n_in = int(main.attrs["num_input"])
    names = [p.name for p in main.params[n_in:]]
    if names != list(dm.params):
        raise InternalError(
            f"after hook {after}: main's weight parameters {names[:4]}... do not match "
            f"DenseModule.params {list(dm.params)[:4]}...; keep them in the same order"
        )


def compile_module(dm: DenseModule, target: TargetLike = "llvm") -> Any:
    """Phase 4: compile the module with `tvm.compile`; returns the VM executable.

    For a CUDA target TVM's CUDA pipeline dispatches sort/top-k to its GPU kernels, then
    legalizes and gives every PrimFunc not marked ``tirx.is_scheduled`` dlight's GPU default
    schedule (build only: there is no GPU on the build machine).
    """
    tgt = resolve_target(target)
    with tgt:
        return tvm.compile(dm.mod, target=tgt, relax_pipeline=_relax_pipeline(tgt))


def _relax_pipeline(tgt: Any) -> Any:
    """The pipeline `tvm.compile` would pick, then a canonical shape-function order.

    TVM emits the VM shape function in hash-map order, which varies between processes; the
    extra pass makes the library bytes depend on the model only (`modec.lowering.determinism`).
    """
    from modec.lowering.determinism import canonical_shape_funcs

    if "gpu" in tgt.keys:
        try:
            base = relax.get_default_pipeline(tgt)
        except (ValueError, AttributeError):
            base = relax.get_pipeline("default")
    else:
        base = relax.get_pipeline("default")
    return tvm.transform.Sequential([base, canonical_shape_funcs])
