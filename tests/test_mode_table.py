"""tools/mode_table.py's summary: the best baseline per budget and MODE's paired difference
to it (the run itself is the results-table job, not a test)."""

from __future__ import annotations

import numpy as np
import pytest

from modec import stats
from tools.mode_table import against_best_baseline, table


def _rows_and_correct():
    rng = np.random.default_rng(0)
    n = 400
    rows, correct = [], {}
    acc = {"mode": 0.8, "uniform": 0.7, "mc-moe": 0.75, "veq-me": 0.6, "mode-no-key": 0.9}
    for model in (0, 1):
        correct[(model, -1, "fp32", 32.0)] = np.ones(n, bool)
        rows.append({"method": "fp32", "budget": 32.0, "seed": -1, "model": model, "kl": 0.0,
                     "overall": 1.0, "multimodal": 1.0, "text_only": 1.0})  # fmt: skip
        for seed in (0, 1, 2):
            for m, p in acc.items():
                c = rng.random(n) < p
                correct[(model, seed, m, 2.5)] = c
                rows.append({"method": m, "budget": 2.5, "seed": seed, "model": model,
                             "kl": 0.1, "overall": float(c.mean()), "multimodal": 0.0,
                             "text_only": 0.0})  # fmt: skip
    return rows, correct


def test_mode_is_compared_with_the_best_baseline_not_an_ablation() -> None:
    rows, correct = _rows_and_correct()
    (v,) = against_best_baseline(rows, correct, [2.5])
    assert v["best_baseline"] == "mc-moe"  # mode-no-key scores higher but is MODE's ablation
    reps = [(m, s) for m in (0, 1) for s in (0, 1, 2)]
    a = np.mean([correct[(m, s, "mode", 2.5)] for m, s in reps], axis=0)
    b = np.mean([correct[(m, s, "mc-moe", 2.5)] for m, s in reps], axis=0)
    want = stats.paired_bootstrap_difference(a, b)
    assert v["difference_pp"] == pytest.approx(100 * want.estimate)
    assert v["ci95_pp"] == pytest.approx([100 * want.low, 100 * want.high])
    assert v["ci95_pp"][0] > 0  # 0.80 vs 0.75 on 6 × 400 samples
    each = [100 * (correct[(m, s, "mode", 2.5)].mean() - correct[(m, s, "mc-moe", 2.5)].mean())
            for m, s in reps]  # fmt: skip
    assert v["per_replicate_pp"] == pytest.approx(each)
    assert v["ahead_in"] == sum(d > 0 for d in each) and len(v["replicates"]) == 6


def test_table_rows_are_means_over_models_and_seeds() -> None:
    rows, _ = _rows_and_correct()
    text = table(rows, [2.5], ["mode", "uniform"])
    mode = [100 * r["overall"] for r in rows if r["method"] == "mode"]
    assert f"| mode | 2.5 | {np.mean(mode):.2f} ± {np.std(mode):.2f} |" in text
    assert against_best_baseline(rows, {}, [3.0]) == []  # no rows at that budget


def test_row_store_round_trips_rows_by_key(tmp_path) -> None:
    from tools.mode_table import RowStore

    store = RowStore(tmp_path / "rows")
    key = {"model": "ab", "eval": "cd", "seed": 0, "method": "mode", "budget": 2.5}
    row = {"method": "mode", "budget": 2.5, "seed": 0, "model": 3, "overall": 0.75, "kl": 0.1}
    hits = np.array([True, False, True, True])
    assert store.get(key) is None
    store.put(key, row, hits)
    got_row, got_hits = store.get(key)
    assert got_row == {k: v for k, v in row.items() if k != "model"}  # the index is the run's
    assert got_hits.dtype == bool and (got_hits == hits).all()
    assert store.get({**key, "seed": 1}) is None and store.get({**key, "budget": 3.0}) is None
    assert [p.name.endswith(".tmp.npz") for p in (tmp_path / "rows").iterdir()] == [False]
    assert RowStore(None).get(key) is None  # no directory: nothing kept


def test_variants_are_compared_with_mode_on_the_same_measures() -> None:
    from tools.mode_table import against_mode

    rows, correct = _rows_and_correct()
    (v,) = against_mode(rows, correct, [2.5], ["mode", "uniform", "mc-moe", "mode-no-key"])
    assert v["method"] == "mode-no-key"  # the baselines are against_best_baseline's
    reps = [(m, s) for m in (0, 1) for s in (0, 1, 2)]
    a = np.mean([correct[(m, s, "mode-no-key", 2.5)] for m, s in reps], axis=0)
    b = np.mean([correct[(m, s, "mode", 2.5)] for m, s in reps], axis=0)
    want = stats.paired_bootstrap_difference(a, b)
    assert v["difference_pp"] == pytest.approx(100 * want.estimate) and v["ci95_pp"][0] > 0
    assert v["ahead_in"] == sum(d > 0 for d in v["per_replicate_pp"]) and len(reps) == 6
    assert against_mode(rows, correct, [3.0], ["mode-no-key"]) == []  # no rows at that budget
