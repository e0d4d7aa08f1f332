"""allocate-bits on the tiny digits-vlm: the costs it solves and the widths it picks.

The references are written from MODE §3.1–3.3 in plain numpy: frequencies are each layer's
counts over their sum (text tokens for f_text, key vision tokens for f_key), the cost of
expert e at width b is f_text(e)·δ_text(e, b) + f_key(e)·δ_vision(e, b), and the widths
minimise Σ cost under the budget — checked by enumerating every assignment (4 experts per
layer, 8 in all: at most 3^8 = 6561 of them).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from modec.facts import BitAllocation, KeyVision, RoutingStats, Sensitivity

ANALYSIS = "collect-routing,select-key-vision,measure-sensitivity{samples=4%s}"


def _freq(counts):
    c = np.asarray(counts, np.float64)
    return c / c.sum()


def _paper_costs(ctx, vision: str = "key"):
    """Per layer [E, J]: f_text·δ_text + f_v·δ_vision with f_v over key (or all) vision tokens."""
    stats, kv = ctx.facts.get(RoutingStats), ctx.facts.get(KeyVision)
    sens = ctx.facts.get(Sensitivity)
    out = []
    for layer in range(stats.num_layers):
        vis = kv.count_key[layer] if vision == "key" else stats.count_vision[layer]
        f_text, f_vis = _freq(stats.count_text[layer]), _freq(vis)
        out.append(
            f_text[:, None] * sens.delta_text[layer] + f_vis[:, None] * sens.delta_vision[layer]
        )
    return out


def _brute(costs, bits, fits):
    """The least Σ cost over every assignment of widths whose widths ``fits`` accepts."""
    flat = np.concatenate(costs)
    best = math.inf
    for choice in itertools.product(range(len(bits)), repeat=len(flat)):
        widths = [bits[j] for j in choice]
        if fits(widths):
            best = min(best, float(sum(flat[e, j] for e, j in enumerate(choice))))
    return best


def _cost_of(costs, bits, widths):
    return sum(float(c[e, bits.index(w)]) for c, ws in zip(costs, widths, strict=True)
               for e, w in enumerate(ws))  # fmt: skip


@pytest.fixture(scope="module")
def mode(analysed):
    return analysed(ANALYSIS % ",bits=2:4" + ",allocate-bits{bits=2:4}")


def test_costs_are_the_paper_formula(mode):
    _, ctx = mode
    got = [np.asarray(c) for c in ctx.report["allocate-bits"]["costs"]]
    want = _paper_costs(ctx)
    swapped = _paper_costs(ctx, vision="all")
    for layer, (g, w, s) in enumerate(zip(got, want, swapped, strict=True)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=0, err_msg=f"layer {layer}")
        if layer == 0:
            # On this model all-vision weighting gives other costs: the check above can
            # tell f_key from f_vision.
            assert np.abs(s - w).max() > 1e-3 * np.abs(w).max()


def test_widths_minimise_the_cost_per_layer(mode):
    """Σ_e b_e = ⌊n·budget⌋ in every layer, at the least Σ cost (brute force)."""
    _, ctx = mode
    alloc = ctx.facts.get(BitAllocation)
    costs = _paper_costs(ctx)
    bits = [2, 4]
    assert alloc.bits == (2, 4) and alloc.budget == 3.0
    for layer, (c, widths) in enumerate(zip(costs, alloc.widths, strict=True)):
        assert sum(widths) == math.floor(len(widths) * 3.0), layer
        best = _brute([c], bits, lambda ws: sum(ws) == 12)
        assert _cost_of([c], bits, [widths]) == pytest.approx(best, rel=1e-9, abs=1e-15)
    assert alloc.objective == pytest.approx(_cost_of(costs, bits, alloc.widths), rel=1e-9)
    assert ctx.report["allocate-bits"]["widths"] == [list(w) for w in alloc.widths]


@pytest.mark.parametrize("method, vision", [("mode-no-key", "all"), ("mode-sens-only", None)])
def test_ablation_costs(analysed, method, vision):
    _, ctx = analysed(ANALYSIS % "" + f",allocate-bits{{method={method}}}")
    sens = ctx.facts.get(Sensitivity)
    got = [np.asarray(c) for c in ctx.report["allocate-bits"]["costs"]]
    if vision is None:  # δ_text + δ_vision, no frequency weighting
        want = [sens.delta_text[i] + sens.delta_vision[i] for i in range(len(got))]
    else:
        want = _paper_costs(ctx, vision=vision)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=0)


def test_global_scope_shares_one_budget(analysed):
    _, ctx = analysed(ANALYSIS % "" + ",allocate-bits{scope=global,budget=2.5}")
    alloc = ctx.facts.get(BitAllocation)
    bits = [2, 3, 4]
    costs = _paper_costs(ctx)
    flat = [w for layer in alloc.widths for w in layer]
    assert len(flat) == 8 and sum(flat) == math.floor(8 * 2.5)
    best = _brute(costs, bits, lambda ws: sum(ws) == 20)
    assert _cost_of(costs, bits, alloc.widths) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_le_budget_may_stay_below(analysed):
    _, ctx = analysed(ANALYSIS % "" + ",allocate-bits{sense=le,budget=2.5}")
    alloc = ctx.facts.get(BitAllocation)
    bits = [2, 3, 4]
    costs = _paper_costs(ctx)
    for c, widths in zip(costs, alloc.widths, strict=True):
        assert sum(widths) <= 10
        best = _brute([c], bits, lambda ws: sum(ws) <= 10)
        assert _cost_of([c], bits, [widths]) == pytest.approx(best, rel=1e-9, abs=1e-15)


def _expert_bytes(n_k_shapes, b, group):
    """Codes at b bits (whole bytes per row), one fp16 scale and one uint8 zero per group."""
    total = 0
    for n, k in n_k_shapes:
        groups = -(-k // group)
        total += n * math.ceil(k * b / 8) + n * groups * 2 + n * groups * 1
    return total


def test_byte_budget_is_obeyed(analysed):
    from modec.executor import Executor

    bits = [2, 3, 4]
    model, _ = analysed("")
    p = Executor(model).params[0]
    shapes = [tuple(w.shape[1:]) for w in (p.gate, p.up, p.down)]
    per = {b: _expert_bytes(shapes, b, 128) for b in bits}
    budget = 8 * per[3] - 1  # not enough for every expert at 3 bits
    _, ctx = analysed(ANALYSIS % "" + f",allocate-bits{{budget_bytes={budget}}}")
    alloc = ctx.facts.get(BitAllocation)
    used = sum(per[w] for layer in alloc.widths for w in layer)
    assert used <= budget
    assert any(w < 3 for layer in alloc.widths for w in layer)
    costs = _paper_costs(ctx)
    best = _brute(costs, bits, lambda ws: sum(per[w] for w in ws) <= budget)
    assert _cost_of(costs, bits, alloc.widths) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_uniform_needs_no_costs(analysed):
    _, ctx = analysed("collect-routing,allocate-bits{method=uniform}")
    alloc = ctx.facts.get(BitAllocation)
    assert alloc.widths == ((3, 3, 3, 3), (3, 3, 3, 3))
    assert "costs" not in ctx.report["allocate-bits"]
