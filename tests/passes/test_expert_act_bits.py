"""``--expert-act-bits 8``: int8 expert inputs in the simulated model and in the artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modec.errors import BadInputError, UsageError

pytest.importorskip("tvm")

from modec.kernels import grouped_moe_a8
from tests.passes.conftest import compile_int8_pair, int8_agreement

needs_vnni = pytest.mark.skipif(
    not grouped_moe_a8.supports("llvm"), reason="this CPU has no AVX-512 VNNI and VBMI"
)


def _options(**kw: Any) -> Any:
    from modec.driver import CompileOptions

    return CompileOptions(method="uniform", quantizer="rtn", budget=3.0, target="llvm",
                          cache_dir=None, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def outputs(tiny_vlm: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same uniform RTN compile with float32 and with int8 expert inputs."""
    if not grouped_moe_a8.supports("llvm"):
        pytest.skip("this CPU has no AVX-512 VNNI and VBMI")
    return compile_int8_pair(tiny_vlm, tmp_path_factory.mktemp("act8"), "expert_act_bits")


@needs_vnni
def test_compiled_equals_simulated_and_differs_from_float_inputs(
    outputs: dict[int, Path], tiny_vlm: dict[str, Path]
) -> None:
    """The VNNI kernels compute what the simulated graph computes with the int8 rows; both
    move away from the float-input compile (same codes) by the rows' rounding only.

    Rounding to int8 is discontinuous: where an input lands within float noise of a half
    step, the artifact's and numpy's upstream roundings can send it to neighbouring codes, and
    that sample's logits then differ by ~1e-3 (docs/expert_activations.md). So most samples,
    not every one, must agree to float precision; a wrong kernel would move them all."""
    per_sample, diff = int8_agreement(outputs, tiny_vlm["eval"])
    assert np.median(per_sample) <= 1e-5 and (per_sample <= 1e-5).mean() >= 0.75
    assert per_sample.max() <= 0.05
    # Random weights: a few positions move more, the mean by about 1% of the logits'.
    assert 1e-5 < diff <= 0.02
    manifest = json.loads((outputs[8] / "manifest.json").read_text())
    names = {p["name"] for p in manifest["params"]}
    manifest0 = json.loads((outputs[0] / "manifest.json").read_text())
    assert names == {p["name"] for p in manifest0["params"]}  # the same packed experts
    report = json.loads((outputs[8] / "report.json").read_text())
    assert report["sections"]["quantize-experts"]["act_bits"] == 8


@needs_vnni
def test_the_simulated_model_carries_the_attribute(outputs: dict[int, Path]) -> None:
    import onnx_ir as ir

    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import MoEParams

    for bits, out in outputs.items():
        model = ir.load(out / "model.sim.onnx")
        nodes = [n for n in model.graph if is_moe_node(n)]
        assert nodes
        for node in nodes:
            p = MoEParams.from_node(node, experts=False)
            assert (p.act_bits, p.act_group_size) == ((8, 128) if bits else (0, 0))


def test_a_cpu_without_the_instructions_is_a_usage_error(tiny_vlm: dict[str, Path],
                                                         tmp_path: Path) -> None:  # fmt: skip
    from modec.driver import compile_model

    o = _options(expert_act_bits=8)
    o = type(o)(**{**o.__dict__, "target": '{"kind": "llvm", "mcpu": "skylake-avx512"}'})
    with pytest.raises(UsageError, match="VNNI and VBMI"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out", o)
    assert not (tmp_path / "out").exists()


def test_a_pipeline_text_asking_for_it_on_cuda_is_refused(
    tiny_vlm: dict[str, Path], tmp_path: Path
) -> None:
    """``--pipeline`` bypasses the options' preflight: the lowering refuses in one line,
    before the importer."""
    from modec.driver import compile_model

    o = _options()
    o = type(o)(**{**o.__dict__, "target": "cuda"})
    text = ("find-moe,canonicalize-moe,find-attention,collect-routing,"
            "allocate-bits{budget=3.0,method=uniform},quantize-experts{method=rtn,act_bits=8},"
            "lower-tvm{target=cuda}")  # fmt: skip
    with pytest.raises(BadInputError, match=r"^lower-tvm: --expert-act-bits 8 is for CPU"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out", o, pipeline=text)
    assert not (tmp_path / "out").exists()


def test_other_widths_are_refused() -> None:
    from modec.passes.quantize_experts import QuantizeExpertsPass

    with pytest.raises(BadInputError, match="act_bits=4"):
        QuantizeExpertsPass(act_bits=4)
