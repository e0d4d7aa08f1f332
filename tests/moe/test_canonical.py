"""canonicalize-moe: one ai.modec::MoE node per layer, serializable, weights marked."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from modec.moe.canonical import QUANTIZE_KEY, canonicalize_moe, is_moe_node
from modec.moe.discover import find_moe
from modec.moe.reference import MoEParams


@pytest.mark.parametrize(
    ("name", "exporter"), [("qwen2moe", "dynamo"), ("cond", "dynamo"), ("gptoss", "torchscript")]
)
def test_one_node_per_layer_and_roundtrip(name: str, exporter: str, moe_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = ir.load(moe_model(name, exporter))
    before = len(list(model.graph))
    regions = find_moe(model)
    layer_nodes = {n for r in regions for n in r.nodes}
    nodes = canonicalize_moe(model, regions)
    assert len(nodes) == 2
    graph_nodes = list(model.graph)
    assert sum(is_moe_node(n) for n in graph_nodes) == 2
    # Every node of both layers is gone: the router TopKs, the If per expert, the expert
    # GatherNDs (a GatherND outside the layers, e.g. in the attention mask, stays).
    assert not layer_nodes & set(graph_nodes)
    assert not any(n.op_type in ("TopK", "If") and n.domain == "" for n in graph_nodes)
    assert len(graph_nodes) < before
    assert model.opset_imports["ai.modec"] == 1
    for n in nodes:
        p = MoEParams.from_node(n)
        assert p.num_experts == 8 and p.top_k == 2
        router = n.inputs[1]
        assert router is not None and router.metadata_props[QUANTIZE_KEY] == "never"
        assert n.inputs[4] is not None and n.inputs[4].metadata_props[QUANTIZE_KEY] == "expert"
        assert n.metadata_props["modec.moe.form"]
    path = tmp_path / "canon.onnx"
    ir.save(model, path)
    proto = onnx.load(path)
    assert sum(n.domain == "ai.modec" for n in proto.graph.node) == 2
    again = ir.load(path)
    assert sum(is_moe_node(n) for n in again.graph) == 2
