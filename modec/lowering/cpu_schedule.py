"""CPU schedules for the kernels TVM legalizes: element-wise chains, norms, softmax, gathers.

TVM 0.27's CPU pipeline (``relax.backend.cpu_generic``) legalizes and fuses these operators
but schedules none of them: each is a serial loop nest on one core, whatever the machine
has. In a 256-token prefill of the paper-shaped decoder the attention softmax alone took
~15 ms a layer, a serial ``expf`` over 2 M scores (docs/performance.md). modec's own
kernels (matmuls, experts, attention products) are parallel already and are left alone.

`parallel_rows` (a module pass after FuseTIR, `modec.lowering.dense._relax_pipeline`)
gives each such PrimFunc rows over the cores:

- the output block's leading spatial loops (all but the innermost where every loop is
  spatial) are fused into one loop of rows, run in parallel;
- every earlier block (a fused kernel's producers: a norm's mean, softmax's max, exp and
  sum) that iterates over the same rows is computed at that loop, so a row's producers run
  on the core that consumes them, right before, while the row is in cache; a producer over
  other rows (a broadcast operand) gets its own parallel rows.

Each element is computed by the same expression in the same order as before (a reduction
stays serial along its row), so the outputs are bit-identical; only the rows are spread.
A kernel the schedule cannot normalize (dlight's `normalize_prim_func`: extern calls,
opaque blocks) is left as it was. The Relax functions named in ``serial_in`` (the decode
entry) call serial copies: a decode step's kernels are a row or a few, smaller than what a
launch on the thread pool costs. Not those that evaluate the exponential family per element
(`EXPONENTIAL`: attention's softmax over every cached position, the experts' SiLU over
their rows): each element costs a libm call that LLVM does not vectorize, and on the
paper-shaped decoder at 256 cached positions such a kernel took 24-31 µs serial. With them
on the thread pool its decode step was 1.022x faster (docs/performance.md).
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

__all__ = ["EXPONENTIAL", "calls_exponential", "parallel_rows", "schedule_rows"]

log = logging.getLogger(__name__)

#: TIR intrinsics of the exponential family (softmax, SiLU and sigmoid gates, GELU): a kernel
#: calling one keeps its parallel rows in the ``serial_in`` entries (module docstring).
EXPONENTIAL = frozenset({"tirx.exp", "tirx.sigmoid", "tirx.tanh", "tirx.erf"})


def calls_exponential(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` calls an intrinsic of `EXPONENTIAL`."""
    found: list[str] = []

    def visit(call: Any) -> None:
        if isinstance(call.op, tvm.ir.Op) and call.op.name in EXPONENTIAL:
            found.append(call.op.name)

    tvm_ffi.structural_walk(func.body, (tvm.ir.Call, visit))
    return bool(found)


def _has_parallel_loop(sch: s_tir.Schedule, infos: list[Any]) -> bool:
    return any(
        sch.get(loop).kind == tirx.ForKind.PARALLEL
        for info in infos
        for loop in sch.get_loops(info.block_rv)
    )


def _spatial_prefix(info: Any, keep_innermost: bool) -> list[Any]:
    """The block's spatial iterations before its first reduction (without one: all of
    them, or all but the innermost unless ``keep_innermost``); none where an iteration
    among them is not spatial."""
    kinds = [it.kind for it in info.iters]
    n = kinds.index("R") if "R" in kinds else len(kinds) - (0 if keep_innermost else 1)
    return list(info.iters[:n]) if all(k == "S" for k in kinds[:n]) else []


def _lead(info: Any) -> list[Any]:
    """The block's iterations that make its rows: every spatial one before the first
    reduction, or all but the innermost where the block has no reduction."""
    return _spatial_prefix(info, keep_innermost=False)


def _spatial(info: Any) -> list[Any]:
    """The block's spatial iterations before its first reduction."""
    return _spatial_prefix(info, keep_innermost=True)


def _same_extents(a: list[Any], b: list[Any]) -> bool:
    analyzer = tvm.sym.Analyzer()
    return len(a) == len(b) and all(
        analyzer.can_prove_equal(x.dom, y.dom) for x, y in zip(a, b, strict=True)
    )


def _rows(sch: s_tir.Schedule, lead: list[Any]) -> Any:
    loops = [it.loop_rv for it in lead]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)
    return fused


def schedule_rows(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with its rows in parallel (module docstring), or None where there is nothing
    to do: already scheduled, no rows, or a body the schedule cannot normalize."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    attrs = func.attrs if func.attrs is not None else {}
    if attrs.get("tirx.is_scheduled"):
        return None
    try:
        sch = s_tir.Schedule(func)
    except (RuntimeError, ValueError):  # TVM raises its errors as these
        return None
    infos = normalize_prim_func(sch)
    if not infos or _has_parallel_loop(sch, infos):
        return None
    out = infos[-1]
    lead = _lead(out)
    if not lead:
        return None
    try:
        rows = _rows(sch, lead)
        for info in reversed(infos[:-1]):
            if _same_extents(_spatial(info)[: len(lead)], lead):
                sch.compute_at(info.block_rv, rows, preserve_unit_loops=True)
            elif mine := _lead(info):
                _rows(sch, mine)
    except (RuntimeError, ValueError) as err:  # s_tir.ScheduleError is a RuntimeError
        log.debug("parallel_rows: %s left serial (%s)", func.attrs, str(err).splitlines()[0])
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def parallel_rows(serial_in: tuple[str, ...] = ()) -> tvm.transform.Pass:
    """A module pass giving every legalized PrimFunc its rows over the cores
    (`schedule_rows`), except where the Relax functions named in ``serial_in`` call it:
    there it calls the serial original, kept beside it as ``<name>_serial``, unless it
    `calls_exponential`. A launch on the thread pool costs about a microsecond here; a
    decode step's small kernels (a row of 2,048) take less, and a step makes some sixty of
    them. The input module is left as it is."""

    @tvm.transform.module_pass(opt_level=0, name="modec.ParallelRows")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod.clone())
        serial: dict[Any, Any] = {}
        # In name order: the copies are added in an order that does not depend on the
        # module's hash map (the library's bytes must not; `modec.lowering.determinism`).
        for gv, func in sorted(mod.functions.items(), key=lambda kv: kv[0].name_hint):
            if isinstance(func, tirx.PrimFunc):
                scheduled = schedule_rows(func)
                if scheduled is not None:
                    bb.update_func(gv, scheduled)
                    if serial_in and not calls_exponential(func):
                        serial[gv] = bb.add_func(func, f"{gv.name_hint}_serial")
        out = bb.get()
        for gv in list(out.functions):
            if gv.name_hint in serial_in and serial:
                out[gv] = _CallsTo(out, serial).visit_expr(out[gv])
        return out

    return run


@relax.expr_functor.mutator
class _CallsTo(relax.PyExprMutator):
    """Points each ``call_tir`` of a PrimFunc in ``targets`` at its replacement."""

    def __init__(self, mod: tvm.IRModule, targets: dict[Any, Any]) -> None:
        super().__init__(mod)
        self.targets = targets
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(self.call_tir) and call.args[0] in self.targets:
            args = [self.targets[call.args[0]], *call.args[1:]]
            return relax.Call(call.op, args, call.attrs, call.ty_args)
        return call
