"""tools/signal_overlap.py on the tiny VLM: its figures are the analysis' own, recomputed."""

from __future__ import annotations

import numpy as np
import pytest

from modec.facts import KeyVision, RoutingStats, Sensitivity
from modec.pipelines import CompileOptions
from modec.sweep import analyze, quantize
from tools.signal_overlap import SIGNALS, overlap


def test_overlap_reports_the_analysis_frequencies_and_the_ilp_widths(tiny_vlm) -> None:
    an = analyze(tiny_vlm["model"], tiny_vlm["calib"],
                 CompileOptions(sensitivity_samples=8, threads=1))  # fmt: skip
    res = overlap(an, [2.5, 3.0], (2, 3, 4))
    rs, kv = an.ctx.facts.get(RoutingStats), an.ctx.facts.get(KeyVision)
    sens = an.ctx.facts.get(Sensitivity)
    assert len(res["layers"]) == len(rs.f_text)
    for li, r in enumerate(res["layers"]):
        assert r["l1_all_redundant"] == pytest.approx(
            np.abs(rs.f_vision[li] - kv.f_redundant[li]).sum()
        )
        assert r["text_term"] == pytest.approx((rs.f_text[li][:, None] * sens.delta_text[li]).sum())
        assert r["vision_term_key"] == pytest.approx(
            (kv.f_key[li][:, None] * sens.delta_vision[li]).sum()
        )
        for k in ("corr_all_redundant", "corr_all_key", "corr_key_redundant"):
            assert r[k] is None or -1 - 1e-9 <= r[k] <= 1 + 1e-9
    for budget in (2.5, 3.0):
        got = res["budgets"][f"{budget:g}"]
        for m in SIGNALS:  # the widths are the pipeline's own allocation for that method
            want = quantize(an, m, budget).allocation.widths
            assert got["widths"][m] == [list(w) for w in want]
        a, b = (np.asarray(got["widths"][m]) for m in ("mode", "mode-no-key"))
        assert got["differ"]["mode vs mode-no-key"] == int((a != b).sum())
