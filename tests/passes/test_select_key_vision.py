"""select-key-vision on the tiny digits-vlm against a recount written from MODE §3.1.

The reference runs every calibration sample on its own (no padding, no batching), taps each
layer's attention probabilities (the Softmax output find-attention names), scores the
sample's vision tokens in plain numpy as the paper states — the attention the question (the
text after the last vision token) pays each one, averaged over question tokens and heads —
keeps the top ⌈ratio·n⌉ (at least 1, ties to the earlier token) and counts the experts the
executor routed those tokens to. Nothing of `modec.method.key_vision` is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from modec.data import TEXT, VISION
from modec.errors import BadInputError
from modec.executor import Executor
from modec.facts import AttentionTaps, Calibration, KeyVision, RoutingStats


@dataclass
class Recount:
    """Per layer, over the vision tokens in the order collect-routing ran the samples."""

    scores: list[np.ndarray]
    key: list[np.ndarray]
    count_key: list[np.ndarray]
    count_vision: list[np.ndarray]


def _n_key(n_vision: int, ratio: float) -> int:
    # ⌈ratio·n⌉ with a guard for binary rounding (0.2·65 = 13.000000000000002), at least 1.
    return max(1, min(n_vision, math.ceil(round(ratio * n_vision, 9))))


def _recount(model, ctx, ratio: float) -> Recount:
    ds = ctx.facts.get(Calibration).data
    probs = [t.probs.name for t in ctx.facts.get(AttentionTaps).taps]
    ex = Executor(model, taps=probs)
    n_layers, n_exp = len(ex.params), ex.params[0].num_experts
    scores: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    keys: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    count_key = [np.zeros(n_exp, np.int64) for _ in range(n_layers)]
    count_vision = [np.zeros(n_exp, np.int64) for _ in range(n_layers)]
    # collect-routing keeps its vision tokens in the order it ran the samples: sorted by
    # length, stably (its rule 1). Only the order of the concatenation depends on this.
    order = np.argsort((ds.modality != 0).sum(1), kind="stable")
    t_full = ds.modality.shape[1]
    for i in order:
        real = ds.modality[i] != 0
        feeds = {
            name: (a[i : i + 1][:, real] if a.ndim == 2 and a.shape[1] == t_full else a[i : i + 1])
            for name, a in ds.inputs.items()
        }
        mod = ds.modality[i][real]
        vis = np.flatnonzero(mod == VISION)
        if vis.size == 0:
            continue
        query = np.flatnonzero((mod == TEXT) & (np.arange(mod.size) > vis.max()))
        assert query.size, "every multimodal calibration sample asks a question after its image"
        res = ex.run(feeds, record_routing=True)
        for layer in range(n_layers):
            p = np.asarray(res.taps[probs[layer]], np.float64)[0]  # [heads, Tq, Tk]
            score = p[:, query][:, :, vis].mean(axis=(0, 1))
            top = np.lexsort((np.arange(vis.size), -score))[: _n_key(vis.size, ratio)]
            key = np.zeros(vis.size, bool)
            key[top] = True
            routed = res.routing[layer].experts  # [T, k]
            scores[layer].append(score)
            keys[layer].append(key)
            count_key[layer] += np.bincount(routed[vis[key]].ravel(), minlength=n_exp)
            count_vision[layer] += np.bincount(routed[vis].ravel(), minlength=n_exp)
    return Recount(
        [np.concatenate(s) for s in scores], [np.concatenate(k) for k in keys], count_key,
        count_vision,
    )  # fmt: skip


@pytest.fixture(scope="module")
def selected(analysed):
    model, ctx = analysed("collect-routing,select-key-vision")
    return model, ctx, _recount(model, ctx, 0.2)


def test_each_layer_is_scored_by_its_own_attention(selected):
    _, ctx, ref = selected
    stats = ctx.facts.get(RoutingStats)
    # The two layers' attentions rank the vision tokens differently on this model, so a
    # layer scored with another layer's attention cannot pass.
    assert (ref.key[0] != ref.key[1]).sum() > 50
    for layer in range(stats.num_layers):
        assert stats.score_source[layer] == "attention"
        np.testing.assert_allclose(
            stats.vision[layer].score, ref.scores[layer], rtol=1e-6, atol=1e-9,
            err_msg=f"layer {layer}",
        )  # fmt: skip


def test_key_tokens_and_counts_match_the_recount(selected):
    _, ctx, ref = selected
    stats = ctx.facts.get(RoutingStats)
    kv = ctx.facts.get(KeyVision)
    assert kv.key_ratio == 0.2
    for layer in range(stats.num_layers):
        np.testing.assert_array_equal(kv.key[layer], ref.key[layer], err_msg=f"layer {layer}")
        np.testing.assert_array_equal(kv.count_key[layer], ref.count_key[layer])
        np.testing.assert_array_equal(stats.count_vision[layer], ref.count_vision[layer])
        np.testing.assert_array_equal(
            kv.count_redundant[layer], ref.count_vision[layer] - ref.count_key[layer]
        )
        total = ref.count_key[layer].sum()
        np.testing.assert_allclose(kv.f_key[layer], ref.count_key[layer] / total, rtol=1e-12)
        red = ref.count_vision[layer] - ref.count_key[layer]
        np.testing.assert_allclose(kv.f_redundant[layer], red / red.sum(), rtol=1e-12)
        # MODE's point: the key tokens' expert mix is not all vision tokens' mix.
        assert not np.allclose(kv.f_key[layer], stats.f_vision[layer], atol=1e-3)


def test_another_ratio_is_another_selection(analysed):
    model, ctx = analysed("collect-routing,select-key-vision{key_ratio=0.5}")
    ref = _recount(model, ctx, 0.5)
    kv = ctx.facts.get(KeyVision)
    assert kv.key_ratio == 0.5
    for layer in range(len(kv.key)):
        np.testing.assert_array_equal(kv.key[layer], ref.key[layer])
        np.testing.assert_array_equal(kv.count_key[layer], ref.count_key[layer])


def test_report_section(selected):
    _, ctx, ref = selected
    sec = ctx.report["select-key-vision"]
    assert sec["key_ratio"] == 0.2
    assert sec["key_tokens"] == [int(k.sum()) for k in ref.key]
    assert sec["vision_tokens"] == [k.size for k in ref.key]
    assert sec["count_key"] == [c.tolist() for c in ref.count_key]
    assert sec["key_source"] == ["attention", "attention"]
    assert ctx.stats["select-key-vision"]["key_tokens"] == sum(int(k.sum()) for k in ref.key)


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_bad_ratio(analysed, ratio):
    with pytest.raises(BadInputError, match="key_ratio"):
        analysed(f"collect-routing,select-key-vision{{key_ratio={ratio}}}")
