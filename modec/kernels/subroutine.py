"""Kernels that call kernels: a run-time choice between two schedules of one operation (CPU).

A dequant-matmul over a symbolic row count M runs a GEMM schedule (register tiles of several
rows), which at M = 1, a decode step, multiplies three padding rows for every real one; the
GEMV schedule for a static M = 1 is 2.4x faster there. One PrimFunc cannot hold both
schedules, but TVM 0.27 lowers a call from one PrimFunc to another private PrimFunc of the
same IRModule whose parameters are pointers and scalars to a direct function call. So a
dispatcher (`dispatcher`) tests M and calls one of two subroutines (`as_subroutine`), each a
scheduled kernel with its buffers declared on the pointers it is passed.

Two gaps are closed here, in `TIR_PIPELINE` ("modec-cpu", registered with
``tvm.tirx.compilation_pipeline.register_tir_pipeline``): TVM's default TIR pipeline with a
pass before it and one after.
- Relax's AttachGlobalSymbol names every PrimFunc of the module; a named one gets the
  packed calling convention and the direct calls to it break. The first pass removes the
  name from each function marked `SUBROUTINE`.
- LowerTVMBuiltin turns a kernel's scratch allocations into workspace calls that need the
  device, which it reads from attributes that only the packed-API pass writes, and only on
  public functions. The last pass puts the CPU device (type 1, id 0) around the body of
  each subroutine, after storage planning has placed its allocations.
Build CPU modules holding subroutines with ``tvm.compile(..., tir_pipeline=TIR_PIPELINE)``
(`modec.lowering.dense.compile_module` and `modec.kernels.api` do). A subroutine returns 0,
or -1 where a workspace allocation failed, and the dispatcher then raises TVM's last error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tvm
from tvm import ir, tirx
from tvm.tirx import compilation_pipeline

__all__ = ["SUBROUTINE", "TIR_PIPELINE", "as_subroutine", "dispatcher"]

#: Function attribute marking a subroutine (the pipeline attaches the CPU device to it).
SUBROUTINE = "modec.cpu_subroutine"
#: Name of the TIR pipeline that builds modules with subroutines.
TIR_PIPELINE = "modec-cpu"

_CPU, _DEVICE_ID = 1, 0  # kDLCPU, device 0


def as_subroutine(func: tirx.PrimFunc, scalars: Sequence[tirx.Var] = ()) -> tirx.PrimFunc:
    """``func`` callable from another PrimFunc: each buffer parameter becomes a pointer
    parameter with the buffer declared on it in the body, then ``scalars`` (the symbolic
    sizes its buffer shapes use) as scalar parameters; private, marked `SUBROUTINE`."""
    params: list[tirx.Var] = []
    decls: list[tirx.Stmt] = []
    for p in func.params:
        dtype = p.ty.dtype
        elem = dtype if isinstance(dtype, ir.PrimType) else ir.PrimType(dtype)
        ptr = tirx.Var(f"{p.name}_ptr", ir.PointerType(elem))
        params.append(ptr)
        decls.append(tirx.DeclBuffer(p, data=ptr))
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs.pop("global_symbol", None)
    attrs[SUBROUTINE] = True
    # int32, 0 on success: a failed workspace allocation returns -1 (TVM's error path).
    body = tirx.SeqStmt([*decls, func.body, tirx.Return(tirx.IntImm("int32", 0))])
    ret = ir.PrimType("int32")
    return tirx.PrimFunc([*params, *scalars], body, ret_type=ret).with_attrs(attrs)


def dispatcher(like: tirx.PrimFunc, one: ir.GlobalVar, many: ir.GlobalVar) -> tirx.PrimFunc:
    """A PrimFunc with the parameters of ``like`` (buffers whose shapes use one symbolic size
    m) that calls subroutine ``one`` (pointers only) when m == 1 and ``many`` (pointers, m)
    otherwise. Its buffers and m are fresh variables, not ``like``'s."""
    sizes = {
        d for p in like.params for d in p.ty.shape if isinstance(d, tirx.Var)
    }  # the symbolic dims
    if len(sizes) != 1:
        raise ValueError(f"dispatcher: expected one symbolic size, got {sorted(map(str, sizes))}")
    (old,) = sizes
    m = tirx.Var(old.name, old.ty)
    params = [
        tirx.decl_buffer([m if d.same_as(old) else d for d in p.ty.shape], p.ty.dtype, p.name)
        for p in like.params
    ]
    ptrs = [tirx.buffer_data(b) for b in params]

    def call(gv: ir.GlobalVar, args: list[Any]) -> tirx.Stmt:
        # A subroutine's non-zero return (a failed workspace allocation) raises its error.
        failed = ir.Call(gv, args, ret_ty="int32") != tirx.IntImm("int32", 0)
        throw = tirx.op.call_intrin("int32", "tirx.tvm_throw_last_error")
        return tirx.IfThenElse(failed, tirx.Evaluate(throw), None)

    body = tirx.IfThenElse(m == tirx.IntImm(m.ty.dtype, 1), call(one, ptrs), call(many, [*ptrs, m]))
    attrs = dict(like.attrs) if like.attrs is not None else {}
    return tirx.PrimFunc(params, body).with_attrs(attrs)


def _subroutines(mod: tvm.IRModule) -> list[tuple[ir.GlobalVar, tirx.PrimFunc]]:
    return [
        (gv, f)
        for gv, f in mod.functions.items()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get(SUBROUTINE)
    ]


@tvm.transform.module_pass(opt_level=0, name="modec.KeepSubroutinesPrivate")
def _keep_private(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
    """Relax's AttachGlobalSymbol names every PrimFunc; a subroutine must stay private (a
    public one gets the packed calling convention, and the calls to it break)."""
    for gv, func in _subroutines(mod):
        mod[gv] = func.without_attr("global_symbol")
    return mod


@tvm.transform.module_pass(opt_level=0, name="modec.AttachSubroutineDevice")
def _attach_device(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
    zero = tirx.IntImm("int32", 0)
    for gv, func in _subroutines(mod):
        body = tirx.AttrStmt(zero, "device_type", tirx.IntImm("int32", _CPU), func.body)
        body = tirx.AttrStmt(zero, "device_id", tirx.IntImm("int32", _DEVICE_ID), body)
        mod[gv] = func.with_body(body)
    return mod


def _pipeline(**kwargs: Any) -> Any:
    base, host, device = compilation_pipeline.get_tir_pipeline("s_tir", **kwargs)
    return tvm.transform.Sequential([_keep_private, base, _attach_device]), host, device


compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _pipeline)
