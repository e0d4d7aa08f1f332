"""find-moe on hand-written graphs: what it reports for each form, that it reads only, what
it must not take for a router, and the error for an export that lost experts.

Tested through `modec.moe.discover.find_moe` (the pass class is a thin wrapper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

from modec.errors import ModelError
from modec.moe.discover import FindMoEOptions, MoERegion, find_moe
from tests.graph_compare import assert_graph_equal
from tests.moe import graphs
from tests.moe.graphs import Before
from tests.moe.onnx_text import onnx_model


@dataclass(frozen=True)
class Want:
    """What find-moe must report for one Before graph (the weights: `Before.canonical`)."""

    form: str
    layout: str
    router_inits: frozenset[str]
    num_experts: int = 4
    scoring: str = "softmax"
    norm: bool = True
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    # the values outside the layer; None: every node of the graph is in it
    outside: frozenset[str] | None = None


CASES: dict[str, tuple[Callable[[], Before], Want]] = {
    "stacked-softmax-renorm": (
        graphs.stacked_softmax,
        Want("stacked_gather", "concatenated", frozenset({"router"})),
    ),
    "stacked-sigmoid-grouped-correction": (
        graphs.grouped_sigmoid,
        Want(
            "stacked_gather",
            "concatenated",
            frozenset({"router", "correction"}),
            num_experts=8,
            scoring="sigmoid",
            n_group=4,
            topk_group=2,
            scale=2.5,
        ),
    ),
    "stacked-sigmoid-gated-shared-expert": (
        graphs.shared_expert,
        Want("stacked_gather", "concatenated", frozenset({"router"}), norm=False),
    ),
    "dispatch": (graphs.dispatch, Want("dispatch", "separate", frozenset({"router"}))),
    "dense-sparse-gate-router-bias": (
        graphs.dense,
        Want("dense_add", "concatenated", frozenset({"router", "router_b"})),
    ),
    "vision-tower-untouched": (
        graphs.vlm,
        Want(
            "stacked_gather",
            "concatenated",
            frozenset({"router"}),
            outside=frozenset(
                {"feat", "feat_t", "feat_r", "vis", "x", "sorted_v", "res", "head_out"}
            ),
        ),
    ),
}


def _value(model: ir.Model, name: str) -> ir.Value:
    values = [*model.graph.inputs, *(v for n in model.graph for v in n.outputs)]
    (v,) = [v for v in values if v.name == name]
    return v


def _check_arrays(r: MoERegion, canonical: dict[str, np.ndarray]) -> None:
    x, rt = r.experts, r.router
    np.testing.assert_array_equal(rt.weight, canonical["router_weight"])
    for got, key in (
        (rt.bias, "router_bias"), (rt.correction_bias, "correction_bias"), (x.gate, "gate"),
        (x.up, "up"), (x.down, "down"),
    ):  # fmt: skip
        if key in canonical:
            np.testing.assert_array_equal(got, canonical[key], err_msg=key)
        else:
            assert got is None, key
    assert x.gate_bias is None and x.up_bias is None and x.down_bias is None
    if "shared_up" not in canonical:
        assert r.shared is None
        return
    assert r.shared is not None
    s = r.shared.weights
    for got, key in ((s.gate, "shared_gate"), (s.up, "shared_up"), (s.down, "shared_down")):
        np.testing.assert_array_equal(got, canonical[key][None], err_msg=key)  # expert axis 1
    np.testing.assert_array_equal(r.shared.expert_gate, canonical["shared_expert_gate"])
    assert s.activation == "silu"


@pytest.mark.parametrize("case", CASES)
def test_find_moe_reports_the_layer(case: str) -> None:
    build, want = CASES[case]
    before = build()
    model = before.model
    (r,) = find_moe(model)
    assert (r.index, r.name) == (0, "moe.0")
    assert (r.form, r.gate_layout) == (want.form, want.layout)
    assert (r.num_experts, r.top_k) == (want.num_experts, 2)
    assert r.hidden is _value(model, before.moe_io[0])
    assert r.output is _value(model, before.moe_io[1])
    assert r.topk_node.outputs[1].name == "top_i"  # the TopK that picks experts, not groups
    outside = want.outside or frozenset()
    assert r.nodes == tuple(n for n in model.graph if n.outputs[0].name not in outside)
    rt = r.router
    assert (rt.scoring, rt.norm_topk_prob, rt.softmax_after_topk) == (
        want.scoring,
        want.norm,
        False,
    )
    assert (rt.n_group, rt.topk_group) == (want.n_group, want.topk_group)
    assert rt.routed_scaling_factor == pytest.approx(want.scale)
    assert set(rt.initializers) == want.router_inits
    assert r.experts.activation == "silu" and r.experts.gated
    _check_arrays(r, before.canonical)


@pytest.mark.parametrize("case", CASES)
def test_find_moe_does_not_modify_the_model(case: str) -> None:
    build, _ = CASES[case]
    model = build().model
    find_moe(model)
    assert_graph_equal(model, build().model)


def test_look_alikes_are_not_routers() -> None:
    model = onnx_model(
        """
        look_alikes (float[B, S, 8] x) => (float[B, S, 4] sorted_v, float[B, S, 4] dyn_v,
                                           float[B, S, 4] all_v) {
            logits = MatMul(x, w)
            probs = Softmax <axis = -1> (logits)
            sorted_v, order = TopK <axis = -1, largest = 0> (probs, four)
            seq = Shape <start = 1, end = 2> (x)
            dyn_v, dyn_i = TopK <axis = -1> (probs, seq)
            all_v, all_i = TopK <axis = -1> (probs, four)
        }""",
        {"w": np.ones((8, 4), np.float32), "four": np.array([4], np.int64)},
    )
    # a sort (largest=0), a data-dependent k, and a k that keeps every "expert"
    assert find_moe(model) == []


def test_min_experts_option() -> None:
    assert find_moe(graphs.stacked_softmax().model, FindMoEOptions(min_experts=5)) == []
    assert len(find_moe(graphs.stacked_softmax().model, FindMoEOptions(min_experts=4))) == 1


def test_missing_expert_raises_with_reexport_hint() -> None:
    model = graphs.dispatch(experts=3).model
    lost = r"moe\.0 \(dispatch\): found experts \[0, 1, 2\] of 4.*batched_mm"
    with pytest.raises(ModelError, match=lost):
        find_moe(model)
