"""tools/pilot_study.py: the promotion orders, and the spliced models it evaluates are the
models quantize-experts builds at the same widths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modec.method.quantize import expert_weights
from modec.moe.canonical import is_moe_node
from modec.pipelines import CompileOptions
from modec.sweep import analyze, quantize_widths
from tools.pilot_study import promoted_widths, spliced

ROOT = Path(__file__).resolve().parents[1] / "examples" / "digits-vlm"


def test_promotion_takes_the_top_n_of_each_layer_ties_by_index() -> None:
    scores = [np.array([0.1, 0.4, 0.4, 0.05]), np.array([0.3, 0.2, 0.1, 0.4])]
    assert promoted_widths(scores, 0) == [[2, 2, 2, 2], [2, 2, 2, 2]]
    assert promoted_widths(scores, 1) == [[2, 3, 2, 2], [2, 2, 2, 3]]
    assert promoted_widths(scores, 3) == [[3, 3, 3, 2], [3, 3, 2, 3]]
    assert promoted_widths(scores, 4) == [[3] * 4, [3] * 4]


@pytest.mark.slow
def test_spliced_model_equals_quantize_experts_at_the_same_widths() -> None:
    an = analyze(str(ROOT / "model.onnx"), str(ROOT / "calib.npz"), CompileOptions(seed=0),
                 sensitivity=False)  # fmt: skip
    experts = [int(n.attributes["num_experts"].value) for n in an.model.graph if is_moe_node(n)]
    rng = np.random.default_rng(0)
    widths = [rng.choice([2, 3], size=e).tolist() for e in experts]
    by_width = {b: quantize_widths(an, [[b] * e for e in experts]).model for b in (2, 3)}
    want = quantize_widths(an, widths).model
    got = spliced(an, by_width, widths)
    pairs = zip([n for n in want.graph if is_moe_node(n)], [n for n in got.graph if is_moe_node(n)],
                strict=True)  # fmt: skip
    for a, b in pairs:
        wa, wb = expert_weights(a), expert_weights(b)
        assert wa.keys() == wb.keys()
        for proj in wa:
            x, y = wa[proj].const_value, wb[proj].const_value
            assert x is not None and y is not None
            assert np.array_equal(x.numpy(), y.numpy()), proj
