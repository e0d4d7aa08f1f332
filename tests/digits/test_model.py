"""digits-vlm: the three MoE forms agree, and the ONNX export matches PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tools.digits_vlm import export as dv_export
from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

SMALL = DigitsVLMConfig(hidden=32, num_layers=2, num_experts=4, intermediate=16, vision_dim=16,
                        vision_layers=1)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DigitsVLM(SMALL).eval()


def test_moe_forms_agree(model):
    feeds = {k: torch.from_numpy(v) for k, v in dv_export.sample_batch(4, seed=1).items()}
    with torch.no_grad():
        ref = model(**feeds)
        for form in ("stacked", "dispatch", "dense"):
            model.set_moe_form(form)
            torch.testing.assert_close(model(**feeds), ref, rtol=1e-5, atol=1e-5)
    model.set_moe_form("train")


def test_parameter_counts(model):
    counts = model.parameter_counts()
    assert counts["experts"] == 2 * 4 * 3 * 32 * 16
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("form", "exporter"), [("stacked", "dynamo"), ("stacked", "torchscript"),
                                                ("dispatch", "torchscript"),
                                                ("dense", "torchscript")])  # fmt: skip
def test_export_matches_torch_on_other_shapes(model, tmp_path, form, exporter):
    path = tmp_path / f"{form}.onnx"
    proto = dv_export.export(model, path, form=form, exporter=exporter)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    worst = dv_export.check_against_torch(model, path, atol=1e-4)
    assert worst < 1e-4
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and "Softmax" in ops
    if form == "stacked":
        assert ops & {"Gather", "GatherND"}
    if form == "dispatch":
        assert "NonZero" in ops
    assert np.isfinite(worst)
