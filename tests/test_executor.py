"""The executor on canonical graphs against onnxruntime on the original graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from modec.executor import Executor
from modec.moe.attention import find_attention
from modec.moe.canonical import canonicalize_moe
from modec.moe.reference import Replacement
from tests.moe.cases import CASES, Case


def _feeds(model: ir.Model, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, (batch, seq)).astype(np.int64)
    feeds = {"input_ids": ids}
    if any(v.name == "attention_mask" for v in model.graph.inputs):
        feeds["attention_mask"] = np.ones_like(ids)
    return feeds


@pytest.fixture(scope="module")
def canonical(moe_model):  # type: ignore[no-untyped-def]
    cache: dict[str, tuple[str, ir.Model, Executor]] = {}

    def get(name: str, exporter: str) -> tuple[str, ir.Model, Executor]:
        key = f"{name}-{exporter}"
        if key not in cache:
            path = str(moe_model(name, exporter))
            model = ir.load(path)
            canonicalize_moe(model)
            taps = [
                t.probs.name for t in find_attention(model) if t is not None and t.probs is not None
            ]
            cache[key] = (path, model, Executor(model, taps=taps))  # type: ignore[misc]
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_executor_matches_onnxruntime_on_the_original(case: Case, canonical) -> None:  # type: ignore[no-untyped-def]
    path, model, ex = canonical(case.name, case.exporter)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, seq in ((3, 9), (1, 4)):  # export sample was [2, 6]
        feeds = _feeds(model, batch, seq, seed=batch * 10 + seq)
        (want,) = sess.run(["logits"], feeds)
        got = ex.run(feeds).outputs["logits"]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 1e-5, rel


def test_routing_expert_inputs_and_taps(canonical) -> None:  # type: ignore[no-untyped-def]
    _, model, ex = canonical("mixtral", "dynamo")
    feeds = _feeds(model, 2, 7, seed=3)
    res = ex.run(feeds, record_routing=True, collect_expert_inputs=True)
    assert sorted(res.routing) == [0, 1]
    r = res.routing[0]
    assert r.experts.shape == (14, 2) and r.weights.shape == (14, 2) and r.scores.shape == (14, 8)
    np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-5)  # Mixtral renormalises
    counts = sum(len(tok) for tok, _ in res.expert_inputs[0].values())
    assert counts == 14 * 2
    assert len(res.taps) == 2
    probs = next(iter(res.taps.values()))
    assert probs.shape == (2, 4, 7, 7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_replacement_touches_only_chosen_tokens_and_cache_rerun(canonical) -> None:  # type: ignore[no-untyped-def]
    _, model, ex = canonical("qwen2moe", "dynamo")
    feeds = _feeds(model, 2, 6, seed=5)
    base = ex.run(feeds, record_routing=True, cache_layer=1)
    assert base.cache is not None
    again = ex.run_from(base.cache)
    np.testing.assert_allclose(
        again.outputs["logits"], base.outputs["logits"], rtol=1e-6, atol=1e-6
    )
    r = base.routing[1]
    e = int(r.experts[0, 0])
    users = np.nonzero((r.experts == e).any(-1))[0]
    mask = np.zeros(12, dtype=bool)
    mask[users[0]] = True
    p = ex.params[1]
    rep = Replacement(e, mask, up=np.zeros_like(p.up[e]))
    changed = ex.run_from(base.cache, replace={1: rep}).outputs["logits"].reshape(12, -1)
    diff = np.abs(changed - base.outputs["logits"].reshape(12, -1)).max(-1)
    assert diff[users[0]] > 1e-4
    # causal attention: layer 1's MoE change at token t only moves logits of token t
    others = np.delete(np.arange(12), users[0])
    assert diff[others].max() < 1e-6
