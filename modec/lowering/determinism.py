"""Make TVM's output a function of its input: canonical shape functions and kernel parameters.

Relax's ``VMShapeLower`` emits the shape function (``shape_func``: one store per symbolic
shape value into the VM's shape heap ``H``) in the iteration order of a hash map keyed by
object address, so two builds of the same module order those stores differently and the
compiled library differs byte for byte (measured: 149 bytes of ``.text`` in
``shape_func_compute_`` on the tiny digits-vlm, the only difference between two builds).
`canonical_shape_funcs` reorders every run of consecutive constant-index stores into one
order that depends on the IR only: a topological order of their read-after-write
dependencies, ties broken by the slot written. Semantics are unchanged: a store still comes
after every store whose slot it reads, and statements of any other kind stay where they are
and are never crossed.

Legalization has the same flaw one step earlier. ``relax.utils.gen_call_tir_inputs`` (behind
``BlockBuilder.call_te``, which LegalizeOps and DispatchSortScan use) appends the symbolic
shape variables a kernel needs but cannot read off its buffers as trailing scalar parameters
in the order of a Python ``set`` of TVM objects, i.e. by object address. The same cumsum then
takes ``(mask, past, new_)`` in one process and ``(mask, new_, past)`` in another, and two
calls of it in one build may disagree, so that ``BlockBuilder.add_func`` keeps two copies
(``cumsum``, ``cumsum1``) where another process keeps one. Function names, the module and
the library then differ (measured on the tiny Qwen3-MoE family: 93 against 92 kernels, a
different ``.text`` size). `canonical_te_calls` sorts those parameters by name, together
with the call's arguments, while a build runs.
"""

from __future__ import annotations

import contextlib
import heapq
import importlib
from collections.abc import Iterator
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Expr, TensorLoad

from modec.errors import InternalError

__all__ = [
    "canonical_call_tir_inputs",
    "canonical_shape_funcs",
    "canonical_store_order",
    "canonical_te_calls",
]

_CHILDREN = ("a", "b", "value", "args", "condition", "true_value", "false_value", "body")


def _const_index(indices: Any) -> int | None:
    if len(indices) != 1 or not isinstance(indices[0], tirx.IntImm):
        return None
    return int(indices[0].value)


def _loads(expr: Any, out: list[tuple[Any, int | None]]) -> None:
    """Every (buffer, constant slot or None) read by ``expr``."""
    if isinstance(expr, TensorLoad):  # a BufferLoad: `source` is the buffer
        out.append((expr.source, _const_index(expr.indices)))
        for i in expr.indices:
            _loads(i, out)
        return
    for name in _CHILDREN:
        child = getattr(expr, name, None)
        if child is None or isinstance(child, (int, float, str)):
            continue
        if isinstance(child, (list, tuple, tvm_ffi.Array)):
            for c in child:
                _loads(c, out)
        elif isinstance(child, Expr):
            _loads(child, out)


def _store_slot(stmt: Any) -> int | None:
    if not isinstance(stmt, tirx.BufferStore):
        return None
    return _const_index(stmt.indices)


def canonical_store_order(stmts: list[Any]) -> list[Any]:
    """Reorder one run of constant-index stores into the same buffer (see the module doc).

    Returns the run unchanged when it cannot be proven safe to reorder: a store that reads a
    slot of the buffer through a non-constant index, or two stores to one slot.
    """
    slots = [_store_slot(s) for s in stmts]
    if any(s is None for s in slots) or len(set(slots)) != len(slots) or len(stmts) < 2:
        return stmts
    buf = stmts[0].buffer
    writer = {slot: i for i, slot in enumerate(slots)}
    deps: list[set[int]] = []
    for i, s in enumerate(stmts):
        if not s.buffer.same_as(buf):
            return stmts
        reads: list[tuple[Any, int | None]] = []
        _loads(s.value, reads)
        d = set()
        for b, slot in reads:
            if not b.same_as(buf):
                continue
            if slot is None:
                return stmts
            j = writer.get(slot)
            if j is not None and j != i:
                if j > i:
                    return stmts  # reads a slot written later: order is not a pure dataflow
                d.add(j)
        deps.append(d)
    users: dict[int, list[int]] = {i: [] for i in range(len(stmts))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [(slots[i], i) for i in range(len(stmts)) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (slots[u], u))
    return [stmts[i] for i in order]


def _canonical_body(stmt: Any) -> Any:
    if not isinstance(stmt, tirx.SeqStmt):
        return stmt
    out: list[Any] = []
    run: list[Any] = []
    for s in stmt.seq:
        if _store_slot(s) is not None:
            run.append(s)
            continue
        out.extend(canonical_store_order(run))
        run = []
        out.append(_canonical_body(s))
    out.extend(canonical_store_order(run))
    return tirx.SeqStmt(out)


@tvm.transform.module_pass(opt_level=0, name="ModecCanonicalShapeFuncs")
def canonical_shape_funcs(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Module pass: canonical statement order in every ``shape_func`` PrimFunc."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
            body = _canonical_body(func.body)
            if not body.same_as(func.body):
                updates[gv] = func.with_body(body)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def canonical_call_tir_inputs(func: Any, args: list[Any]) -> tuple[Any, list[Any]]:
    """Sort the trailing scalar parameters of a TE-generated PrimFunc by name.

    ``func``'s parameters are the call's arguments ``args`` followed by the outputs; the
    run of scalar (``PrimType``) parameters just before the outputs (the unbound shape
    variables, and any scalar argument passed last) is sorted by name, stable on ties, and
    ``args`` is permuted the same way. The kernel is called by position, so the pair means
    the same thing in any order.
    """
    params = list(func.params)
    n_in = len(args)
    start = n_in
    while start > 0 and isinstance(params[start - 1].ty, tvm.ir.PrimType):
        start -= 1
    order = sorted(range(start, n_in), key=lambda i: str(params[i].name))
    if order == list(range(start, n_in)):
        return func, args
    new_params = params[:start] + [params[i] for i in order] + params[n_in:]
    new_args = list(args[:start]) + [args[i] for i in order]
    return tirx.PrimFunc(new_params, func.body, func.ret_type, func.attrs), new_args


_te_depth = 0

# The modules that bind ``gen_call_tir_inputs`` by name (``from .utils import ...``).
_TE_CALLERS = (
    "tvm.relax.utils",
    "tvm.relax.block_builder",
    "tvm.relax.transform.legalize_ops.manipulate",
)


@contextlib.contextmanager
def canonical_te_calls() -> Iterator[None]:
    """While active, every ``gen_call_tir_inputs`` result has its trailing scalar parameters
    in name order (`canonical_call_tir_inputs`); see the module doc for why. Nested uses
    share the outer one's wrapper."""
    global _te_depth
    modules = [importlib.import_module(m) for m in _TE_CALLERS]
    if _te_depth == 0:
        original = modules[0].gen_call_tir_inputs
        stale = [
            m.__name__ for m in modules if getattr(m, "gen_call_tir_inputs", None) is not original
        ]
        if stale:
            raise InternalError(
                f"{stale} no longer bind tvm.relax.utils.gen_call_tir_inputs; update "
                "modec.lowering.determinism._TE_CALLERS for this TVM version"
            )

        def wrapped(te_func: Any, *args: Any, **kwargs: Any) -> Any:
            tir_func, call_args, out_ty = original(te_func, *args, **kwargs)
            tir_func, call_args = canonical_call_tir_inputs(tir_func, list(call_args))
            return tir_func, call_args, out_ty

        for m in modules:
            m.gen_call_tir_inputs = wrapped  # type: ignore[attr-defined]
    _te_depth += 1
    try:
        yield
    finally:
        _te_depth -= 1
        if _te_depth == 0:
            for m in modules:
                m.gen_call_tir_inputs = original  # type: ignore[attr-defined]
