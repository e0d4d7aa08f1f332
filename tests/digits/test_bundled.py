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

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "examples" / "digits-vlm"
MODEL, CALIB, EVAL, CARD = (ROOT / n for n in ("model.onnx", "calib.npz", "eval.npz", "README.md"))
SPLITS = ("overall", "multimodal", "text-only")


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


def _card_accuracy() -> dict[str, float]:
    """The model card's fp32 accuracy table, in percent (written by `evaluate()` at build)."""
    card = CARD.read_text()
    out = {}
    for name in SPLITS:
        m = re.search(rf"^\| {name} \| ([0-9.]+)% \|$", card, re.M)
        assert m, f"model card has no {name} row"
        out[name] = float(m.group(1))
    return out


@pytest.fixture(scope="module")
def fp32_eval():
    return evaluate(OrtRunner(MODEL), data.load(EVAL))


def test_model_card_accuracy_is_reproducible(fp32_eval):
    """The card's accuracy table is what onnxruntime measures on eval.npz now."""
    card = _card_accuracy()
    res = fp32_eval
    for name, split in (("overall", res.overall), ("multimodal", res.multimodal),
                        ("text-only", res.text_only)):  # fmt: skip
        assert card[name] == pytest.approx(100 * split.accuracy, abs=0.005)


def _argmax_reference(ds: data.Dataset) -> np.ndarray:
    """The answer token of every sample: argmax of the logits at its last position.

    Written without `modec.evaluate`: samples of equal length run together in a plain
    onnxruntime session, each at its own length (no padding at all).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[0].name
    real = ds.modality != data.PAD
    length = real.sum(1)
    t_full = ds.modality.shape[1]
    preds = np.full(len(ds), -1, np.int64)
    for n in np.unique(length):
        same = np.flatnonzero(length == n)
        for chunk in np.array_split(same, -(-same.size // 64)):
            feeds = {
                k: (a[chunk][:, t_full - n :] if a.ndim == 2 and a.shape[1] == t_full else a[chunk])
                for k, a in ds.inputs.items()
            }
            assert real[chunk][:, t_full - n :].all()  # left padding: the last n are real
            preds[chunk] = sess.run([out], feeds)[0][:, -1].argmax(-1)
    return preds


def test_model_card_accuracy_matches_a_plain_argmax(fp32_eval):
    """The card (written by `evaluate()`) against an argmax written here, sample by sample."""
    ds = data.load(EVAL)
    assert ds.answer is not None
    preds = _argmax_reference(ds)
    ok = preds == ds.answer
    mm = ds.multimodal
    card = _card_accuracy()
    assert card["overall"] == pytest.approx(100 * ok.mean(), abs=0.005)
    assert card["multimodal"] == pytest.approx(100 * ok[mm].mean(), abs=0.005)
    assert card["text-only"] == pytest.approx(100 * ok[~mm].mean(), abs=0.005)
    # evaluate() predicted the same token for every sample, in the file's order.
    assert fp32_eval.predictions is not None
    assert (fp32_eval.predictions == preds).mean() == 1.0


def test_readme_fp32_figures_are_the_model_cards():
    """The README's `modec compile` summary quotes the card's fp32 accuracy.

    Its quantized figures come from a real `modec compile ... --eval` run of the bundled
    model (about 80 s and more on 2 cores): no test here reruns that compile, so only the
    fp32 column is checked, against the card, whose table `evaluate()` wrote at build time
    and the tests above re-measure.
    """
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```\n(modec compile: .*?)```", readme, re.S)
    assert block, "README has no `modec compile` summary block"
    card = _card_accuracy()
    for name in SPLITS:
        key = name.replace("-", "_")
        m = re.search(rf"^  {key} +fp32 +([0-9.]+)% +quantized +([0-9.]+)%$", block.group(1),
                      re.M)  # fmt: skip
        assert m, f"README summary has no {key} line"
        assert float(m.group(1)) == card[name], name


def test_train_log_is_shipped():
    log = json.loads((ROOT / "train_log.json").read_text())
    assert log["steps"] > 0 and log["train_seconds"] > 0
