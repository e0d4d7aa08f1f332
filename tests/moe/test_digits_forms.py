"""The bundled model's architecture (digits-vlm) in every expert form and exporter.

find-moe finds exactly its MoE layers, canonicalize-moe + the executor reproduce onnxruntime
on the original graph (other batch sizes and lengths than the export sample), and
find-attention locates the attention probabilities of every layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from modec import data
from modec.executor import Executor
from modec.moe.attention import find_attention
from modec.moe.canonical import canonicalize_moe
from modec.moe.discover import find_moe
from tools.digits_vlm.export import export
from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

FORMS = [  # (expert form, exporter, what find-moe reports)
    ("stacked", "dynamo", "stacked_gather"),
    ("stacked", "torchscript", "stacked_gather"),  # squeeze(1) becomes If(Squeeze, Identity)
    ("dispatch", "torchscript", "dispatch"),
    ("dense", "torchscript", "dense_add"),
]


@pytest.fixture(scope="module")
def tiny_model() -> DigitsVLM:
    torch.manual_seed(0)
    cfg = DigitsVLMConfig(hidden=32, num_layers=2, num_experts=4, intermediate=32,
                          vision_dim=16, vision_layers=1)  # fmt: skip
    return DigitsVLM(cfg).eval()


@pytest.mark.parametrize(
    ("form", "exporter", "found"), FORMS, ids=[f"{a}-{b}" for a, b, _ in FORMS]
)
def test_form(tiny_model, tiny_vlm, tmp_path, form, exporter, found) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"{form}-{exporter}.onnx"
    export(tiny_model, path, form=form, exporter=exporter)
    model = ir.load(path)
    regions = find_moe(model)
    assert [(r.num_experts, r.top_k, r.form) for r in regions] == [(4, 2, found)] * 2
    assert regions[0].experts.activation == "silu"
    np.testing.assert_array_equal(
        regions[1].experts.down, tiny_model.layers[1].mlp.down_proj.detach().numpy()
    )
    canonicalize_moe(model)
    taps = find_attention(model)
    assert len(taps) == 2 and all(t is not None and t.kind == "probs" for t in taps)
    ex = Executor(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ds = data.load(tiny_vlm["calib"])
    names = [i.name for i in sess.get_inputs()]
    for size in (5, 1):
        _, feeds = next(ds.subset(np.arange(3, 3 + size)).batches(size))
        feeds = {k: v for k, v in feeds.items() if k in names}
        (want,) = sess.run(None, feeds)
        got = ex.run(feeds).outputs[ex.output_names[0]]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 1e-5, (size, rel)
