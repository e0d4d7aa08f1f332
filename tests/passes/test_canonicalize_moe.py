"""canonicalize-moe: Before / Expected graphs, one per MoE form and router variant.

Each test writes the graph an exporter produces (`tests.moe.graphs`) and, by hand, the graph
canonicalize-moe must turn it into: one ``ai.modec::MoE`` node in the layer's place, its
weights as new initializers in ``nn.Linear`` convention, the layer's nodes and the constants
only they read gone, every other node untouched. `test_expected_graph_computes_the_before_graph`
checks each Expected graph against onnxruntime on its Before graph, so the hand-written
Expected graphs are right and not a copy of what the code emits.

Tested through `modec.moe.canonical.canonicalize_moe` (the pass class is a thin wrapper).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from modec.moe.canonical import canonicalize_moe, is_moe_node
from modec.moe.discover import find_moe
from modec.moe.reference import MoEParams, moe_forward
from tests.graph_compare import assert_graph_equal
from tests.moe import graphs
from tests.moe.graphs import Before
from tests.moe.onnx_text import canonical_model, moe_attrs

# The canonical weights, by node input, named as canonicalize-moe names them.
ROUTED = '"modec.moe0.gate", "modec.moe0.up", "modec.moe0.down"'


def _layer(form: str, layout: str, original_output: str = "out") -> dict[str, str]:
    return {
        "modec.moe.form": form, "modec.moe.gate_layout": layout, "modec.moe.source": "moe.0",
        "modec.moe.layer": "0", "modec.moe.original_output": original_output,
    }  # fmt: skip


def _weights(before: Before) -> dict[str, np.ndarray]:
    return {f"modec.moe0.{k}": v for k, v in before.canonical.items()}


def expected_stacked_softmax(before: Before) -> ir.Model:
    return canonical_model(
        f"""
        expected (float[B, S, 8] x) => (float[B, S, 8] out) {{
            out = ai.modec.MoE <{moe_attrs(norm_topk_prob=1)}> (
                x, "modec.moe0.router_weight", "", {ROUTED})
        }}""",
        _weights(before),
        layers=[_layer("stacked_gather", "concatenated")],
    )


def expected_grouped_sigmoid(before: Before) -> ir.Model:
    attrs = moe_attrs(
        num_experts=8, scoring="sigmoid", norm_topk_prob=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5,
    )  # fmt: skip
    return canonical_model(
        f"""
        expected (float[B, S, 8] x) => (float[B, S, 8] out) {{
            out = ai.modec.MoE <{attrs}> (
                x, "modec.moe0.router_weight", "", {ROUTED}, "", "", "",
                "modec.moe0.correction_bias")
        }}""",
        _weights(before),
        layers=[_layer("stacked_gather", "concatenated")],
    )


def expected_shared_expert(before: Before) -> ir.Model:
    return canonical_model(
        f"""
        expected (float[B, S, 8] x) => (float[B, S, 8] out) {{
            out = ai.modec.MoE <{moe_attrs(has_shared=1, shared_gated=1)}> (
                x, "modec.moe0.router_weight", "", {ROUTED}, "", "", "", "",
                "modec.moe0.shared_gate", "modec.moe0.shared_up", "modec.moe0.shared_down",
                "modec.moe0.shared_expert_gate")
        }}""",
        _weights(before),
        layers=[_layer("stacked_gather", "concatenated")],
    )


def expected_dispatch(before: Before) -> ir.Model:
    return canonical_model(
        f"""
        expected (float[B, S, 8] x) => (float[B, S, 8] out) {{
            out = ai.modec.MoE <{moe_attrs(norm_topk_prob=1)}> (
                x, "modec.moe0.router_weight", "", {ROUTED})
        }}""",
        _weights(before),
        layers=[_layer("dispatch", "separate")],
    )


def expected_dense(before: Before) -> ir.Model:
    return canonical_model(
        f"""
        expected (float[B, S, 8] x) => (float[B, S, 8] out) {{
            out = ai.modec.MoE <{moe_attrs(norm_topk_prob=1)}> (
                x, "modec.moe0.router_weight", "modec.moe0.router_bias", {ROUTED})
        }}""",
        _weights(before),
        layers=[_layer("dense_add", "concatenated")],
    )


def expected_vlm(before: Before) -> ir.Model:
    # The vision tower, the sort, the residual and the head stay as they were; the MoE output
    # has the hidden input's type (float, shape unknown here); "one" is still read outside.
    inits = before.model.graph.initializers
    weights = {n: inits[n].const_value.numpy() for n in ("conv_w", "head", "one", "eight")}  # type: ignore[union-attr]
    return canonical_model(
        f"""
        expected (float[B, S, 8] tokens, float[B, 3, 5] pixels) => (float[B, S, 8] head_out,
                                                                   int64[B, 1, 8] order)
        <float[] moe> {{
            feat = Conv <kernel_shape = [1]> (pixels, conv_w)
            feat_t = Transpose <perm = [0, 2, 1]> (feat)
            feat_r = Relu(feat_t)
            vis = ReduceMean <keepdims = 1> (feat_r, one)
            x = Add(tokens, vis)
            sorted_v, order = TopK <axis = -1, largest = 0> (vis, eight)
            moe = ai.modec.MoE <{moe_attrs(norm_topk_prob=1)}> (
                x, "modec.moe0.router_weight", "", {ROUTED})
            res = Add(x, moe)
            head_out = MatMul(res, head)
        }}""",
        weights | _weights(before),
        layers=[_layer("stacked_gather", "concatenated", original_output="moe")],
    )


CASES: dict[str, tuple[Callable[[], Before], Callable[[Before], ir.Model]]] = {
    "stacked-softmax-renorm": (graphs.stacked_softmax, expected_stacked_softmax),
    "stacked-sigmoid-grouped-correction": (graphs.grouped_sigmoid, expected_grouped_sigmoid),
    "stacked-sigmoid-gated-shared-expert": (graphs.shared_expert, expected_shared_expert),
    "dispatch": (graphs.dispatch, expected_dispatch),
    "dense-sparse-gate-router-bias": (graphs.dense, expected_dense),
    "vision-tower-untouched": (graphs.vlm, expected_vlm),
}


@pytest.mark.parametrize("case", CASES)
def test_canonicalize_moe(case: str) -> None:
    build, expected = CASES[case]
    before = build()
    model = before.model
    nodes = canonicalize_moe(model, find_moe(model))
    assert_graph_equal(model, expected(build()))
    assert nodes == [n for n in model.graph if is_moe_node(n)]


@pytest.mark.parametrize("case", CASES)
def test_second_run_changes_nothing(case: str) -> None:
    build, expected = CASES[case]
    model = expected(build())
    assert canonicalize_moe(model) == []
    assert_graph_equal(model, expected(build()))


def _run(
    model: ir.Model, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]
) -> list[np.ndarray]:
    """onnxruntime on ``model``, reading the named values (graph outputs or not)."""
    proto = ir.to_proto(model)
    known = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in known:
            proto.graph.output.add(name=name)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(list(outputs), feeds)


@pytest.mark.parametrize("case", CASES)
def test_expected_graph_computes_the_before_graph(case: str) -> None:
    build, expected = CASES[case]
    before = build()
    hidden, want = _run(before.model, before.feeds, before.moe_io)
    (node,) = [n for n in expected(before).graph if is_moe_node(n)]
    got = moe_forward(MoEParams.from_node(node), hidden).output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
