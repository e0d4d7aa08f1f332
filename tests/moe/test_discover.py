"""find-moe on every fixture form, the false friends, and the eager-experts error."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from modec.errors import ModelError
from modec.moe.discover import find_moe
from tests.moe.cases import CASES, Case


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_find_moe_reports_every_layer_and_its_form(case: Case, moe_model) -> None:  # type: ignore[no-untyped-def]
    model = ir.load(moe_model(case.name, case.exporter))
    regions = find_moe(model)
    assert len(regions) == 2
    for r in regions:
        assert (r.num_experts, r.top_k) == (8, 2)
        assert r.form == case.form
        assert r.gate_layout == case.layout
        assert r.router.scoring == case.scoring
        assert r.router.norm_topk_prob == case.norm
        assert r.router.softmax_after_topk == case.softmax_after_topk
        assert r.router.n_group == case.n_group
        assert r.router.topk_group == (2 if case.n_group > 1 else 1)
        assert r.router.routed_scaling_factor == pytest.approx(case.scale)
        assert (r.router.bias is not None) == case.router_bias
        assert (r.router.correction_bias is not None) == case.correction_bias
        assert r.experts.activation == case.activation
        assert (r.experts.down_bias is not None) == case.expert_bias
        assert (r.shared is not None) == case.shared
        if r.shared is not None:
            assert (r.shared.expert_gate is not None) == case.shared_gated
        e, i, h = r.experts.up.shape
        assert r.experts.down.shape == (e, h, i)
        assert r.router.weight.shape == (e, h)
        if case.layout != "none":
            assert r.experts.gate is not None and r.experts.gate.shape == (e, i, h)
        # the output is the hidden's shape and the region holds the router TopK
        assert r.topk_node in r.nodes
    assert regions[0].output is not regions[1].output


def test_gpt_oss_activation_constants(moe_model) -> None:  # type: ignore[no-untyped-def]
    (r, _) = find_moe(ir.load(moe_model("gptoss", "dynamo")))
    assert r.experts.alpha == pytest.approx(1.702)
    assert r.experts.limit == pytest.approx(7.0)


def test_stacked_weights_match_the_torch_parameters(moe_model) -> None:  # type: ignore[no-untyped-def]
    from tests.fixtures.models import build_hf

    torch_model = build_hf("mixtral")
    experts = torch_model.m.model.layers[1].mlp.experts  # type: ignore[union-attr,index]
    gate_up = experts.gate_up_proj.detach().numpy()
    down = experts.down_proj.detach().numpy()
    for exporter in ("dynamo", "torchscript"):
        r = find_moe(ir.load(moe_model("mixtral", exporter)))[1]
        i = r.experts.up.shape[1]
        np.testing.assert_array_equal(r.experts.gate, gate_up[:, :i])
        np.testing.assert_array_equal(r.experts.up, gate_up[:, i:])
        np.testing.assert_array_equal(r.experts.down, down)


def test_false_friends_are_not_moe(moe_model) -> None:  # type: ignore[no-untyped-def]
    model = ir.load(moe_model("false_friends", "dynamo"))
    ops = {n.op_type for n in model.graph}
    assert "TopK" in ops and "Softmax" in ops  # the look-alikes are really there
    assert find_moe(model) == []


def test_eager_experts_raise_with_reexport_hint(moe_model) -> None:  # type: ignore[no-untyped-def]
    model = ir.load(moe_model("mixtral_eager", "torchscript"))
    with pytest.raises(ModelError, match=r"moe\.0.*batched_mm"):
        find_moe(model)
