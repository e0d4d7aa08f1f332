"""A fused ``Attention`` op (SDPA exported at opset 23, unoptimized dynamo graph).

find-attention records Q and K instead of probabilities; find-moe still reads the experts
(the unoptimized graph splits gate_up with SplitToSequence and adds identity Transposes);
the executor matches onnxruntime; collect-routing falls back to the hidden-state score and
says so in its report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from modec import data
from modec.data import TEXT, VISION
from modec.executor import Executor
from modec.moe.attention import find_attention
from modec.moe.canonical import canonicalize_moe
from modec.moe.discover import find_moe
from tests.fixtures.models import build_hf


def test_fused_attention_graph(moe_model) -> None:  # type: ignore[no-untyped-def]
    path = moe_model("mixtral_sdpa", "dynamo")
    model = ir.load(path)
    assert sum(n.op_type == "Attention" for n in model.graph) == 2
    regions = find_moe(model)
    found = [(r.num_experts, r.top_k, r.gate_layout) for r in regions]
    assert found == [(8, 2, "concatenated")] * 2
    gate_up = build_hf("mixtral").m.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()  # type: ignore[union-attr,index]
    np.testing.assert_array_equal(regions[1].experts.gate, gate_up[:, :64])
    np.testing.assert_array_equal(regions[1].experts.up, gate_up[:, 64:])

    canonicalize_moe(model)
    taps = find_attention(model)
    assert [(t.kind, t.node.op_type) for t in taps] == [("qk", "Attention")] * 2  # type: ignore[union-attr]
    assert all(t.q is not None and t.k is not None for t in taps)  # type: ignore[union-attr]
    ex = Executor(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (3, 12)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    (want,) = sess.run(["logits"], feeds)
    got = ex.run(feeds).outputs["logits"]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_fused_attention_collect_routing_falls_back(moe_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The pipeline's import stays here so that the graph checks above do not depend on it.
    from modec.driver import load_inputs
    from modec.facts import KeyVision, RoutingStats
    from modec.pipeline import Pipeline
    from modec.pipelines import CompileOptions

    path = moe_model("mixtral_sdpa", "dynamo")
    rng = np.random.default_rng(0)
    # Calibration data: 8 "image" tokens then 4 question tokens per sample.
    modality = np.array([[VISION] * 8 + [TEXT] * 4] * 6, dtype=np.int8)
    ids = rng.integers(0, 40, modality.shape).astype(np.int64)
    calib = tmp_path / "calib.npz"
    data.save(calib, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, modality=modality)
    model, ctx = load_inputs(path, calib, CompileOptions())
    text = "find-moe,canonicalize-moe,find-attention,collect-routing,select-key-vision"
    model, _ = Pipeline.parse(text).run(model, ctx)
    stats = ctx.facts.get(RoutingStats)
    assert stats.score_source == ("hidden", "hidden")
    fallbacks = ctx.report["collect-routing"]["attention_fallbacks"]
    assert [f["layer"] for f in fallbacks] == [0, 1]
    assert all("fused Attention" in f["reason"] for f in fallbacks)
    key = ctx.facts.get(KeyVision)
    assert key.count_key[0].sum() == 2 * 6 * 2  # ⌈0.2·8⌉ = 2 key tokens per sample, top-2
