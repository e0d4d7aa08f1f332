"""measure-sensitivity on the tiny digits-vlm: δ by hand, modality masking, cache.

The engines (chunks in process or on Ray) are tested in tests/distributed.

The references build their own log-softmax and KL in float64 (`_log_softmax`, `_kl`); only
the subset choice (`choose_subset`, tested on its own below) and RTN (tests/numerics) come
from modec.
"""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import PAD, TEXT, VISION
from modec.errors import ModecError
from modec.executor import Executor
from modec.facts import Calibration, Sensitivity
from modec.method.sensitivity import choose_subset, kl_divergence, log_softmax
from modec.moe.reference import Replacement
from modec.numerics.quant import quantize_rtn
from modec.numerics.schemes import QuantScheme

OPTS = "measure-sensitivity{samples=6,batch_size=4}"


@pytest.fixture(scope="module")
def measured(analysed):
    return analysed(OPTS)


def _log_softmax(x):
    """log p over the last axis in float64, written out (max-shifted for stability)."""
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _kl(ref_logits, logits):
    """KL(p_ref ‖ p) per row: Σ p_ref · (log p_ref − log p)."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _rtn(p, e, bits):
    scheme = QuantScheme(bits, 128)
    return {
        proj: quantize_rtn(w[e], scheme).dequantize()
        for proj in ("gate", "up", "down")
        if (w := getattr(p, proj)) is not None
    }


def test_shape_sign_and_bits(measured):
    _, ctx = measured
    s = ctx.facts.get(Sensitivity)
    assert s.bits == (2, 3, 4) and s.samples == 6
    assert s.delta_text.shape == s.delta_vision.shape == (2, 4, 3)
    assert (s.delta_text >= 0).all() and (s.delta_vision >= 0).all()
    # Coarser widths hurt more, summed over the experts of a layer.
    assert (s.delta_text.sum(1)[:, 0] > s.delta_text.sum(1)[:, 2]).all()
    assert s.delta_vision[0, :, 0].sum() > s.delta_vision[0, :, 2].sum()
    # The last MoE layer is the model's last mixing step: what it does to vision tokens never
    # reaches the answer position, so δ_vision is exactly 0 there (measured, not assumed).
    assert (s.delta_vision[1] == 0).all() and not s.unused_vision[1].all()
    assert (s.delta_text[~s.unused_text] > 0).any()
    assert (s.delta_text[s.unused_text] == 0).all()
    assert (s.delta_vision[s.unused_vision] == 0).all()


def test_delta_matches_a_full_rerun(measured):
    """One expert's δ recomputed with whole-model runs (no layer cache, no skipped batches)."""
    model, ctx = measured
    s = ctx.facts.get(Sensitivity)
    ds = ctx.facts.get(Calibration).data
    sub = ds.subset(choose_subset(ds.multimodal, 6, 0))
    ex = Executor(model)
    layer, expert = 0, int(np.argmax(s.delta_vision[0, :, 0]))
    w = _rtn(ex.params[layer], expert, 2)
    total = {TEXT: 0.0, VISION: 0.0}
    n_pos = 0
    for group in (np.flatnonzero(sub.multimodal), np.flatnonzero(~sub.multimodal)):
        part = sub.subset(group)
        for idx, feeds in part.batches(4):
            mod = part.trimmed_modality(idx)
            pos = mod[:, -1] != PAD  # left padding: every sample's answer is last
            n_pos += int(pos.sum())
            ref = ex.run(feeds).outputs[ex.output_names[0]][pos, -1]
            for m in (TEXT, VISION):
                rep = Replacement(expert, mod.ravel() == m, **w)
                out = ex.run(feeds, replace={layer: rep}).outputs[ex.output_names[0]]
                total[m] += float(_kl(ref, out[pos, -1]).sum())
    assert s.delta_text[layer, expert, 0] == pytest.approx(total[TEXT] / n_pos, rel=1e-5)
    assert s.delta_vision[layer, expert, 0] == pytest.approx(total[VISION] / n_pos, rel=1e-5)
    assert s.delta_vision[layer, expert, 0] > 0


@pytest.fixture(scope="module")
def small(analysed):
    return analysed("measure-sensitivity{samples=4,bits=2:4}")


def test_every_delta_matches_the_paper_formula(small):
    """δ_M(e, b) of every expert of both layers, both widths, both modalities, from MODE §3.2.

    Reference: each sample of the subset runs alone (its own length, no padding); the fp32
    and the perturbed logits at its answer position (the last one) give KL(p_fp32 ‖ p_quant)
    with this file's own log-softmax; only expert e of layer l is RTN-quantized (gate, up,
    down) and only the tokens of modality M use the quantized weights; δ = Σ KL / the number
    of answer positions in the subset.
    """
    model, ctx = small
    s = ctx.facts.get(Sensitivity)
    ds = ctx.facts.get(Calibration).data
    sub = ds.subset(choose_subset(ds.multimodal, 4, ctx.options.seed))
    assert s.bits == (2, 4) and s.samples == 4 == len(sub)
    assert 0 < sub.multimodal.sum() < 4  # both kinds of sample are in the subset
    ex = Executor(model)
    out = ex.output_names[0]
    n_layers, n_exp = len(ex.params), ex.params[0].num_experts
    want = {TEXT: np.zeros((n_layers, n_exp, 2)), VISION: np.zeros((n_layers, n_exp, 2))}
    weights = {
        (layer, e, j): _rtn(ex.params[layer], e, b)
        for layer in range(n_layers) for e in range(n_exp) for j, b in enumerate(s.bits)
    }  # fmt: skip
    t_full = sub.modality.shape[1]
    for i in range(len(sub)):
        real = sub.modality[i] != PAD
        feeds = {
            k: (a[i : i + 1][:, real] if a.ndim == 2 and a.shape[1] == t_full else a[i : i + 1])
            for k, a in sub.inputs.items()
        }
        mod = sub.modality[i][real]
        ref = ex.run(feeds).outputs[out][:, -1]
        for (layer, e, j), w in weights.items():
            for m in (TEXT, VISION):
                if not (mod == m).any():
                    continue  # nothing of modality m to quantize for: KL 0
                rep = Replacement(e, mod == m, **w)
                got = ex.run(feeds, replace={layer: rep}).outputs[out][:, -1]
                want[m][layer, e, j] += float(_kl(ref, got).sum())
    for m in want:
        want[m] /= len(sub)  # one answer position per sample
    # Not vacuous: text moves the answer through both layers, vision through the first.
    assert (want[TEXT][0] > 0).any() and (want[TEXT][1] > 0).any()
    assert (want[VISION][0] > 0).any()
    np.testing.assert_allclose(s.delta_text, want[TEXT], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(s.delta_vision, want[VISION], rtol=1e-4, atol=1e-12)


def test_vision_only_replacement_leaves_text_only_samples(measured):
    model, ctx = measured
    ds = ctx.facts.get(Calibration).data
    text_only = ds.subset(np.flatnonzero(~ds.multimodal)[:4])
    ex = Executor(model)
    w = _rtn(ex.params[0], 0, 2)
    for idx, feeds in text_only.batches(4):
        mod = text_only.trimmed_modality(idx).ravel()
        assert not (mod == VISION).any()
        ref = ex.run(feeds).outputs[ex.output_names[0]]
        vis = ex.run(feeds, replace={0: Replacement(0, mod == VISION, **w)})
        np.testing.assert_array_equal(vis.outputs[ex.output_names[0]], ref)
        txt = ex.run(feeds, replace={0: Replacement(0, mod == TEXT, **w)})
        assert not np.array_equal(txt.outputs[ex.output_names[0]], ref)


def test_cache_hit_is_identical(analysed, tmp_path):
    _, first = analysed(OPTS, cache_dir=str(tmp_path))
    _, second = analysed(OPTS, cache_dir=str(tmp_path))
    assert first.report["measure-sensitivity"]["cache_hit"] is False
    assert second.report["measure-sensitivity"]["cache_hit"] is True
    a, b = first.facts.get(Sensitivity), second.facts.get(Sensitivity)
    np.testing.assert_array_equal(a.delta_text, b.delta_text)
    np.testing.assert_array_equal(a.delta_vision, b.delta_vision)
    np.testing.assert_array_equal(a.unused_text, b.unused_text)
    assert len(list(tmp_path.glob("sensitivity-*.npz"))) == 1
    # Other options are another entry, never a stale hit.
    _, other = analysed("measure-sensitivity{samples=5,batch_size=4}", cache_dir=str(tmp_path))
    assert other.report["measure-sensitivity"]["cache_hit"] is False
    assert len(list(tmp_path.glob("sensitivity-*.npz"))) == 2


def test_corrupt_cache_entry_is_recomputed(analysed, tmp_path, measured):
    analysed(OPTS, cache_dir=str(tmp_path))
    entry = next(tmp_path.glob("sensitivity-*.npz"))
    entry.write_bytes(b"not an npz")
    _, again = analysed(OPTS, cache_dir=str(tmp_path))
    assert again.report["measure-sensitivity"]["cache_hit"] is False
    np.testing.assert_array_equal(
        again.facts.get(Sensitivity).delta_text, measured[1].facts.get(Sensitivity).delta_text
    )


def test_subset_is_proportional_and_seeded():
    mm = np.array([True] * 90 + [False] * 10)
    idx = choose_subset(mm, 20, seed=0)
    assert len(idx) == 20 and (~mm[idx]).sum() == 2
    assert (idx == choose_subset(mm, 20, seed=0)).all()
    assert not (idx == choose_subset(mm, 20, seed=1)).all()
    assert (~mm[choose_subset(mm, 2, seed=0)]).sum() == 1  # text-only always represented


def test_kl():
    ref = log_softmax(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(ref, _log_softmax([[1.0, 2.0, 3.0]]), rtol=1e-15)
    assert kl_divergence(ref, np.array([[1.0, 2.0, 3.0]]))[0] == 0.0
    assert kl_divergence(ref, np.array([[11.0, 12.0, 13.0]]))[0] == pytest.approx(0, abs=1e-12)
    q = np.array([[3.0, 2.0, 1.0]])
    # By hand: p = softmax(1, 2, 3), KL(p ‖ reversed p) = (p3 − p1)·(3 − 1) = 2·(p3 − p1).
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    want = 2.0 * (p[2] - p[0])
    assert kl_divergence(ref, q)[0] == pytest.approx(want, rel=1e-12) and want > 0
    assert _kl([[1.0, 2.0, 3.0]], q)[0] == pytest.approx(want, rel=1e-12)
    # Large logits: the shift keeps it finite, as in the reference.
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(kl_divergence(log_softmax(big), big[:, ::-1])).all()


@pytest.mark.parametrize(
    "text, match",
    [
        ("measure-sensitivity{bits=9}", "bit width 9"),
        ("measure-sensitivity{samples=0}", "at least 1"),
        ("measure-sensitivity{positions=all}", "positions: bad value 'all'"),
    ],
)
def test_bad_options(analysed, text, match):
    with pytest.raises(ModecError, match=match):
        analysed(text)


def test_the_removed_workers_option_names_what_replaced_it():
    from modec.errors import UsageError
    from modec.pipeline import Pipeline

    with pytest.raises(
        UsageError, match="option 'workers' was removed: give `modec compile --workers N`"
    ):
        Pipeline.parse("measure-sensitivity{samples=4,workers=2}")
