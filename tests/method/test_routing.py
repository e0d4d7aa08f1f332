"""Routing counts per modality (MODE §3.1) against a token-by-token loop."""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import PAD, TEXT, VISION
from modec.method.routing import RoutingAccumulator
from modec.moe.reference import Routing


@pytest.mark.parametrize("seed", range(3))
def test_counts_and_frequencies(seed):
    rng = np.random.default_rng(seed)
    acc = RoutingAccumulator([(5, 2), (5, 2)])
    want = {m: np.zeros((2, 5), np.int64) for m in (TEXT, VISION)}
    for batch in range(3):
        mod = rng.choice([PAD, TEXT, VISION], size=(2, 9), p=[0.2, 0.3, 0.5])
        t = mod.size
        for layer in range(2):
            experts = np.stack([rng.choice(5, 2, replace=False) for _ in range(t)])
            routing = Routing(rng.random((t, 5)), experts, rng.random((t, 2)))
            sample = np.broadcast_to((2 * batch + np.arange(2))[:, None], mod.shape)
            acc.add(layer, routing, mod, np.zeros(t), sample)
            for tok in range(t):
                m = mod.ravel()[tok]
                if m == PAD:
                    continue  # padding never counts
                for e in experts[tok]:
                    want[m][layer, e] += 1
        acc.samples += 2
    stats = acc.finish()
    for layer in range(2):
        np.testing.assert_array_equal(stats.count_text[layer], want[TEXT][layer])
        np.testing.assert_array_equal(stats.count_vision[layer], want[VISION][layer])
        np.testing.assert_array_equal(
            stats.count_all[layer], want[TEXT][layer] + want[VISION][layer]
        )
        # Frequencies are normalised within the layer, one modality at a time.
        np.testing.assert_allclose(
            stats.f_text[layer], want[TEXT][layer] / want[TEXT][layer].sum(), rtol=1e-15
        )
        np.testing.assert_allclose(
            stats.f_vision[layer], want[VISION][layer] / want[VISION][layer].sum(), rtol=1e-15
        )
        both = want[TEXT][layer] + want[VISION][layer]
        np.testing.assert_allclose(stats.f_global[layer], both / both.sum(), rtol=1e-15)
        # Every vision token (not padding, not text) is kept for the key-token choice.
        assert stats.vision[layer].experts.shape == (int(want[VISION][layer].sum()) // 2, 2)
    assert stats.samples == 6


def test_a_modality_that_never_occurs_has_zero_frequency():
    acc = RoutingAccumulator([(5, 2)])
    mod = np.array([TEXT, TEXT, PAD])
    routing = Routing(np.zeros((3, 5)), np.array([[0, 1], [1, 2], [3, 4]]), np.ones((3, 2)))
    acc.add(0, routing, mod, np.zeros(3), np.zeros(3, np.int64))
    stats = acc.finish()
    assert stats.count_text[0].tolist() == [1, 2, 1, 0, 0]
    assert stats.f_vision[0].tolist() == [0.0] * 5
    assert stats.f_text[0].tolist() == [0.25, 0.5, 0.25, 0.0, 0.0]
