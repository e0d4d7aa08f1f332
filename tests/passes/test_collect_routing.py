"""collect-routing on the tiny digits-vlm: counts, frequencies, key scores, cache.

The key tokens themselves are chosen by select-key-vision (tests/passes/test_select_key_vision.py
checks them against a recount); here the fixture runs both so that the totals add up.
"""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import PAD, TEXT, VISION
from modec.errors import BadInputError
from modec.executor import Executor
from modec.facts import Calibration, KeyVision, RoutingStats
from modec.method.key_vision import (
    attention_key_scores,
    hidden_key_scores,
    key_count,
    query_mask,
    select_key_tokens,
)


@pytest.fixture(scope="module")
def routed(analysed):
    return analysed("collect-routing,select-key-vision")


def test_counts_add_up(routed):
    model, ctx = routed
    stats = ctx.facts.get(RoutingStats)
    kv = ctx.facts.get(KeyVision)
    ds = ctx.facts.get(Calibration).data
    ex = Executor(model)
    n_text = int((ds.modality == TEXT).sum())
    n_vis = int((ds.modality == VISION).sum())
    assert stats.num_layers == len(ex.params) == 2
    assert stats.samples == len(ds)
    for layer, p in enumerate(ex.params):
        k = p.top_k
        assert stats.count_text[layer].sum() == k * n_text
        assert stats.count_vision[layer].sum() == k * n_vis
        np.testing.assert_array_equal(
            stats.count_all[layer], stats.count_text[layer] + stats.count_vision[layer]
        )
        np.testing.assert_array_equal(
            stats.count_vision[layer], kv.count_key[layer] + kv.count_redundant[layer]
        )
        # Key tokens: ⌈20%⌉ of every sample's vision tokens, each routed to k experts.
        per_sample = [key_count(int((m == VISION).sum()), 0.2) for m in ds.modality]
        assert kv.count_key[layer].sum() == k * sum(per_sample)
        for f in (stats.f_text, stats.f_vision, kv.f_key, stats.f_global):
            assert f[layer].sum() == pytest.approx(1.0)
            assert (f[layer] >= 0).all()
        assert stats.score_source[layer] == "attention"


def test_counts_match_an_independent_run(routed):
    """Text counts recomputed from the executor's routing over the whole calibration set."""
    model, ctx = routed
    stats = ctx.facts.get(RoutingStats)
    ds = ctx.facts.get(Calibration).data
    ex = Executor(model)
    want = [np.zeros(p.num_experts, np.int64) for p in ex.params]
    for idx, feeds in ds.batches(7):
        mod = ds.trimmed_modality(idx).ravel()
        res = ex.run(feeds, record_routing=True)
        for layer, r in res.routing.items():
            want[layer] += np.bincount(r.experts[mod == TEXT].ravel(), minlength=len(want[layer]))
    for layer in range(stats.num_layers):
        np.testing.assert_array_equal(stats.count_text[layer], want[layer])


def test_report_section(routed):
    _, ctx = routed
    sec = ctx.report["collect-routing"]
    # The key ratio moved to select-key-vision with the key-token choice.
    assert ctx.report["select-key-vision"]["key_ratio"] == 0.2
    assert sec["attention_fallbacks"] == []
    assert len(sec["f_text"]) == 2 and len(sec["f_text"][0]) == 4
    assert sec["coverage"]["min_tokens"] == 16
    assert ctx.stats["collect-routing"]["samples"] == len(ctx.facts.get(Calibration).data)


def test_key_scores_follow_the_question():
    # one sample: [text, vision x4, text, text(query)], two heads
    mod = np.array([[TEXT, VISION, VISION, VISION, VISION, TEXT, TEXT]])
    probs = np.full((1, 2, 7, 7), 0.01)
    probs[0, :, 5, 3] = 0.9  # the question attends to vision token 3 ...
    probs[0, :, 6, 3] = 0.7
    probs[0, :, 0, 1] = 5.0  # ... a token before the image does not count as a query
    scores = attention_key_scores(probs, mod)
    assert np.isnan(scores[0, [0, 5, 6]]).all()
    assert scores[0, 3] == pytest.approx(0.8)
    assert scores[0, 1] == pytest.approx(0.01)
    key = select_key_tokens(scores, mod, 0.2)
    assert key[0].tolist() == [False, False, False, True, False, False, False]
    assert query_mask(mod)[0].tolist() == [False] * 5 + [True, True]


def test_key_selection_is_deterministic_and_sized():
    rng = np.random.default_rng(0)
    mod = np.array([[PAD] * 3 + [VISION] * 30 + [TEXT] * 4, [PAD] * 33 + [TEXT] * 4])
    scores = np.where(mod == VISION, rng.random(mod.shape), np.nan)
    scores[0, 3:8] = 0.5  # ties go to the earlier token
    key = select_key_tokens(scores, mod, 0.1)
    assert key[0].sum() == 3 and key[1].sum() == 0
    assert (key == select_key_tokens(scores, mod, 0.1)).all()
    assert key_count(30, 0.1) == 3 and key_count(3, 0.2) == 1 and key_count(0, 0.2) == 0


def test_hidden_fallback_prefers_tokens_like_the_question():
    mod = np.array([[VISION, VISION, VISION, TEXT]])
    hidden = np.array([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, 2.0]]])
    s = hidden_key_scores(hidden, mod)
    assert np.argmax(np.nan_to_num(s[0], nan=-9)) == 1
    assert np.isnan(s[0, 3])


def test_attention_shape_mismatch_is_an_error():
    with pytest.raises(BadInputError, match="expected \\[B, heads, T, T\\]"):
        attention_key_scores(np.zeros((1, 2, 3, 3)), np.zeros((1, 4)))


def test_bad_options(analysed):
    # The key ratio is select-key-vision's option since the refactor.
    with pytest.raises(BadInputError, match="key_ratio"):
        analysed("collect-routing,select-key-vision{key_ratio=1.5}")
    with pytest.raises(BadInputError, match="batch_size"):
        analysed("collect-routing{batch_size=0}")


def test_cache_hit_is_identical(analysed, routed, tmp_path):
    _, first = analysed("collect-routing", cache_dir=str(tmp_path))
    _, second = analysed("collect-routing,select-key-vision", cache_dir=str(tmp_path))
    assert first.report["collect-routing"]["cache_hit"] is False
    assert second.report["collect-routing"]["cache_hit"] is True
    assert len(list(tmp_path.glob("routing-*.npz"))) == 1
    a, b = routed[1].facts.get(RoutingStats), second.facts.get(RoutingStats)
    for name, arr in a.to_arrays().items():
        np.testing.assert_array_equal(arr, b.to_arrays()[name], err_msg=name)
    sec_a = {k: v for k, v in routed[1].report["collect-routing"].items() if k != "cache_hit"}
    sec_b = {k: v for k, v in second.report["collect-routing"].items() if k != "cache_hit"}
    assert sec_a == sec_b
    # The key tokens chosen from cached scores are the ones chosen from fresh scores.
    ka, kb = routed[1].facts.get(KeyVision), second.facts.get(KeyVision)
    for layer in range(a.num_layers):
        np.testing.assert_array_equal(ka.key[layer], kb.key[layer])
    # Another key ratio needs no new routing run: the scores are cached, not the choice.
    _, ratio = analysed("collect-routing,select-key-vision{key_ratio=0.5}", cache_dir=str(tmp_path))
    assert ratio.report["collect-routing"]["cache_hit"] is True
    # Another batch size is another entry.
    _, other = analysed("collect-routing{batch_size=5}", cache_dir=str(tmp_path))
    assert other.report["collect-routing"]["cache_hit"] is False
    assert len(list(tmp_path.glob("routing-*.npz"))) == 2
