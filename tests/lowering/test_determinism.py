"""Byte-identical artifacts: the canonical shape-function order, the canonical order of a TE
kernel's shape parameters, and two builds in one process (tests/test_compile_determinism.py
builds in separate processes)."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, tirx, topi
from tvm.script import tirx as T

from modec.driver import CompileOptions, compile_model
from modec.lowering.determinism import (
    canonical_call_tir_inputs,
    canonical_store_order,
    canonical_te_calls,
)


@T.prim_func(s_tir=True)
def _shape_func(H: T.Buffer((T.int64(8),), "int64")):  # type: ignore[no-untyped-def]
    H[T.int64(5)] = H[T.int64(0)] * T.int64(2)
    H[T.int64(3)] = H[T.int64(5)] + T.int64(1)  # reads slot 5: must stay after it
    H[T.int64(2)] = H[T.int64(1)] * H[T.int64(0)]
    H[T.int64(4)] = T.int64(7)


def _slots(stmts):  # type: ignore[no-untyped-def]
    return [int(s.indices[0]) for s in stmts]


def test_order_is_canonical_and_keeps_dependencies():
    stmts = list(_shape_func.body.seq)
    assert _slots(canonical_store_order(stmts)) == [2, 4, 5, 3]
    # Any dataflow-valid input order gives the same result.
    shuffled = [stmts[2], stmts[0], stmts[3], stmts[1]]
    assert _slots(canonical_store_order(shuffled)) == [2, 4, 5, 3]


def test_order_left_alone_when_not_provably_safe():
    stmts = list(_shape_func.body.seq)
    backwards = stmts[::-1]  # slot 3 reads slot 5 before it is written: not pure dataflow
    assert _slots(canonical_store_order(backwards)) == _slots(backwards)


@pytest.mark.slow
def test_two_builds_are_byte_identical(tiny_vlm, tmp_path):
    o = CompileOptions(sensitivity_samples=8, budget=3.0, target="llvm",
                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    outs = [tmp_path / "a", tmp_path / "b"]
    bars: dict[str, list[int]] = {}

    class Bar:  # records (total, updates) of every progress bar the passes open
        def __init__(self, total: int, desc: str) -> None:
            self.desc = desc
            bars[desc] = [total, 0]

        def update(self, n: int = 1) -> None:
            bars[self.desc][1] += n

        def close(self) -> None:
            pass

    for out in outs:
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], out, o, progress=Bar)
    # One bar per long step, each run to completion (calibration, sensitivity, GPTQ, build).
    assert {"collect routing", "sensitivity", "GPTQ expert projections", "kernel build"} <= set(
        bars
    )
    assert all(total == done for total, done in bars.values()), bars
    for name in ("model.so", "weights.safetensors", "manifest.json", "experts.safetensors",
                 "allocation.json", "model.sim.onnx"):  # fmt: skip
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def _cumsum_inputs():  # type: ignore[no-untyped-def]
    """A cumsum over ``[batch, past + new_]``: `batch` is read off the buffer, `past` and
    `new_` are not, so TVM appends them as scalar parameters in hash-set order."""
    batch, past, new = (tirx.Var(n, "int64") for n in ("batch", "past", "new_"))
    x = relax.Var("x", relax.TensorType((batch, past + new), "int64"))
    return relax.utils.gen_call_tir_inputs(topi.cumsum, x, 1, "int64", 0)


def _names(items) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(i.name) for i in items]


def test_scalar_parameters_sorted_with_their_arguments():
    func, args, _ = _cumsum_inputs()
    p = list(func.params)
    swapped = tirx.PrimFunc([p[0], p[2], p[1], p[3]], func.body, func.ret_type, func.attrs)
    results = [
        canonical_call_tir_inputs(func, list(args)),
        canonical_call_tir_inputs(swapped, [args[0], args[2], args[1]]),
    ]
    for f, a in results:
        assert _names(f.params) == ["x", "new_", "past", "out_buf"]
        assert _names(a) == ["x", "new_", "past"]  # each argument at its parameter's place
    # Either order gives one function, so BlockBuilder.add_func keeps one copy.
    tvm.ir.assert_structural_equal(results[0][0], results[1][0])


def test_canonical_te_calls_wraps_and_restores():
    original = relax.utils.gen_call_tir_inputs
    with canonical_te_calls():
        wrapped = relax.block_builder.gen_call_tir_inputs
        assert wrapped is not original
        with canonical_te_calls():  # nested: the outer wrapper stays
            assert relax.block_builder.gen_call_tir_inputs is wrapped
        assert relax.utils.gen_call_tir_inputs is wrapped
        func, args, _ = _cumsum_inputs()
        assert _names(func.params) == ["x", "new_", "past", "out_buf"]
        assert _names(args) == ["x", "new_", "past"]
    assert relax.utils.gen_call_tir_inputs is original
    assert relax.block_builder.gen_call_tir_inputs is original
