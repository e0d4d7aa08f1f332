"""KL arithmetic of δ (MODE §3.2) against a written-out float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import PAD, TEXT, VISION
from modec.method.sensitivity import kl_divergence, kl_positions, log_softmax


def _kl(p_logits, q_logits):
    """KL(p ‖ q) = Σ_i p_i · log(p_i / q_i), with p, q softmaxes, one row at a time."""
    out = []
    for a, b in zip(np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64),
                    strict=True):  # fmt: skip
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        q = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        out.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))
    return np.array(out)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_kl_matches_the_definition(scale):
    rng = np.random.default_rng(int(scale * 10))
    ref = rng.normal(size=(7, 11)) * scale
    pert = ref + rng.normal(size=ref.shape) * 0.05 * scale
    got = kl_divergence(log_softmax(ref), pert.astype(np.float32))
    np.testing.assert_allclose(got, _kl(ref, pert.astype(np.float32)), rtol=1e-9, atol=1e-15)
    assert (got >= 0).all()


def test_kl_of_equal_rows_is_zero():
    x = np.random.default_rng(0).normal(size=(4, 9))
    assert (kl_divergence(log_softmax(x), x) == 0).all()


def test_answer_positions_are_last():
    mod = np.array([[PAD, PAD, TEXT, TEXT], [TEXT, VISION, TEXT, TEXT], [PAD, PAD, PAD, PAD]])
    ans = kl_positions(mod, "answer")
    assert ans.tolist() == [[False, False, False, True], [False, False, False, True],
                            [False, False, False, False]]  # fmt: skip
    txt = kl_positions(mod, "text")
    np.testing.assert_array_equal(txt, mod == TEXT)
    # Multi-token answers (n tokens): the last n positions; n = 1 is the default.
    multi = kl_positions(mod, "answer", np.array([2, 3, 1]))
    assert multi.tolist() == [[False, False, True, True], [False, True, True, True],
                              [False, False, False, False]]  # fmt: skip
    assert (kl_positions(mod, "answer", np.ones(3, np.int64)) == ans).all()


def test_sensitivity_cache_key_sees_multi_token_answer_lengths():
    import onnx_ir as ir

    from modec.cache import content_key
    from modec.data import Dataset

    ids = np.array([[1, 4, 5, 6]], np.int64)
    model = ir.Model(ir.Graph([], [], nodes=[], name="g"), ir_version=10)
    base = Dataset("d", {"input_ids": ids}, np.full((1, 4), TEXT, np.int8))
    one = Dataset("d", {"input_ids": ids}, base.modality, np.array([7]))
    two = Dataset("d", {"input_ids": ids}, base.modality, np.array([[6, 7, -1]]))
    three = Dataset("d", {"input_ids": ids}, base.modality, np.array([[5, 6, 7]]))
    keys = [content_key("sensitivity", model, d, {}) for d in (base, one, two, three)]
    assert keys[0] == keys[1]  # one-token answers: the key of old caches is unchanged
    assert len({keys[1], keys[2], keys[3]}) == 3
