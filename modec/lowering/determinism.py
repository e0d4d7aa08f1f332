"""Make TVM's output a function of its input: a canonical order for VM shape functions.

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
"""

from __future__ import annotations

import heapq
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Expr, TensorLoad

__all__ = ["canonical_shape_funcs", "canonical_store_order"]

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
