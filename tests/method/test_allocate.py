"""MODE's cost (§3.3) from the facts, and a case where key-token weighting must matter.

`layer_signals` turns the facts into one layer's signals; `layer_cost` into the ILP costs.
The facts here are built by hand so that the frequency over key vision tokens and the one
over all vision tokens disagree strongly: MODE and its ablation without key tokens must then
give the extra bits to different experts.
"""

from __future__ import annotations

import numpy as np
import pytest

from modec.facts import KeyVision, RoutingStats, Sensitivity, VisionRouting
from modec.method.allocate import layer_signals
from modec.numerics.ilp import allocate_bits_per_layer
from modec.numerics.importance import layer_cost

BITS = (2, 4)


def _freq(c):
    c = np.asarray(c, np.float64)
    return c / c.sum()


def _facts(count_text, count_vision, count_key, delta_text, delta_vision):
    """One-layer facts from counts (frequencies normalised within the layer, MODE Eq. 1)."""
    ct, cv, ck = (np.asarray(c, np.int64) for c in (count_text, count_vision, count_key))
    e = ct.size
    stats = RoutingStats(
        samples=1, count_all=(ct + cv,), count_text=(ct,), count_vision=(cv,),
        mean_weight=(np.full(e, 0.5),), f_text=(_freq(ct),), f_vision=(_freq(cv),),
        f_global=(_freq(ct + cv),),
        vision=(VisionRouting(np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0)),),
        score_source=("attention",),
    )  # fmt: skip
    key = KeyVision(
        key_ratio=0.2, key=(np.zeros(0, bool),), count_key=(ck,), count_redundant=(cv - ck,),
        f_key=(_freq(ck),), f_redundant=(_freq(cv - ck),),
    )  # fmt: skip
    sens = Sensitivity(
        bits=BITS, delta_text=np.asarray(delta_text, np.float64)[None],
        delta_vision=np.asarray(delta_vision, np.float64)[None], samples=1,
        unused_text=np.zeros((1, e), bool), unused_vision=np.zeros((1, e), bool),
    )  # fmt: skip
    return stats, key, sens


# Experts 0 and 1 see the objects the question is about (most key tokens); experts 2 and 3
# see the background (most vision tokens). Text is spread evenly; every expert is equally
# sensitive, so only the frequencies decide.
KEY_CASE = {
    "count_text": [10, 10, 10, 10],
    "count_vision": [60, 60, 900, 900],
    "count_key": [55, 55, 5, 5],
    "delta_text": [[0.1, 0.01]] * 4,
    "delta_vision": [[1.0, 0.1]] * 4,
}


def _signals(case):
    stats, key, sens = _facts(**case)
    return layer_signals(stats, key, sens, 0, np.zeros((4, len(BITS)))), stats, key, sens


def test_signals_come_from_the_right_facts():
    s, stats, key, sens = _signals(KEY_CASE)
    np.testing.assert_array_equal(s.f_key, key.f_key[0])  # key vision: select-key-vision
    np.testing.assert_array_equal(s.f_vision, stats.f_vision[0])  # all vision: collect-routing
    np.testing.assert_array_equal(s.f_text, stats.f_text[0])
    np.testing.assert_array_equal(s.f_redundant, key.f_redundant[0])
    np.testing.assert_array_equal(s.delta_text, sens.delta_text[0])
    np.testing.assert_array_equal(s.delta_vision, sens.delta_vision[0])
    # The case is built so the two vision frequencies disagree.
    assert np.argmax(s.f_key) in (0, 1) and np.argmax(s.f_vision) in (2, 3)


def test_mode_cost_is_text_plus_key_vision():
    s, *_ = _signals(KEY_CASE)
    f_t, f_k, f_v = (_freq(KEY_CASE[c]) for c in ("count_text", "count_key", "count_vision"))
    dt, dv = np.asarray(KEY_CASE["delta_text"]), np.asarray(KEY_CASE["delta_vision"])
    want = {
        "mode": f_t[:, None] * dt + f_k[:, None] * dv,
        "mode-no-key": f_t[:, None] * dt + f_v[:, None] * dv,
        "mode-redundant": f_t[:, None] * dt + _freq(np.subtract(
            KEY_CASE["count_vision"], KEY_CASE["count_key"]))[:, None] * dv,
        "mode-sens-only": dt + dv,
    }  # fmt: skip
    for method, cost in want.items():
        np.testing.assert_allclose(layer_cost(method, s), cost, rtol=1e-15, err_msg=method)


def test_key_tokens_change_the_allocation():
    """MODE gives the 4-bit slots to the key-token experts; without key tokens, to the
    background experts. Σ widths = ⌊4 · 3⌋ = 12: two experts at 4 bits, two at 2."""
    s, *_ = _signals(KEY_CASE)
    (mode,) = allocate_bits_per_layer([layer_cost("mode", s)], BITS, 3.0)
    (no_key,) = allocate_bits_per_layer([layer_cost("mode-no-key", s)], BITS, 3.0)
    assert list(mode.per_layer()[0]) == [4, 4, 2, 2]
    assert list(no_key.per_layer()[0]) == [2, 2, 4, 4]


@pytest.mark.parametrize("seed", range(5))
def test_cost_on_random_facts(seed):
    rng = np.random.default_rng(seed)
    e = 6
    cv = rng.integers(0, 500, e)
    case = {
        "count_text": rng.integers(0, 100, e), "count_vision": cv,
        "count_key": rng.integers(0, cv + 1), "delta_text": rng.random((e, 2)),
        "delta_vision": rng.random((e, 2)),
    }  # fmt: skip
    stats, key, sens = _facts(**case)
    s = layer_signals(stats, key, sens, 0, np.zeros((e, 2)))
    want = (
        _freq(case["count_text"])[:, None] * case["delta_text"]
        + _freq(case["count_key"])[:, None] * case["delta_vision"]
    )
    np.testing.assert_allclose(layer_cost("mode", s), want, rtol=1e-14)
