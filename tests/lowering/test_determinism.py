"""Byte-identical artifacts: the canonical shape-function order, and two real builds."""

from __future__ import annotations

import pytest
from tvm.script import tirx as T

from modec.driver import CompileOptions, compile_model
from modec.lowering.determinism import canonical_store_order


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
