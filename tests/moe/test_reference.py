"""The numpy reference MoE against a plain per-token loop, over every routing variant."""

from __future__ import annotations

import numpy as np
import pytest

from modec.moe.reference import MoEParams, Replacement, moe_forward, route


def _params(**kw: object) -> MoEParams:
    rng = np.random.default_rng(0)
    e, h, i = 6, 8, 5
    base = dict(
        num_experts=e, top_k=2, router_weight=rng.normal(size=(e, h)).astype(np.float32),
        gate=rng.normal(size=(e, i, h)).astype(np.float32),
        up=rng.normal(size=(e, i, h)).astype(np.float32),
        down=rng.normal(size=(e, h, i)).astype(np.float32),
    )  # fmt: skip
    base.update(kw)
    return MoEParams(**base)  # type: ignore[arg-type]


def _loop(p: MoEParams, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    r = route(p, x)
    for t in range(x.shape[0]):
        for s in range(p.top_k):
            e = r.experts[t, s]
            g = x[t] @ p.gate[e].T  # type: ignore[index]
            u = x[t] @ p.up[e].T
            out[t] += r.weights[t, s] * ((g / (1 + np.exp(-g)) * u) @ p.down[e].T)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"norm_topk_prob": True},
        {"softmax_after_topk": True},
        {
            "scoring": "sigmoid",
            "n_group": 3,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "correction_bias": np.linspace(-0.3, 0.3, 6).astype(np.float32),
        },
    ],
)
def test_reference_matches_loop(kw: dict[str, object]) -> None:
    p = _params(**kw)
    x = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
    np.testing.assert_allclose(moe_forward(p, x).output, _loop(p, x), rtol=1e-4, atol=1e-5)


def test_softmax_after_topk_equals_renormalised_softmax() -> None:
    x = np.random.default_rng(2).normal(size=(9, 8)).astype(np.float32)
    a = route(_params(softmax_after_topk=True), x)
    b = route(_params(norm_topk_prob=True), x)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5)


def test_group_limited_routing_picks_only_kept_groups() -> None:
    p = _params(scoring="sigmoid", n_group=3, topk_group=1)
    r = route(p, np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32))
    groups = r.experts // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_replacement_and_collected_inputs() -> None:
    p = _params()
    x = np.random.default_rng(4).normal(size=(10, 8)).astype(np.float32)
    base = moe_forward(p, x, collect_inputs=True)
    e = int(base.routing.experts[0, 0])
    tok, rows = base.expert_inputs[e]
    np.testing.assert_array_equal(rows, x[tok])
    mask = np.zeros(10, dtype=bool)
    mask[tok[0]] = True
    out = moe_forward(p, x, replacement=Replacement(e, mask, down=np.zeros_like(p.down[e]))).output
    diff = np.abs(out - base.output).max(-1)
    assert diff[tok[0]] > 0
    assert np.delete(diff, tok[0]).max() == 0
