"""measure-sensitivity on the tiny digits-vlm: δ by hand, modality masking, cache, workers."""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import TEXT, VISION
from modec.errors import ModecError
from modec.executor import Executor
from modec.mode.sensitivity import choose_subset, kl_divergence, kl_positions, log_softmax
from modec.moe.reference import Replacement
from modec.numerics.quant import quantize_rtn
from modec.numerics.schemes import QuantScheme

OPTS = "measure-sensitivity{samples=6,batch_size=4}"


@pytest.fixture(scope="module")
def measured(analysed):
    return analysed(OPTS)


def _rtn(p, e, bits):
    scheme = QuantScheme(bits, 128)
    return {
        proj: quantize_rtn(w[e], scheme).dequantize()
        for proj in ("gate", "up", "down")
        if (w := getattr(p, proj)) is not None
    }


def test_shape_sign_and_bits(measured):
    _, ctx = measured
    s = ctx.artifacts["sensitivity"]
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
    s = ctx.artifacts["sensitivity"]
    ds = ctx.artifacts["calib.data"]
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
            pos = kl_positions(mod, "answer")
            n_pos += int(pos.sum())
            ref = log_softmax(ex.run(feeds).outputs[ex.output_names[0]][pos])
            for m in (TEXT, VISION):
                rep = Replacement(expert, mod.ravel() == m, **w)
                out = ex.run(feeds, replace={layer: rep}).outputs[ex.output_names[0]]
                total[m] += float(kl_divergence(ref, out[pos]).sum())
    assert s.delta_text[layer, expert, 0] == pytest.approx(total[TEXT] / n_pos, rel=1e-5)
    assert s.delta_vision[layer, expert, 0] == pytest.approx(total[VISION] / n_pos, rel=1e-5)
    assert s.delta_vision[layer, expert, 0] > 0


def test_vision_only_replacement_leaves_text_only_samples(measured):
    model, ctx = measured
    ds = ctx.artifacts["calib.data"]
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
    a, b = first.artifacts["sensitivity"], second.artifacts["sensitivity"]
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
        again.artifacts["sensitivity"].delta_text, measured[1].artifacts["sensitivity"].delta_text
    )


def test_two_workers_equal_one(analysed, measured):
    _, par = analysed("measure-sensitivity{samples=6,batch_size=4,workers=2}")
    a, b = measured[1].artifacts["sensitivity"], par.artifacts["sensitivity"]
    np.testing.assert_array_equal(a.delta_text, b.delta_text)
    np.testing.assert_array_equal(a.delta_vision, b.delta_vision)


def test_subset_is_proportional_and_seeded():
    mm = np.array([True] * 90 + [False] * 10)
    idx = choose_subset(mm, 20, seed=0)
    assert len(idx) == 20 and (~mm[idx]).sum() == 2
    assert (idx == choose_subset(mm, 20, seed=0)).all()
    assert not (idx == choose_subset(mm, 20, seed=1)).all()
    assert (~mm[choose_subset(mm, 2, seed=0)]).sum() == 1  # text-only always represented


def test_kl():
    ref = log_softmax(np.array([[1.0, 2.0, 3.0]]))
    assert kl_divergence(ref, np.array([[1.0, 2.0, 3.0]]))[0] == 0.0
    assert kl_divergence(ref, np.array([[11.0, 12.0, 13.0]]))[0] == pytest.approx(0, abs=1e-12)
    q = np.array([[3.0, 2.0, 1.0]])
    p = np.exp(ref[0])
    want = float((p * (ref[0] - log_softmax(q)[0])).sum())
    assert kl_divergence(ref, q)[0] == pytest.approx(want) and want > 0


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
