"""`modec.evaluate.evaluate` against a plain argmax written here, on the tiny digits-vlm.

The reference runs each sample alone in its own onnxruntime session call, at its own length
(no padding), and reads the argmax of the logits at the last position. The answers are set
so that a known subset of samples is right: accuracy counts and the per-sample predictions
then say whether evaluate() scored every sample against its own answer, in any order of the
evaluation set.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from modec import data
from modec.evaluate import evaluate
from modec.frontend import OrtRunner


def _argmax_by_sample(model_path, ds):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[0].name
    t_full = ds.modality.shape[1]
    preds = []
    for i in range(len(ds)):
        real = ds.modality[i] != data.PAD
        feeds = {
            k: (a[i : i + 1][:, real] if a.ndim == 2 and a.shape[1] == t_full else a[i : i + 1])
            for k, a in ds.inputs.items()
        }
        logits = sess.run([out], feeds)[0]
        preds.append(int(np.argmax(logits[0, -1])))
    return np.array(preds)


@pytest.fixture(scope="module")
def handful(tiny_vlm):
    """Nine samples, multimodal and text-only interleaved, with answers right on a known set."""
    ds = data.load(tiny_vlm["eval"])
    mm, txt = np.flatnonzero(ds.multimodal), np.flatnonzero(~ds.multimodal)
    pick = np.array([mm[0], txt[0], mm[1], mm[2], txt[1], mm[3], txt[2], txt[3], mm[4]])
    sub = ds.subset(pick)
    preds = _argmax_by_sample(tiny_vlm["model"], sub)
    right = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0], bool)
    # A wrong answer is any other token id (it need not be a word of the vocabulary).
    sub = replace(sub, answer=np.where(right, preds, preds + 1).astype(np.int64))
    return sub, preds, right


@pytest.mark.parametrize("order", ["file", "permuted", "reversed"])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_evaluate_scores_each_sample_against_its_answer(tiny_vlm, handful, order, batch_size):
    sub, preds, right = handful
    perm = {
        "file": np.arange(len(sub)),
        "permuted": np.random.default_rng(3).permutation(len(sub)),
        "reversed": np.arange(len(sub))[::-1],
    }[order]
    ds = sub.subset(perm)
    res = evaluate(OrtRunner(tiny_vlm["model"]), ds, batch_size=batch_size)
    assert res.predictions is not None
    np.testing.assert_array_equal(res.predictions, preds[perm])
    mm = ds.multimodal
    ok = right[perm]
    assert (res.overall.n, res.overall.correct) == (len(ds), int(ok.sum()))
    assert (res.multimodal.n, res.multimodal.correct) == (int(mm.sum()), int(ok[mm].sum()))
    assert (res.text_only.n, res.text_only.correct) == (int((~mm).sum()), int(ok[~mm].sum()))
    assert res.overall.accuracy == pytest.approx(ok.mean())
    assert ds.family is not None
    for code in np.unique(ds.family):
        split = res.families[ds.families[code]]
        here = ds.family == code
        assert (split.n, split.correct) == (int(here.sum()), int(ok[here].sum()))
