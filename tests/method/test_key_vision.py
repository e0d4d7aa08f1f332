"""Key vision tokens (MODE §3.1) against a per-sample loop written from the paper.

Score of a vision token: the attention the sample's question — its text tokens after its
last vision token — pays it, averaged over those query tokens and over heads. Key tokens:
per sample the top ⌈ratio·n⌉ (at least 1) by score, ties to the earlier token.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from modec.data import PAD, TEXT, VISION
from modec.facts import VisionRouting
from modec.method.key_vision import (
    attention_key_scores,
    key_count,
    key_scores,
    select_key_vision,
)


def _layout(rng, t):
    """A left-padded sample: pad, text, an image, then (maybe) a question."""
    n_pad = int(rng.integers(0, 4))
    n_pre = int(rng.integers(0, 3))
    n_vis = int(rng.integers(0, 9))
    n_q = int(rng.integers(0, 4))
    rest = t - n_pad - n_pre - n_vis - n_q
    return [PAD] * n_pad + [TEXT] * (n_pre + rest) + [VISION] * n_vis + [TEXT] * n_q


def _batch(seed, b=6, t=20, heads=3):
    rng = np.random.default_rng(seed)
    mod = np.array([_layout(rng, t) for _ in range(b)])
    logits = rng.normal(size=(b, heads, t, t))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return mod, probs


def _scores_by_loop(probs, mod):
    out = np.full(mod.shape, np.nan)
    for b in range(mod.shape[0]):
        vis = [i for i, m in enumerate(mod[b]) if m == VISION]
        if not vis:
            continue
        query = [i for i, m in enumerate(mod[b]) if m == TEXT and i > max(vis)]
        if not query:
            continue
        for v in vis:
            out[b, v] = sum(probs[b, h, q, v] for h in range(probs.shape[1]) for q in query) / (
                probs.shape[1] * len(query)
            )
    return out


@pytest.mark.parametrize("seed", range(8))
def test_attention_scores(seed):
    mod, probs = _batch(seed)
    got = attention_key_scores(probs, mod)
    want = _scores_by_loop(probs, mod)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-12)


def test_scores_fall_back_only_where_there_is_no_question():
    mod = np.array([[TEXT, VISION, VISION, TEXT], [PAD, TEXT, VISION, VISION]])
    probs = np.full((2, 1, 4, 4), 0.25)
    hidden = np.random.default_rng(0).normal(size=(2, 4, 5))
    ks = key_scores(probs, hidden, mod)
    assert ks.no_query == 1 and ks.sources == frozenset({"attention", "hidden"})
    assert ks.scores[0, 1] == ks.scores[0, 2] == pytest.approx(0.25)
    assert np.isfinite(ks.scores[1, 2:]).all()


def _n_key(n, ratio):
    return max(1, math.ceil(Fraction(str(ratio)) * n)) if n else 0


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
def test_key_count_is_the_ceiling(ratio):
    for n in range(0, 300):
        assert key_count(n, ratio) == _n_key(n, ratio), n


def _select_by_loop(sample, score, experts, num_experts, ratio):
    key = np.zeros(sample.size, bool)
    for s in np.unique(sample):
        idx = np.flatnonzero(sample == s)
        if np.isnan(score[idx]).all():
            continue
        # Sort by score descending, then by position ascending (ties to the earlier token).
        ranked = sorted(idx, key=lambda i: (-score[i], i))
        key[ranked[: _n_key(idx.size, ratio)]] = True
    count_key = np.zeros(num_experts, np.int64)
    count_red = np.zeros(num_experts, np.int64)
    for i in range(sample.size):
        for e in experts[i]:
            (count_key if key[i] else count_red)[e] += 1
    return key, count_key, count_red


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_select_key_vision(seed, ratio):
    rng = np.random.default_rng(seed)
    sizes = [1, 3, 5, 64, 65, 2]
    sample = np.repeat(np.arange(len(sizes)), sizes)
    # Few distinct values: many ties, which must go to the earlier token.
    score = rng.integers(0, 4, sample.size).astype(np.float64)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(sample.size)])
    got = select_key_vision(VisionRouting(experts, sample, score), 8, ratio)
    key, ck, cr = _select_by_loop(sample, score, experts, 8, ratio)
    np.testing.assert_array_equal(got.key, key)
    np.testing.assert_array_equal(got.count_key, ck)
    np.testing.assert_array_equal(got.count_redundant, cr)
