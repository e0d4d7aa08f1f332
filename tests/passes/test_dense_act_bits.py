"""``--dense-act-bits 8``: int8 inputs of the quantized dense matmuls, simulated and compiled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modec.errors import BadInputError, UsageError
from modec.facts import QuantizedDense
from modec.numerics.activations import fake_quantize

pytest.importorskip("tvm")

from modec.kernels import grouped_moe_a8
from tests.passes.conftest import compile_int8_pair, int8_agreement

needs_vnni = pytest.mark.skipif(
    not grouped_moe_a8.supports("llvm"), reason="this CPU has no AVX-512 VNNI and VBMI"
)


@pytest.mark.parametrize(("k", "group", "opset"), [(256, 64, 18), (200, 64, 17), (96, 128, 20)])
def test_the_onnx_rounding_is_the_numpy_reference_exactly(k: int, group: int, opset: int) -> None:
    """`int8_rows` in onnxruntime equals `fake_quantize` bit for bit: padding to whole
    groups, an all-zero group, an outlier, ReduceMax's axes as attribute or input."""
    import onnx_ir as ir
    import onnxruntime as ort

    from modec.method.dense import int8_rows

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", "s", k]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="g")
    out, nodes = int8_rows(graph, x, k, group, opset)
    graph.outputs.append(out)
    assert len(nodes) == len(list(graph)) and all(n.name.startswith("modec.int8/x/") for n in nodes)
    proto = ir.to_proto(ir.Model(graph, ir_version=8 if opset < 18 else 9))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(k)
    v = (rng.standard_normal((2, 5, k)) * rng.uniform(0.01, 30, (2, 5, 1))).astype(np.float32)
    v[0, 1, :group] = 0.0
    v[1, 3, 7] = 1e4
    (got,) = sess.run(None, {"x": v})
    want = fake_quantize(v, group)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, v)


def test_the_pass_rounds_each_activation_once(analysed: Any) -> None:
    """One rounding per distinct activation (q, k, v share theirs): per layer the attention
    input and the output projection's input, and the head's input; every quantized matmul
    reads a rounded value, and the fact records what the lowering replaces."""
    model, ctx = analysed("quantize-dense{width=4,act_bits=8}")
    dense = ctx.facts.get(QuantizedDense)
    assert dense.act_bits == 8
    assert len(dense.act_inputs) == 2 * 2 + 1
    produced = {n.outputs[0].name: n for n in model.graph}
    names = {n.name for n in model.graph}
    assert dense.act_nodes <= names
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    rounded = [m for m in matmuls if m.inputs[0].name in dense.act_inputs]
    assert len(rounded) == len(dense.weights)
    for rounded_name, source in dense.act_inputs.items():
        assert produced[rounded_name].name in dense.act_nodes
        assert source in produced or source in {v.name for v in model.graph.inputs}


def _options(**kw: Any) -> Any:
    from modec.driver import CompileOptions

    return CompileOptions(method="uniform", quantizer="rtn", budget=3.0, target="llvm",
                          cache_dir=None, dense_bits=4, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def outputs(tiny_vlm: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same dense 4-bit compile with float32 and with int8 dense inputs."""
    if not grouped_moe_a8.supports("llvm"):
        pytest.skip("this CPU has no AVX-512 VNNI and VBMI")
    return compile_int8_pair(
        tiny_vlm, tmp_path_factory.mktemp("dense8"), "dense_act_bits", dense_bits=4
    )


@needs_vnni
def test_compiled_equals_simulated_and_differs_from_float_inputs(
    outputs: dict[int, Path], tiny_vlm: dict[str, Path]
) -> None:
    """The int8 dense kernels compute what the simulated graph computes with its ONNX
    rounding; both move away from the float-input compile (same codes).

    As for the experts' int8 inputs (tests/passes/test_expert_act_bits.py), an activation
    within float noise of a half step can round to neighbouring codes in the artifact and in
    onnxruntime, so most samples, not every one, agree to float precision; a wrong kernel or
    a missing rounding would move them all."""
    per_sample, diff = int8_agreement(outputs, tiny_vlm["eval"])
    assert np.median(per_sample) <= 1e-5 and (per_sample <= 1e-5).mean() >= 0.75
    assert per_sample.max() <= 0.05
    assert 1e-5 < diff <= 0.05
    manifest = json.loads((outputs[8] / "manifest.json").read_text())
    manifest0 = json.loads((outputs[0] / "manifest.json").read_text())
    assert {p["name"] for p in manifest["params"]} == {p["name"] for p in manifest0["params"]}
    assert manifest["sections"]["dense"]["act_bits"] == 8
    assert manifest0["sections"]["dense"]["act_bits"] == 0
    report = json.loads((outputs[8] / "report.json").read_text())
    assert report["sections"]["quantize-dense"]["act_bits"] == 8
    assert report["sections"]["quantize-dense"]["int8_inputs"] == 5
    assert "int8 per group (--dense-act-bits 8)" in (outputs[8] / "report.html").read_text()
    assert "--dense-act-bits" not in (outputs[0] / "report.html").read_text()


def test_without_dense_bits_it_is_a_usage_error(tiny_vlm: dict[str, Path], tmp_path: Path) -> None:
    from modec.driver import compile_model

    o = _options(dense_act_bits=8)
    o = type(o)(**{**o.__dict__, "dense_bits": 0})
    with pytest.raises(UsageError, match="add --dense-bits"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out", o)
    assert not (tmp_path / "out").exists()


def test_a_cpu_without_the_instructions_is_a_usage_error(tiny_vlm: dict[str, Path],
                                                         tmp_path: Path) -> None:  # fmt: skip
    from modec.driver import compile_model

    o = _options(dense_act_bits=8)
    o = type(o)(**{**o.__dict__, "target": '{"kind": "llvm", "mcpu": "skylake-avx512"}'})
    with pytest.raises(UsageError, match="--dense-act-bits 8 needs a CPU with AVX-512 VNNI"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out", o)
    assert not (tmp_path / "out").exists()


def test_a_pipeline_text_asking_for_it_on_cuda_is_refused(
    tiny_vlm: dict[str, Path], tmp_path: Path
) -> None:
    """``--pipeline`` bypasses the options' preflight: the lowering refuses in one line."""
    from modec.driver import compile_model

    o = _options()
    o = type(o)(**{**o.__dict__, "dense_bits": 0, "target": "cuda"})
    text = ("find-moe,canonicalize-moe,find-attention,collect-routing,"
            "allocate-bits{budget=3.0,method=uniform},"
            "quantize-experts{method=rtn},quantize-dense{width=4,act_bits=8},"
            "lower-tvm{target=cuda,quantized_dense=true}")  # fmt: skip
    with pytest.raises(BadInputError, match=r"^lower-tvm: --dense-act-bits 8 is for CPU targets"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out", o, pipeline=text)
    assert not (tmp_path / "out").exists()


def test_other_widths_are_refused() -> None:
    from modec.passes.quantize_dense import QuantizeDensePass

    with pytest.raises(BadInputError, match="act_bits=4"):
        QuantizeDensePass(width=4, act_bits=4)
