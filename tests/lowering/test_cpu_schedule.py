"""`modec.lowering.cpu_schedule`: legalized kernels get parallel rows, with the same bytes out."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from modec.lowering.cpu_schedule import (  # noqa: E402
    calls_exponential,
    parallel_rows,
    schedule_rows,
)


# TVM's legalized softmax over the last axis (topi), with a scalar parameter in its shape
# as the attention scores have (past + new keys).
@T.prim_func(private=True, s_tir=True)
def softmax(var_x: T.handle, past: T.int64, var_y: T.handle) -> None:
    T.func_attr({"tirx.noalias": True})
    b, s = T.int64(), T.int64()
    x = T.match_buffer(var_x, (b, T.int64(4), s, past + s), "float32")
    y = T.match_buffer(var_y, (b, T.int64(4), s, past + s), "float32")
    mx = T.sblock_alloc_buffer((b, T.int64(4), s))
    ex = T.sblock_alloc_buffer((b, T.int64(4), s, past + s))
    sm = T.sblock_alloc_buffer((b, T.int64(4), s))
    for i0, i1, i2, k in T.grid(b, T.int64(4), s, past + s):
        with T.sblock("max"):
            v0, v1, v2, vk = T.axis.remap("SSSR", [i0, i1, i2, k])
            with T.init():
                mx[v0, v1, v2] = T.float32(-3.4e38)
            mx[v0, v1, v2] = T.max(mx[v0, v1, v2], x[v0, v1, v2, vk])
    for i0, i1, i2, i3 in T.grid(b, T.int64(4), s, past + s):
        with T.sblock("exp"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            ex[v0, v1, v2, v3] = T.exp(x[v0, v1, v2, v3] - mx[v0, v1, v2])
    for i0, i1, i2, k in T.grid(b, T.int64(4), s, past + s):
        with T.sblock("sum"):
            v0, v1, v2, vk = T.axis.remap("SSSR", [i0, i1, i2, k])
            with T.init():
                sm[v0, v1, v2] = T.float32(0)
            sm[v0, v1, v2] = sm[v0, v1, v2] + ex[v0, v1, v2, vk]
    for i0, i1, i2, i3 in T.grid(b, T.int64(4), s, past + s):
        with T.sblock("norm"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            y[v0, v1, v2, v3] = ex[v0, v1, v2, v3] / sm[v0, v1, v2]


# A fused RMSNorm (FuseTIR's output): a mean per row, element-wise ops on it, then a
# broadcast multiply; plus a mask built over other rows ([b, 1, s]) than the output's.
@T.prim_func(private=True, s_tir=True)
def rms_masked(var_x: T.handle, w: T.Buffer((T.int64(24),), "float32"), var_y: T.handle) -> None:
    T.func_attr({"tirx.noalias": True})
    b, s = T.int64(), T.int64()
    eps = T.float32(1e-6)
    x = T.match_buffer(var_x, (b, T.int64(3), s, T.int64(24)), "float32")
    y = T.match_buffer(var_y, (b, T.int64(3), s, T.int64(24)), "float32")
    red = T.sblock_alloc_buffer((b, T.int64(3), s))
    rinv = T.sblock_alloc_buffer((b, T.int64(3), s))
    mask = T.sblock_alloc_buffer((b, s, T.int64(24)))
    for i0, i1, i2, k in T.grid(b, T.int64(3), s, T.int64(24)):
        with T.sblock("red"):
            v0, v1, v2, vk = T.axis.remap("SSSR", [i0, i1, i2, k])
            with T.init():
                red[v0, v1, v2] = T.float32(0)
            red[v0, v1, v2] = red[v0, v1, v2] + x[v0, v1, v2, vk] * x[v0, v1, v2, vk]
    for i0, i1, i2 in T.grid(b, T.int64(3), s):
        with T.sblock("rinv"):
            v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
            rinv[v0, v1, v2] = T.float32(1) / T.sqrt(red[v0, v1, v2] / T.float32(24) + eps)
    for i0, i1, i2 in T.grid(b, s, T.int64(24)):
        with T.sblock("mask"):
            v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
            mask[v0, v1, v2] = T.Select(v1 % T.int64(2) == T.int64(0), T.float32(1), T.float32(0.5))
    for i0, i1, i2, i3 in T.grid(b, T.int64(3), s, T.int64(24)):
        with T.sblock("out"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            y[v0, v1, v2, v3] = x[v0, v1, v2, v3] * rinv[v0, v1, v2] * w[v3] * mask[v0, v2, v3]


def _parallel_loops(func: tvm.tirx.PrimFunc) -> int:
    return func.script().count("T.parallel(")


def _build(func: tvm.tirx.PrimFunc) -> object:
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")


@pytest.mark.parametrize(("b", "s", "past"), [(1, 1, 0), (1, 1, 37), (2, 19, 5), (1, 64, 0)])
def test_softmax_rows_in_parallel_same_bytes(b: int, s: int, past: int) -> None:
    scheduled = schedule_rows(softmax)
    assert scheduled is not None
    # One parallel loop of rows; max, exp and sum are computed at it, not on their own.
    assert _parallel_loops(scheduled) == 1
    x = np.random.default_rng(b * 100 + s).standard_normal((b, 4, s, past + s)) * 8
    x = x.astype(np.float32)
    outs = []
    for func in (softmax, scheduled):
        y = tvm.runtime.tensor(np.full(x.shape, np.nan, np.float32))
        _build(func)(tvm.runtime.tensor(x), past, y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(outs[1], ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("b", "s"), [(1, 1), (3, 7)])
def test_fused_norm_producers_at_the_rows_same_bytes(b: int, s: int) -> None:
    scheduled = schedule_rows(rms_masked)
    assert scheduled is not None
    # The output's rows (b, 3, s) and the norm's producers at them; the mask iterates over
    # other rows (b, s) and gets its own parallel loop.
    assert _parallel_loops(scheduled) == 2
    rng = np.random.default_rng(s)
    x = rng.standard_normal((b, 3, s, 24)).astype(np.float32)
    w = rng.standard_normal(24).astype(np.float32)
    outs = []
    for func in (rms_masked, scheduled):
        y = tvm.runtime.tensor(np.full(x.shape, np.nan, np.float32))
        _build(func)(tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    mask = np.where(np.arange(s) % 2 == 0, 1.0, 0.5).astype(np.float32)[None, None, :, None]
    rinv = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(outs[1], x * rinv * w * mask, rtol=1e-5)


def test_scheduled_and_kernel_functions_are_left_alone() -> None:
    assert schedule_rows(softmax.with_attr("tirx.is_scheduled", True)) is None
    scheduled = schedule_rows(softmax)
    assert scheduled is not None
    assert schedule_rows(scheduled) is None  # already parallel (and marked)

    # A kernel written with its own loops (modec's kernels are) is not a block nest the
    # schedule normalizes.
    @T.prim_func(private=True, s_tir=False)
    def kernel(x: T.Buffer((T.int64(8),), "float32"), y: T.Buffer((T.int64(8),), "float32")):
        for i in T.parallel(T.int64(8)):
            y[i] = x[i] * T.float32(2)

    assert schedule_rows(kernel) is None


def test_serial_entries_call_the_serial_originals() -> None:
    """The decode entry calls serial copies of the scheduled kernels, except those that
    evaluate exp, sigmoid, tanh or erf per element (softmax, SiLU): those keep their
    parallel rows there (no serial copy)."""

    @I.ir_module
    class Mod:
        @T.prim_func(private=True, s_tir=True)
        def scale(x: T.Buffer((T.int64(16), T.int64(8)), "float32"),
                  y: T.Buffer((T.int64(16), T.int64(8)), "float32")) -> None:  # fmt: skip
            for i, j in T.grid(T.int64(16), T.int64(8)):
                with T.sblock("scale"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj] * T.float32(2)

        @T.prim_func(private=True, s_tir=True)
        def swish(x: T.Buffer((T.int64(16), T.int64(8)), "float32"),
                  y: T.Buffer((T.int64(16), T.int64(8)), "float32")) -> None:  # fmt: skip
            for i, j in T.grid(T.int64(16), T.int64(8)):
                with T.sblock("swish"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj] * T.sigmoid(x[vi, vj])

        @R.function
        def main(x: R.Tensor((16, 8), "float32")) -> R.Tensor((16, 8), "float32"):
            cls = Mod
            return R.call_tir(cls.scale, (x,), out_ty=R.Tensor((16, 8), "float32"))

        @R.function
        def decode(x: R.Tensor((16, 8), "float32")) -> R.Tensor((16, 8), "float32"):
            cls = Mod
            with R.dataflow():
                a = R.call_tir(cls.scale, (x,), out_ty=R.Tensor((16, 8), "float32"))
                b = R.call_tir(cls.swish, (a,), out_ty=R.Tensor((16, 8), "float32"))
                R.output(b)
            return b

    assert calls_exponential(Mod["swish"]) and not calls_exponential(Mod["scale"])
    out = parallel_rows(serial_in=("decode",))(Mod)
    assert _parallel_loops(out["scale"]) == 1
    assert _parallel_loops(out["scale_serial"]) == 0
    assert _parallel_loops(out["swish"]) == 1
    decode = out["decode"].script()
    assert "call_tir(scale_serial," in decode and "call_tir(swish," in decode
    assert "swish_serial" not in [gv.name_hint for gv in out.functions]
    assert "call_tir(scale," in out["main"].script()
    assert _parallel_loops(Mod["scale"]) == 0  # the input module unchanged
    assert "scale_serial" not in [gv.name_hint for gv in Mod.functions]
    # Both entries still build and compute the same bytes as the unscheduled module.
    ex = relax.VirtualMachine(tvm.compile(out, "llvm"), tvm.cpu())
    ref = relax.VirtualMachine(tvm.compile(Mod, "llvm"), tvm.cpu())
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    for entry in ("main", "decode"):
        want = ref[entry](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(ex[entry](tvm.runtime.tensor(x)).numpy(), want)
    np.testing.assert_array_equal(ex["main"](tvm.runtime.tensor(x)).numpy(), x * 2)
    # Without serial entries no copies are made.
    assert "scale_serial" not in [gv.name_hint for gv in parallel_rows()(Mod).functions]
