"""The lowering of quantized dense weights (quantize-dense): dequant-matmul kernels.

1. `replace_matmuls` rewrites the importer's proto: each ``MatMul`` that reads a quantized
   weight (through its Casts / Transpose) becomes ``ai.modec::DenseQ(x)`` with the weight's
   name as attribute ``weight``; the weight and the nodes between are dropped, so the float
   weight is neither imported nor shipped.
2. `DenseQLowering.convert` (``op_converters["DenseQ"]``) packs the codes (layout
   `n16k32`), declares them as parameters ``dense.{weight}.codes|scale|zero`` through the
   MoE lowering's parameter table (its ``add_params`` hook adds them to ``main``), and emits
   ``Y = X · dequant(W)ᵀ`` as a `modec.kernels.dequant_matmul` kernel per (width, N, K):
   fp32 activations on the CPU, where the kernel runs the GEMV schedule at one row (a decode
   step) and the GEMM otherwise (two subroutines and a dispatcher, built with
   `modec.kernels.subroutine.TIR_PIPELINE`); fp16 on CUDA (cast around the call, as the
   experts).

With int8 activations (``--dense-act-bits 8``, ``QuantizedDense.act_bits``) the simulated
graph rounds each matmul's activation in ONNX operators (`modec.method.dense.int8_rows`).
Step 1 drops those nodes and gives ``DenseQ`` the activation before rounding and the
attribute ``act_bits``; step 2 then emits the rounding as a kernel
(`modec.kernels.grouped_moe_a8.quant_primfunc`, once per activation: the query, key and
value projections share it) and the matmul as the int8 one (`dense_primfunc`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax, tirx

from modec.errors import InternalError
from modec.facts import QuantizedDense
from modec.kernels import dequant_matmul, grouped_moe_a8
from modec.kernels.target import is_cuda, resolve_target
from modec.lowering.dense import memory_view
from modec.lowering.moe import int8_rows
from modec.moe.lazy import LazyArray
from modec.numerics.packing import pack

#: The custom op quantized matmuls become in the importer's proto.
OP = "DenseQ"


def replace_matmuls(
    proto: onnx.ModelProto, weights: dict[str, LazyArray], dense: QuantizedDense
) -> int:
    """Rewrite ``proto`` in place (module docstring, step 1); returns the weights dropped."""
    g = proto.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    dead: set[int] = set()
    rounding = [n for n in g.node if n.name in dense.act_nodes]
    if len(rounding) != len(dense.act_nodes):
        raise InternalError(
            f"lower-tvm: {len(dense.act_nodes)} int8 rounding nodes recorded by quantize-dense, "
            f"{len(rounding)} in the graph"
        )
    for name in dense.weights:
        chain, stack = [], [name]
        matmuls: list[onnx.NodeProto] = []
        while stack:
            v = stack.pop()
            for node in users.get(v, []):
                if node.op_type == "MatMul" and node.input[1] == v:
                    matmuls.append(node)
                elif node.op_type in ("Cast", "Transpose"):
                    chain.append(node)
                    stack.append(node.output[0])
                else:
                    raise InternalError(
                        f"lower-tvm: quantized weight {name} is read by {node.op_type}; "
                        "quantize-dense selected it as a matmul weight only"
                    )
        if not matmuls:
            raise InternalError(f"lower-tvm: quantized weight {name} reaches no MatMul")
        for node in matmuls:
            x = node.input[0]
            act_bits = 0
            if x in dense.act_inputs:  # the rounding becomes the kernels' (docstring)
                x, act_bits = dense.act_inputs[x], dense.act_bits
            elif dense.act_bits:
                raise InternalError(
                    f"lower-tvm: quantized matmul {node.name} reads {x}, not a rounded input"
                )
            del node.input[:]
            node.input.append(x)
            node.op_type, node.domain = OP, "ai.modec"
            node.attribute.append(onnx.helper.make_attribute("weight", name))
            node.attribute.append(onnx.helper.make_attribute("act_bits", act_bits))
        dead.update(id(n) for n in chain)
        weights.pop(name, None)
    dead.update(id(n) for n in rounding)
    kept = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(kept)
    read = {i for n in kept for i in n.input}
    unread = {i for n in rounding for i in n.input} - read  # the rounding's constants
    for i in unread:
        weights.pop(i, None)
    inits = [t for t in g.initializer if t.name not in dense.weights and t.name not in unread]
    dropped = len(g.initializer) - len(inits)
    del g.initializer[:]
    g.initializer.extend(inits)
    if not any(o.domain == "ai.modec" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("ai.modec", 1))
    return dropped


class DenseQLowering:
    """``op_converters["DenseQ"]`` for one model's `QuantizedDense` (module docstring)."""

    def __init__(
        self,
        dense: QuantizedDense,
        new_param: Callable[[str, np.ndarray], relax.Var],
        target: Any,
    ) -> None:
        self.dense = dense
        self._param = new_param
        self._target = resolve_target(target)
        self._gpu = is_cuda(self._target)
        self._vars: dict[str, tuple[relax.Var, relax.Var, relax.Var]] = {}
        self._funcs: dict[tuple[Any, ...], Any] = {}
        #: an activation (the importer's expression) -> its int8 rows (XQ, D, XS)
        self._rounded: dict[Any, list[Any]] = {}

    def _weight(self, name: str) -> tuple[Any, relax.Var, relax.Var, relax.Var]:
        qw = self.dense.weights.get(name)
        if qw is None:
            raise InternalError(f"lower-tvm: DenseQ names weight {name!r}, not quantized")
        if name not in self._vars:
            pw = pack(qw.q, qw.scale, qw.zero, qw.scheme)
            self._vars[name] = (
                self._param(f"dense.{name}.codes", pw.codes),
                self._param(f"dense.{name}.scale", pw.scale),
                self._param(f"dense.{name}.zero", pw.zero),
            )
        return (qw, *self._vars[name])

    def _kernel(self, bb: relax.BlockBuilder, qw: Any) -> Any:
        s = qw.scheme
        n, k = (int(d) for d in qw.q.shape)
        key = (s.bits, s.group_size, n, k)
        if key not in self._funcs:
            name = f"modec_dq_{s.name}_n{n}_k{k}"
            if self._gpu:
                func = dequant_matmul.primfunc(s, n, k, self._target, m=None)["main"]
                func = func.with_attr("tirx.is_scheduled", True)
            else:
                # The GEMV at one row (a decode step), the GEMM otherwise: two subroutines
                # and a dispatcher (`dequant_matmul.cpu_dispatch`).
                gemv, gemm, dispatch = dequant_matmul.cpu_dispatch(s, n, k)
                one = bb.add_func(gemv, f"{name}_gemv")
                func = dispatch(one, bb.add_func(gemm, f"{name}_gemm"))
            func = func.with_attr("global_symbol", name).with_attr("op_pattern", 8)
            self._funcs[key] = bb.add_func(func, name)
        return self._funcs[key]

    def _kernel_a8(self, bb: relax.BlockBuilder, qw: Any) -> Any:
        s = qw.scheme
        n, k = (int(d) for d in qw.q.shape)
        key = ("a8", s.bits, s.group_size, n, k)
        if key not in self._funcs:
            func = grouped_moe_a8.dense_primfunc(s, n, k, self._target)["main"]
            name = f"modec_dq_a8_{s.name}_n{n}_k{k}"
            func = func.with_attr("global_symbol", name).with_attr("op_pattern", 8)
            self._funcs[key] = bb.add_func(func, name)
        return self._funcs[key]

    def convert(self, bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]) -> Any:
        """The Relax expression of one ``DenseQ`` node: ``x · dequant(W)ᵀ``."""
        name = attrs["weight"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        qw, codes, scale, zero = self._weight(name)
        x = inputs[0]
        n, k = (int(d) for d in qw.q.shape)
        shape = list(x.ty.shape.values)
        if not shape or not isinstance(shape[-1], tirx.IntImm) or int(shape[-1]) != k:
            raise InternalError(f"lower-tvm: DenseQ {name}: input shape {shape}, weight K={k}")
        m: Any = tirx.IntImm("int64", 1)
        for d in shape[:-1]:
            m = m * d
        m = tvm.sym.Analyzer().simplify(m)
        x2 = bb.emit(memory_view(x, [m, k]))
        if int(attrs.get("act_bits", 0)):
            if x not in self._rounded:  # once per activation: q, k and v share theirs
                self._rounded[x] = int8_rows(bb, x2, m, k, self.dense.group_size)
            rows = self._rounded[x]
            y = bb.emit(
                relax.call_tir(
                    self._kernel_a8(bb, qw), [*rows, codes, scale, zero],
                    relax.TensorType([m, n], "float32"),
                )
            )  # fmt: skip
            return memory_view(y, [*shape[:-1], n])
        act = "float16" if self._gpu else "float32"
        if self._gpu:
            x2 = bb.emit(relax.op.astype(x2, act))
        y = bb.emit(
            relax.call_tir(
                self._kernel(bb, qw), [x2, codes, scale, zero], relax.TensorType([m, n], act)
            )
        )
        if self._gpu:
            y = bb.emit(relax.op.astype(y, "float32"))
        return memory_view(y, [*shape[:-1], n])
