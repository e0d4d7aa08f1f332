"""Dense lowering: ONNX → Relax with scheduled matmul kernels → a compiled VM executable.

The flow, in numbered phases:

1. `import_onnx` (`modec.lowering.onnx_import`): the Relax ONNX frontend with the weights
   detached as parameters of ``main``; ops the frontend cannot import raise `ModelError`
   naming the op and the node.
2. Hooks (`RelaxHook`): callables ``DenseModule -> DenseModule`` run in order, e.g. the
   lead's MoE lowering that swaps regions for `call_tir` kernels and adds packed-weight
   parameters. Custom ONNX ops (such as ``ai.modec::MoE``) are imported through
   ``op_converters``.
3. `schedule_dense_ops`: every fp32 ``relax.matmul`` whose operands have known shapes and
   either a 2-D right operand (projections) or equal batch dimensions (attention's QKᵀ and
   PV) becomes a `call_tir` to a scheduled kernel from `modec.lowering.matmul_kernels`.
   DESIGN.md: the default pipeline leaves matmuls unscheduled (~100x slower than ORT).
   A projection whose weight is ``astype(w, "float32")`` of a 16-bit weight (a model stored
   in fp16/bf16, `import_onnx` with ``upcast``) takes ``w`` itself: its kernel converts each
   weight vector in registers, and no float32 copy of the weight is made per call.
   Attention's scores ``q · permute(k)`` read the keys as stored (`matmul_nt_primfunc`,
   counter ``matmul_keys_as_stored``; a static, even head dimension): no transposed copy
   of the key cache is made at each decode step.
   A prompt's scores (keys passed in, not read from a cache) use
   `matmul_nt_packed_primfunc`, bit-identical and faster over many query rows.
   Softmax, LayerNorm and element-wise ops stay with the default legalization, fused into
   one kernel per chain by FuseOps/FuseTIR at compile time, their rows then run in
   parallel (`modec.lowering.cpu_schedule`; serial in the decode entry).
4. `compile_module`: `tvm.compile` with the target's default Relax pipeline (on CPU
   TVM's ``cpu_generic`` one, which fuses, with `parallel_rows` after FuseTIR;
   `_relax_pipeline`).

The calling convention of the compiled ``main`` is ``main(*inputs, *params)``: the model
inputs in ONNX order, then the weights in `DenseModule.params` order.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

import onnx
import tvm
from tvm import relax, tirx
from tvm.relax import expr_functor

from modec.errors import InternalError
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.lowering.kv_in_place import KV_APPEND
from modec.lowering.matmul_kernels import (
    matmul_nt_packed_primfunc,
    matmul_nt_primfunc,
    matmul_primfunc,
    nt_supported,
)
from modec.lowering.onnx_import import DenseModule, OpConverter, import_onnx, static_extent
from modec.moe.lazy import LazyArray

# DenseModule, OpConverter and import_onnx are re-exported: the hooks, converters and
# callers of `lower_dense` name them from here.
__all__ = [
    "DenseModule",
    "OpConverter",
    "RelaxHook",
    "compile_module",
    "import_onnx",
    "lower_dense",
    "schedule_dense_ops",
]

logger = logging.getLogger(__name__)

#: A lowering hook: receives the module after import and returns the changed one.
RelaxHook: TypeAlias = Callable[[DenseModule], DenseModule]


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

    def _kernel(
        self, batched: bool, m: int | None, n: int | None, k: int | None,
        b_dtype: str = "float32", prefix: bool = False,
    ) -> Any:  # fmt: skip
        suffix = "" if b_dtype == "float32" else f"_{_SHORT[b_dtype]}"
        suffix += "_prefix" if prefix else ""
        name = f"modec_{'bmm' if batched else 'dense'}_{_dims(m, n, k)}{suffix}"
        return self._added((batched, m, n, k, b_dtype, prefix), name,
                           lambda: matmul_primfunc(batched, m, n, k, b_dtype=b_dtype,
                                                   prefix=prefix))  # fmt: skip

    def _nt_kernel(self, m: int | None, n: int | None, k: int, prefix: bool = False) -> Any:
        """The ``A · Bᵀ`` kernel: scores on keys as stored. On a cache read in place (a
        decode step's few query rows) `matmul_nt_primfunc`; on the keys of the call (a
        prompt's scores, every query row) `matmul_nt_packed_primfunc`."""
        name = f"modec_bmmnt_{_dims(m, n, k)}{'_prefix' if prefix else ''}"
        make = (
            (lambda: matmul_nt_primfunc(m, n, k, prefix=True))
            if prefix
            else (lambda: matmul_nt_packed_primfunc(m, n, k))
        )
        return self._added(("nt", m, n, k, prefix), name, make)

    def _added(self, key: tuple[Any, ...], name: str, make: Callable[[], Any]) -> Any:
        """The kernel of ``key``, added to the module as ``name`` the first time."""
        if key not in self.kernels:
            func = (
                make()
                .with_attr("global_symbol", name)
                .with_attr("op_pattern", 8)  # kOpaque: FuseOps must not merge into it
            )
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _scores(self, a3: Any, b3: Any, shape: Sequence[Any], k: int, prefix: bool) -> Any:
        """``a3 · b3ᵀ`` [g, m, n] on keys ``b3`` [g, n, k] as stored (`_nt_kernel`; with
        ``prefix``, b3 is [g, C, k] of which the first n rows are read)."""
        g, m, n = shape
        gv = self._nt_kernel(static_extent(m), static_extent(n), k, prefix)
        self.counts["matmul_batched"] += 1
        self.counts["matmul_keys_as_stored"] += 1
        return self.builder_.emit(
            relax.call_tir(gv, [a3, b3], relax.TensorType([g, m, n], "float32"))
        )

    def _cache_view(self, x: Any) -> Any:
        """The buffer ``[B, H, C, D]`` when ``x`` is the first positions of a KV cache updated
        in place (`modec.lowering.kv_in_place`: a slice of the appended buffer), else None."""
        view = self._binding(x, "relax.strided_slice")
        if view is None or not bool(view.attrs.assume_inbound):
            return None
        buf = view.args[0]
        append = self._binding(buf, "relax.call_tir_inplace")
        if append is None or not append.args[0].name_hint.startswith(KV_APPEND):
            return None
        return buf

    def _rows3(self, x: Any, lead: Any, last: Any) -> tuple[Any, bool]:
        """``x`` [..., n, last] seen as [lead, n, last]; a cache view in place as its buffer
        [lead, C, last] (no copy), with True (counted: ``matmul_cache_in_place``)."""
        buf = self._cache_view(x)
        if buf is not None:
            self.counts["matmul_cache_in_place"] += 1
            cap = buf.ty.shape.values[2]
            return self.builder_.emit(memory_view(buf, [lead, cap, last])), True
        if x.ty.ndim == 3:
            return x, False
        rows = x.ty.shape.values[-2]
        return self.builder_.emit(memory_view(x, [lead, rows, last])), False

    def _transposed(self, b: Any, sa: Sequence[Any]) -> tuple[Any, int] | None:
        """``(x, K)`` when ``b`` is ``permute_dims(x)`` swapping the last two axes of a
        float32 tensor with ``a``'s batch dims and a static reduction length K the
        keys-as-stored kernel takes: ``a · b`` is ``a · xᵀ`` on ``x`` as stored. Else None."""
        swap = self._binding(b, "relax.permute_dims")
        if swap is None or swap.attrs.axes is None:
            return None
        x = swap.args[0]
        tx = x.ty
        if not isinstance(tx, relax.TensorType) or tx.shape is None or tx.dtype != "float32":
            return None
        sx = list(tx.shape.values)
        nd = len(sx)
        if nd < 3 or [int(v) for v in swap.attrs.axes] != [*range(nd - 2), nd - 1, nd - 2]:
            return None
        kd = static_extent(sx[-1])
        if not nt_supported(kd) or len(sa) != nd or not self._equal(sa[:-2], sx[:-2]):
            return None
        assert kd is not None
        return x, kd

    def _stored_weight(self, b: Any) -> Any:
        """The 16-bit tensor ``w`` when ``b`` is bound to ``astype(w, "float32")``, else None."""
        if not isinstance(b, relax.Var):
            return None
        w = _cast_of(self.lookup_binding(b))
        return w if isinstance(getattr(w, "ty", None), relax.TensorType) else None

    def _equal(self, a: Sequence[Any], b: Sequence[Any]) -> bool:
        return len(a) == len(b) and all(
            self._analyzer.can_prove_equal(x, y) for x, y in zip(a, b, strict=True)
        )

    def _binding(self, x: Any, op: str) -> Any:
        """The call ``x`` is bound to when it is a call of ``op``, else None."""
        if not isinstance(x, relax.Var):
            return None
        value = self.lookup_binding(x)
        ok = isinstance(value, relax.Call) and value.op == tvm.ir.Op.get(op)
        return value if ok else None

    def _repeated_kv(self, x: Any) -> tuple[Any, int] | None:
        """``(kv, r)`` when ``x`` [B, H·r, T, D] is the heads of ``kv`` [B, H, T, D] each
        repeated ``r`` times (transformers' ``repeat_kv`` for grouped-query attention:
        ``reshape(broadcast_to(expand_dims(kv, 2), [B, H, r, T, D]), [B, H·r, T, D])``)."""
        reshape = self._binding(x, "relax.reshape")
        bcast = None if reshape is None else self._binding(reshape.args[0], "relax.broadcast_to")
        expand = None if bcast is None else self._binding(bcast.args[0], "relax.expand_dims")
        if bcast is None or expand is None or [int(v) for v in expand.attrs.axis] != [2]:
            return None
        kv = expand.args[0]
        tk, tb, tx = kv.ty, bcast.ty, x.ty
        if not all(isinstance(t, relax.TensorType) and t.shape is not None for t in (tk, tb, tx)):
            return None
        sk, sbc, sx = list(tk.shape.values), list(tb.shape.values), list(tx.shape.values)
        if len(sk) != 4 or len(sbc) != 5 or len(sx) != 4:
            return None
        r = static_extent(sbc[2])
        heads = static_extent(sk[1])
        if r is None or heads is None or static_extent(sx[1]) != heads * r:
            return None
        same = [sk[0], sk[1], sk[2], sk[3]]
        if not (self._equal(same, [sbc[0], sbc[1], sbc[3], sbc[4]])
                and self._equal([sk[0], sk[2], sk[3]], [sx[0], sx[2], sx[3]])):  # fmt: skip
            return None
        return kv, r

    def _grouped_query(self, a: Any, b: Any, sa: Sequence[Any]) -> Any:
        """Attention's two matmuls over repeated key/value heads, on the heads themselves.

        ``q · permute(repeat_kv(k))`` and ``p · repeat_kv(v)`` read the cache expanded to
        every query head: ``repeat_kv`` copies it r times and the transpose copies the copy,
        every decode step. Query head h reads kv head h // r, so viewing ``q`` [B, H·r, S, D]
        as [B·H, r·S, D] (a reshape: the r query heads of a kv head are adjacent) gives the
        same products as one batched matmul per kv head: ``q' · kᵀ`` [B·H, r·S, T] and
        ``p' · v`` [B·H, r·S, D], reshaped back. Only the unexpanded key is transposed.
        Returns the rewritten value, or None where the pattern does not hold.
        """
        bld = self.builder_
        swap = self._binding(b, "relax.permute_dims")
        keys = (
            swap is not None
            and swap.attrs.axes is not None
            and [int(v) for v in swap.attrs.axes] == [0, 1, 3, 2]
        )
        found = self._repeated_kv(swap.args[0] if keys else b)
        if found is None or len(sa) != 4:
            return None
        kv, r = found
        bsz, heads, t, d = kv.ty.shape.values
        # q or p must have the repeated heads itself (not a broadcast head dim) and the
        # reduction length of the cache side.
        if not self._equal([sa[0], sa[1], sa[3]], [bsz, heads * r, d if keys else t]):
            return None
        s_len = sa[2]
        groups = bsz * heads
        rows = r * s_len
        d_static = static_extent(d)
        if keys and d_static is not None and nt_supported(d_static):  # k as stored
            a3 = bld.emit(memory_view(a, [groups, rows, d]))
            b3, prefix = self._rows3(kv, groups, d)
            y = self._scores(a3, b3, [groups, rows, t], d_static, prefix)
            self.counts["attention_kv_heads"] += 1
            return memory_view(y, [bsz, heads * r, s_len, t])
        if keys:  # a = q [B, H·r, S, D]; b = repeat_kv(k)ᵀ
            a3 = bld.emit(memory_view(a, [groups, rows, d]))
            kt = bld.emit(relax.op.permute_dims(kv, [0, 1, 3, 2]))
            b3 = bld.emit(memory_view(kt, [groups, d, t]))
            kd, nd = d, t
            prefix = False
        else:  # a = p [B, H·r, S, T]; b = repeat_kv(v)
            a3 = bld.emit(memory_view(a, [groups, rows, t]))
            b3, prefix = self._rows3(kv, groups, d)
            kd, nd = t, d
        gv = self._kernel(True, static_extent(rows), static_extent(nd), static_extent(kd),
                          prefix=prefix)  # fmt: skip
        y = bld.emit(relax.call_tir(gv, [a3, b3], relax.TensorType([groups, rows, nd], "float32")))
        self.counts["matmul_batched"] += 1
        self.counts["attention_kv_heads"] += 1
        return memory_view(y, [bsz, heads * r, s_len, nd])

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
        if len(sb) == 2 and static_extent(sb[0]) is not None and static_extent(sb[1]) is not None:
            lead, kd = sa[:-1], sa[-1]
            nd = sb[1]
            m = _prod(lead)
            x2 = a if len(sa) == 2 else bld.emit(memory_view(a, [m, kd]))
            w = self._stored_weight(b)
            b_dtype = "float32" if w is None else str(w.ty.dtype)
            gv = self._kernel(
                False, static_extent(m), static_extent(nd), static_extent(kd), b_dtype
            )
            y = bld.emit(
                relax.call_tir(
                    gv, [x2, b if w is None else w], relax.TensorType([m, nd], "float32")
                )
            )
            self.counts["matmul_dense"] += 1
            if w is not None:
                self.counts["matmul_stored_weight"] += 1
            return y if len(sa) == 2 else memory_view(y, [*lead, nd])
        gqa = self._grouped_query(a, b, sa)
        if gqa is not None:
            return gqa
        found = self._transposed(b, sa)
        if found is not None:  # a · xᵀ (attention's scores): the keys as stored, no transpose
            x, k_static = found
            batch = sa[:-2]
            md, kd, nd = sa[-2], sa[-1], x.ty.shape.values[-2]
            bt = _prod(batch)
            a3 = a if len(sa) == 3 else bld.emit(memory_view(a, [bt, md, kd]))
            x3, prefix = self._rows3(x, bt, k_static)
            y = self._scores(a3, x3, [bt, md, nd], k_static, prefix)
            return y if len(sa) == 3 else memory_view(y, [*batch, md, nd])
        if len(sa) == len(sb) >= 3 and self._equal(sa[:-2], sb[:-2]):
            batch = sa[:-2]
            md, kd, nd = sa[-2], sa[-1], sb[-1]
            bt = _prod(batch)
            a3 = a if len(sa) == 3 else bld.emit(memory_view(a, [bt, md, kd]))
            b3, prefix = self._rows3(b, bt, nd)
            gv = self._kernel(True, static_extent(md), static_extent(nd), static_extent(kd),
                              prefix=prefix)  # fmt: skip
            y = bld.emit(relax.call_tir(gv, [a3, b3], relax.TensorType([bt, md, nd], "float32")))
            self.counts["matmul_batched"] += 1
            return y if len(sa) == 3 else memory_view(y, [*batch, md, nd])
        self.counts["matmul_default"] += 1
        return call


def _dims(m: int | None, n: int | None, k: int | None) -> str:
    """A kernel name's sizes: ``m4_nx_k128`` (``x``: symbolic)."""
    return "_".join(f"{c}{v if v is not None else 'x'}" for c, v in zip("mnk", (m, n, k),
                                                                         strict=True))  # fmt: skip


def memory_view(x: Any, shape: Sequence[Any]) -> Any:
    """``x`` (contiguous, as every Relax tensor is) seen with another shape, without a copy.

    `relax.op.reshape` is legalized into a copying kernel and turned back into a view only
    where TVM can prove the kernel is a plain reshape, which fails for products of symbolic
    dims (``batch * heads``); a memory view never copies, and memory planning keeps the
    source's storage alive while the view is (it treats views as reshapes).
    """
    return relax.op.memory.view(x, relax.ShapeExpr(list(shape)))


def _swap_of(value: Any) -> Any:
    """The operand of ``value`` when it is ``permute_dims(x)`` swapping x's two axes."""
    if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.permute_dims"):
        return None
    x = value.args[0]
    if not isinstance(x.ty, relax.TensorType) or x.ty.ndim != 2:
        return None
    axes = value.attrs.axes
    return x if axes is None or [int(a) for a in axes] == [1, 0] else None


def _cast_of(value: Any) -> Any:
    """The operand of ``value`` when it is ``astype(x, "float32")`` of a 16-bit ``x``."""
    if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.astype"):
        return None
    x = value.args[0]
    ok = str(value.attrs.dtype) == "float32" and str(getattr(x.ty, "dtype", "")) in _SHORT
    return x if ok else None


@expr_functor.visitor
class _Uses(relax.PyExprVisitor):
    """Which bindings transpose a 2-D parameter, directly or through its float32 cast (a
    16-bit weight, `import_onnx` with ``upcast``), and how often each parameter and each
    such cast is read."""

    def __init__(self, params: set[Any]) -> None:
        super().__init__()
        self.params = params
        self.reads: Counter[Any] = Counter()
        self.casts: dict[Any, Any] = {}  # binding var -> the parameter it casts to float32
        #: binding var -> (the parameter it transposes, the cast it reads or None)
        self.transposed: dict[Any, tuple[Any, Any]] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        x = _swap_of(binding.value)
        if x is not None and x in self.params:
            self.transposed[binding.var] = (x, None)
        elif x is not None and x in self.casts:
            self.transposed[binding.var] = (self.casts[x], x)
        w = _cast_of(binding.value)
        if w is not None and w in self.params:
            self.casts[binding.var] = w
        super().visit_var_binding_(binding)

    def visit_var_(self, var: relax.Var) -> None:
        if var in self.params or var in self.casts:
            self.reads[var] += 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.visit_var_(var)

    def transposed_reads(self, w: Any) -> tuple[int, int]:
        """``(reads of w, reads of w that only feed a transpose)``."""
        direct = sum(1 for p, c in self.transposed.values() if c is None and p.same_as(w))
        via = 0
        for c, p in self.casts.items():
            if p.same_as(w):
                swaps = sum(
                    1 for q, cc in self.transposed.values() if cc is not None and cc.same_as(c)
                )
                via += int(swaps > 0 and swaps == self.reads[c])
        return self.reads[w], direct + via


@expr_functor.mutator
class _Fold(relax.PyExprMutator):
    """Reads each folded transpose as the transposed parameter (or its float32 cast)."""

    def __init__(self, fold: dict[Any, tuple[Any, bool]], drop: set[Any]) -> None:
        super().__init__()
        self.fold = fold  # binding var -> (transposed parameter, whether to cast it)
        self.drop = drop  # casts of a parameter that is no longer there (only read transposed)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self.fold.get(binding.var)
        if binding.var in self.drop:
            return
        if new is None:
            super().visit_var_binding_(binding)
        elif new[1]:
            value = self.builder_.normalize(relax.op.astype(new[0], "float32"))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
        else:
            self.set_var_remap(binding.var, new[0])


def fold_weight_transposes(dm: DenseModule) -> DenseModule:
    """Store transposed every 2-D weight that the graph transposes before use.

    transformers' exports keep a linear layer's weight as checkpoint-shaped ``[out, in]``
    followed by a ``Transpose`` (so that the weight stays the checkpoint's bytes,
    docs/hf_export.md); onnxruntime folds that transpose into the weight when it loads the
    model, but a compiled artifact would transpose every weight at every call: for the
    paper-shaped decoder (docs/performance.md) 210 MiB of weights moved per decode step,
    unscheduled. Here each such weight is written transposed into the artifact (named
    ``<name>.T``) and the transpose disappears; a weight also read untransposed (a tied
    embedding and head) keeps its own tensor and gets a transposed copy. A 16-bit weight that
    is cast to float32 and then transposed (`import_onnx` with ``upcast``; the export of a
    bf16 checkpoint) is stored transposed in its own dtype, and the cast moves onto it,
    where the projection kernel reads it as stored. Applies to every entry (``main``,
    ``decode``) alike: they share their parameters. Adds ``weights_transposed`` (and
    ``weights_transposed_copies``) to `DenseModule.stats`.
    """
    names = list(dm.params)
    entries = [(gv, f) for gv, f in dm.mod.functions_items()
               if isinstance(f, relax.Function) and f.attrs is not None
               and "num_input" in f.attrs]  # fmt: skip
    if not entries:
        return dm
    uses: dict[str, tuple[int, int]] = {}  # name -> (reads, transposed reads), all entries
    found: list[tuple[Any, Any, _Uses, dict[str, Any]]] = []
    for gv, f in entries:
        n_in = int(f.attrs["num_input"])
        by_name = {p.name: p for p in f.params[n_in:]}
        u = _Uses({p for p in by_name.values() if getattr(p.ty, "ndim", 0) == 2})
        u.visit_expr(f)
        for name, var in by_name.items():
            r, t = u.transposed_reads(var)
            r0, t0 = uses.get(name, (0, 0))
            uses[name] = (r0 + r, t0 + t)
        found.append((gv, f, u, by_name))
    folded = [n for n in names if uses.get(n, (0, 0))[1] > 0]
    if not folded:
        return dm
    only = {n for n in folded if uses[n][0] == uses[n][1]}
    params: dict[str, Any] = {}
    for n, v in dm.params.items():
        if n in only:
            params[f"{n}.T"] = v.T
        else:
            params[n] = v
    for n in folded:
        if n not in only:
            params[f"{n}.T"] = dm.params[n].T
    mod = dm.mod
    for gv, f, u, by_name in found:
        n_in = int(f.attrs["num_input"])
        new_vars: dict[str, Any] = {}
        for n in folded:
            old = by_name[n]
            shape = list(old.ty.shape.values)
            new_vars[n] = relax.Var(f"{n}.T", relax.TensorType(shape[::-1], old.ty.dtype))
        fold = {b: (new_vars[w.name], c is not None) for b, (w, c) in u.transposed.items()
                if w.name in new_vars}  # fmt: skip
        drop = {c for c, w in u.casts.items() if w.name in only}
        body = _Fold(fold, drop).visit_expr(f.body)
        kept = [new_vars[p.name] if p.name in only else p for p in f.params[n_in:]]
        extra = [new_vars[n] for n in folded if n not in only]
        new_params = [*f.params[:n_in], *kept, *extra]
        mod[gv] = relax.Function(new_params, body, f.ret_ty, f.is_pure, f.attrs)
    mod = relax.transform.DeadCodeElimination()(mod)
    stats = {**dm.stats, "weights_transposed": len(folded)}
    if len(folded) > len(only):
        stats["weights_transposed_copies"] = len(folded) - len(only)
    logger.info("weights stored transposed: %d (%d copies)", len(folded), len(folded) - len(only))
    return replace(dm, mod=mod, params=params, stats=stats)


#: 16-bit weight dtypes a scheduled projection takes as they are, and their kernel suffix.
_SHORT = {"float16": "f16", "bfloat16": "bf16"}


def schedule_dense_ops(dm: DenseModule) -> DenseModule:
    """Replace the dense matmuls of every Relax function by scheduled CPU kernels.

    Reads and writes `DenseModule.mod`; adds the counters ``matmul_dense``,
    ``matmul_batched``, ``matmul_keys_as_stored`` (batched ones that read the keys as
    stored), ``matmul_default`` (left to the default legalization),
    ``matmul_stored_weight`` (projections that read a 16-bit weight as stored; absent when
    none) and ``kernels`` (distinct PrimFuncs) to `DenseModule.stats`.
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
    *,
    weights: Mapping[str, LazyArray] | None = None,
    upcast: bool = False,
) -> DenseModule:
    """Phases 1-3: import, run the hooks, schedule the dense ops (CPU targets only).

    Args:
        model: ONNX model or path.
        target: "llvm" (kernels scheduled) or a CUDA target (left to `compile_module`'s
            GPU default schedules).
        hooks: Relax hooks run after import and before dense scheduling, in order.
        op_converters: converters for custom ONNX ops (see `import_onnx`).
        weights: weight values handed over unread (see `import_onnx`).
        upcast: 16-bit weights of a float32 graph are cast where read (see `import_onnx`).

    Returns:
        The lowered module, ready for `compile_module`.
    """
    from modec.lowering.determinism import canonical_te_calls

    with canonical_te_calls():  # the importer and the hooks emit TE kernels too
        dm = import_onnx(model, op_converters, weights=weights, upcast=upcast)
        for hook in hooks:
            dm = hook(dm)
            _check_params(dm, getattr(hook, "__name__", repr(hook)))
        if not is_cuda(resolve_target(target)):
            dm = schedule_dense_ops(fold_weight_transposes(dm))
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

    On CPU the Relax pipeline is TVM's CPU one with operator fusion (`_relax_pipeline`).
    For a CUDA target TVM's CUDA pipeline dispatches sort/top-k to its GPU kernels, then
    legalizes and gives every PrimFunc not marked ``tirx.is_scheduled`` dlight's GPU default
    schedule (build only: there is no GPU on the build machine).
    """
    from modec.kernels.subroutine import TIR_PIPELINE
    from modec.lowering.determinism import canonical_te_calls

    tgt = resolve_target(target)
    tir = "default" if is_cuda(tgt) else TIR_PIPELINE  # CPU kernels may call subroutines
    with tgt, canonical_te_calls():
        return tvm.compile(
            dm.mod, target=tgt, relax_pipeline=_relax_pipeline(tgt), tir_pipeline=tir
        )


def _relax_pipeline(tgt: Any) -> Any:
    """TVM's default pipeline for the target, then a canonical shape-function order.

    On CPU that is TVM's CPU pipeline (``relax.backend.cpu_generic``: legalize, then fuse
    the element-wise, norm and softmax chains into one kernel each with FuseOps/FuseTIR,
    then lower to the VM) with `opaque_prim_value_callees` before the fusion and
    `modec.lowering.cpu_schedule.parallel_rows` after it (the decode entry keeps serial
    copies of the kernels it schedules). Without fusion (the plain ``default`` pipeline) a
    decode step of a 2-layer model makes ~200 kernel calls and ~1,200 VM builtin calls
    instead of ~100 and ~750.

    TVM emits the VM shape function in hash-map order, and legalization orders a kernel's
    symbolic-shape parameters by object address, both of which vary between processes; the
    extra pass and `compile_module`'s `canonical_te_calls` make the library bytes depend on
    the model only (`modec.lowering.determinism`).
    """
    from modec.lowering.cpu_schedule import parallel_rows
    from modec.lowering.decode_entry import DECODE
    from modec.lowering.determinism import canonical_shape_funcs

    if not is_cuda(tgt):
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        legalize = cpu.legalize_passes(tgt)
        fuse_at = next(i for i, p in enumerate(legalize) if p.info.name == "FuseOps")
        passes = (
            cpu.library_dispatch_passes(tgt)
            + legalize[:fuse_at] + [opaque_prim_value_callees] + legalize[fuse_at:]
            + [parallel_rows(serial_in=(DECODE,))]
            + cpu.dataflow_lower_passes(tgt)
            + cpu.finalize_passes(tgt)
        )  # fmt: skip
        return tvm.transform.Sequential([*passes, canonical_shape_funcs])
    try:
        base = relax.get_default_pipeline(tgt)
    except (ValueError, AttributeError):
        base = relax.get_pipeline("default")
    return tvm.transform.Sequential([base, canonical_shape_funcs])


@tvm.transform.module_pass(opt_level=0, name="OpaquePrimValueCallees")
def opaque_prim_value_callees(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
    """Marks every PrimFunc that a ``call_tir`` passes a Relax scalar (a ``PrimValue``
    argument, such as the in-place decode's cache length) as opaque, so FuseOps leaves it
    out of its groups: TVM 0.27's FuseTIR fails on a group whose function takes such a
    scalar that a callee also declares ("VarRemapGet(source) == nullptr"; the tiny GPT-OSS
    decode entry has one). It costs one kernel call per such site, a handful per model."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    callees: set[Any] = set()

    @relax.expr_functor.visitor
    class _Find(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            args = call.args[1] if call.op.same_as(call_tir) else None
            if isinstance(args, relax.Tuple) and any(
                isinstance(a.ty, tvm.ir.PrimType) for a in args.fields
            ):
                callees.add(call.args[0])
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Find().visit_expr(func)
    out = mod.clone()  # the input module is left as it is
    for gv in callees:
        func = mod[gv]
        if isinstance(func, tvm.tirx.PrimFunc):
            out[gv] = func.with_attr("op_pattern", 8)  # kOpaque
    return out
