"""A KV cache updated in place: the ``decode`` entry writes each step's keys and values into
preallocated buffers instead of concatenating a new cache every step (docs/generation.md,
"The cache in place").

An exported decoder grows its cache by ``present = concat(past, new)`` along the positions:
every step copies the whole cache, O(P) per layer, and allocates it anew. `cache_in_place`
rewrites the ``decode`` entry (made from ``main`` where the model has no prompt-only inputs)
so that:

* each ``past_key_values.*`` input is a buffer ``[B, H, C, D]`` of capacity C (the runtime
  allocates C >= P + T once and grows it only when it fills);
* a shape argument ``[P]`` after the inputs says how many positions it holds (P was the
  past's length: the attention mask's ``P + T`` and everything derived stay as they were);
* ``concat(past, new)`` becomes an append of the T new positions at P
  (``call_tir_inplace``: the buffer itself is written) and a slice of its first P + T
  positions, which `modec.lowering.dense.schedule_dense_ops` folds into attention's two
  matmuls (their kernels read the first rows of the buffer, `matmul_kernels`' ``prefix``):
  nothing of the cache is copied per step. A consumer it cannot fold keeps the slice (a copy,
  as the concat was): correct, not faster;
* each ``present.*`` output is the buffer (the same tensor as the input).

``main`` is unchanged: the prefill concatenates an empty past with the prompt's keys and
values, and the runtime copies them once into the buffers. CPU targets only: CUDA keeps
the concatenating ``decode`` (its kernels do not read a prefix yet).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.relax import expr_functor
from tvm.script import tirx as T

from modec import kv_cache
from modec.artifact import TensorSpec
from modec.lowering.decode_entry import DECODE, DecodeEntry
from modec.lowering.onnx_import import DenseModule

logger = logging.getLogger(__name__)

#: The decode entry's shape argument after its inputs: ``[P]``, the positions the cache holds.
LENGTH_ARG = "past_length"
#: The symbolic name of the buffers' capacity in the decode entry's input specs.
CAPACITY = "capacity"
#: The append kernels' name prefix (`modec.lowering.dense` finds the cache's views by it).
KV_APPEND = "modec_kv_append"


@dataclass(frozen=True)
class InPlace:
    """What `cache_in_place` did: the decode entry's inputs (the cache as buffers), or why
    the cache stays concatenated."""

    inputs: list[TensorSpec]
    reason: str = ""

    @property
    def made(self) -> bool:
        return not self.reason


def _append(dtype: str) -> tirx.PrimFunc:
    """``buf[:, :, p + t, :] = new[:, :, t, :]`` for every new position t (writes past the
    capacity are dropped: the runtime never asks for one, a bad call cannot corrupt memory)."""

    @T.prim_func(private=True, s_tir=False)
    def append(var_buf: T.handle, var_new: T.handle, p: T.int64) -> None:
        T.func_attr({"tirx.noalias": True})
        b, h, c, d, t = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        buf = T.match_buffer(var_buf, (b, h, c, d), dtype)
        new = T.match_buffer(var_new, (b, h, t, d), dtype)
        for bh in T.parallel(b * h):
            for i in T.serial(t):
                if p + i < c:
                    for j in T.serial(d):
                        buf[bh // h, bh % h, p + i, j] = new[bh // h, bh % h, i, j]

    return append


def _concat_of_past(value: Any, past: Container[Any]) -> tuple[Any, Any] | None:
    """``(past var, new)`` when ``value`` is ``concat([past, new], axis=2)`` of a rank-4 cache."""
    if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.concat")):
        return None
    parts = value.args[0]
    if not isinstance(parts, relax.Tuple) or len(parts.fields) != 2:
        return None
    first, new = parts.fields
    if first not in past or int(value.attrs.axis) not in (2, -2):
        return None
    return first, new


@expr_functor.visitor
class _Reads(relax.PyExprVisitor):
    """How often each var is read."""

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Any, int] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.count[var] = self.count.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.visit_var_(var)


@expr_functor.mutator
class _InPlace(relax.PyExprMutator):
    """Rewrites the concats of the past into appends to the buffers (module docstring)."""

    def __init__(self, mod: tvm.IRModule, buffers: Mapping[Any, Any], length: Any) -> None:
        super().__init__(mod)
        self.buffers = buffers  # past param -> its buffer param
        self.length = length  # the tirx var P
        self.written: dict[Any, Any] = {}  # concat var -> the appended buffer
        self.kernels: dict[str, Any] = {}

    def _kernel(self, dtype: str) -> Any:
        if dtype not in self.kernels:
            name = f"{KV_APPEND}_{dtype}"
            # kOpaque: FuseOps must not fuse the in-place append with its producers
            func = _append(dtype).with_attr("global_symbol", name).with_attr("op_pattern", 8)
            self.kernels[dtype] = self.builder_.add_func(func, name)
        return self.kernels[dtype]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = _concat_of_past(binding.value, self.buffers)
        if found is not None:
            past, new = found
            buf = self.buffers[past]
            new = self.visit_expr(new)
            ty = buf.ty
            written = self.builder_.emit(
                relax.call_tir_inplace(self._kernel(ty.dtype), [buf, new, self.length], 0, ty),
                name_hint=f"{binding.var.name}_buf",
            )
            end = self.length + new.ty.shape.values[2]
            view = self.builder_.emit(
                relax.op.strided_slice(written, [2], [0], [end], assume_inbound=True),
                name_hint=binding.var.name,
            )
            self.set_var_remap(binding.var, view)
            self.written[binding.var] = written
            return
        value = binding.value
        if isinstance(value, relax.Tuple) and any(f in self.written for f in value.fields):
            fields = [
                self.written[f] if f in self.written else self.visit_expr(f) for f in value.fields
            ]
            dataflow = isinstance(binding.var, relax.DataflowVar)
            emit = self.builder_.emit if dataflow else self.builder_.emit_output
            self.set_var_remap(binding.var, emit(relax.Tuple(fields), name_hint=binding.var.name))
            return
        super().visit_var_binding_(binding)


def cache_in_place(
    dm: DenseModule, entry: DecodeEntry | None
) -> tuple[DenseModule, InPlace | None]:
    """``dm`` with its ``decode`` entry reading and writing the KV cache in place (module
    docstring), made from ``main`` when there is none; None for a model without a cache.
    Where the graph does not have the expected form (a past read other than by one concat
    along the positions, past lengths that differ), ``dm`` is returned as it was, with the
    reason."""
    sig = kv_cache.find(dm.inputs, dm.outputs)
    if sig is None:
        return dm, None
    mod = dm.mod
    if entry is not None and entry.made:
        specs = list(entry.inputs)
        func = mod[DECODE]
    else:
        specs = list(dm.inputs)
        func = relax.utils.copy_with_new_vars(mod["main"].with_attr("global_symbol", DECODE))
    n_in = int(func.attrs["num_input"])
    names = {p: s.name for p, s in zip(func.params[:n_in], specs, strict=True)}
    # An ordered set (hashed: relax vars compare by identity here, never by ``==``).
    past = dict.fromkeys(p for p in func.params[:n_in] if kv_cache.is_past(names[p]))
    reads = _Reads()
    reads.visit_expr(func.body)
    concats = 0
    for block in func.body.blocks:
        for b in block.bindings:
            concats += _concat_of_past(b.value, past) is not None
    if concats != len(past) or any(reads.count.get(p, 0) != 1 for p in past):
        return dm, _kept(specs, "a past input is read other than by one concat along positions")
    lengths = {str(p.ty.shape.values[2]) for p in past}
    p0 = next(iter(past)).ty.shape.values[2]
    if len(lengths) != 1 or not isinstance(p0, tirx.Var):
        return dm, _kept(specs, f"the past inputs' lengths are {sorted(lengths)}, not one symbol")
    capacity = tirx.Var(CAPACITY, "int64")
    buffers = {}
    for p in past:
        b, h, _, d = p.ty.shape.values
        buffers[p] = relax.Var(p.name, relax.TensorType([b, h, capacity, d], p.ty.dtype))
    length = relax.Var(LENGTH_ARG, relax.ShapeType([p0]))
    params = [buffers.get(p, p) for p in func.params[:n_in]] + [length, *func.params[n_in:]]
    # The new signature around the old body; the mutator replaces the body's past reads.
    staged = relax.Function(params, func.body, None, func.is_pure)
    for key, value in func.attrs.items():
        staged = staged.with_attr(key, value)
    staged = staged.with_attr("num_input", n_in + 1)
    mutator = _InPlace(mod, buffers, p0)
    written = mutator.visit_expr(staged)
    mod = mutator.builder_.get()
    mod[DECODE] = written
    mod = relax.transform.DeadCodeElimination(["main", DECODE])(mod)
    inputs = [
        TensorSpec(s.name, s.dtype, (*s.shape[:2], CAPACITY, *s.shape[3:]))
        if kv_cache.is_past(s.name) else s
        for s in specs
    ]  # fmt: skip
    logger.info("decode entry: the KV cache of %d inputs is updated in place", len(past))
    return replace(dm, mod=mod), InPlace(inputs)


def _kept(specs: Sequence[TensorSpec], reason: str) -> InPlace:
    logger.warning("the KV cache stays concatenated per step (%s)", reason)
    return InPlace(list(specs), reason)
