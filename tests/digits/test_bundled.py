"""The bundled example: what the model card claims is what the files do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from modec import data
from modec.evaluate import evaluate
from modec.executor import Executor
from modec.frontend import OrtRunner, load_onnx
from modec.moe.canonical import canonicalize_moe
from modec.moe.discover import find_moe

ROOT = Path(__file__).resolve().parents[2] / "examples" / "digits-vlm"
MODEL, CALIB, EVAL, CARD = (ROOT / n for n in ("model.onnx", "calib.npz", "eval.npz", "README.md"))


def test_files_and_sizes():
    assert MODEL.stat().st_size <= 30 * 2**20
    ev, cal = data.load(EVAL), data.load(CALIB)
    assert len(ev) >= 2000 and len(cal) == 128
    assert ev.answer is not None and ev.family is not None
    mm = ev.multimodal
    vis = (ev.modality == data.VISION).sum(axis=1)
    txt = (ev.modality == data.TEXT).sum(axis=1)
    assert (vis[mm] >= 5 * txt[mm]).all()
    assert (vis[~mm] == 0).all()


def test_find_moe_sees_4_layers_of_16_experts():
    regions = find_moe(load_onnx(MODEL))
    assert [r.num_experts for r in regions] == [16] * 4
    assert all(r.top_k == 2 and r.form == "stacked_gather" for r in regions)
    assert all(r.router.norm_topk_prob and r.router.scoring == "softmax" for r in regions)


def test_canonical_graph_matches_onnxruntime():
    ev = data.load(EVAL)
    pick = np.r_[0:5, len(ev) - 3 : len(ev)]  # multimodal and text-only, two batch shapes
    sub = ev.subset(pick)
    ort = OrtRunner(MODEL)
    model = load_onnx(MODEL)
    canonicalize_moe(model)
    ex = Executor(model)
    for _, feeds in sub.batches(4):
        want = ort(feeds)
        got = ex.run(feeds).outputs[ex.output_names[0]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_model_card_accuracy_is_reproducible():
    """The card's accuracy table is what onnxruntime measures on eval.npz now."""
    card = CARD.read_text()
    res = evaluate(OrtRunner(MODEL), data.load(EVAL))
    for name, split in (("overall", res.overall), ("multimodal", res.multimodal),
                        ("text-only", res.text_only)):  # fmt: skip
        m = re.search(rf"^\| {name} \| ([0-9.]+)% \|$", card, re.M)
        assert m, f"model card has no {name} row"
        assert float(m.group(1)) == pytest.approx(100 * split.accuracy, abs=0.005)


def test_train_log_is_shipped():
    log = json.loads((ROOT / "train_log.json").read_text())
    assert log["steps"] > 0 and log["train_seconds"] > 0
