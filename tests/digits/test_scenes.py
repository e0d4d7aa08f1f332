"""The digit-scenes dataset has the properties MODE's evaluation relies on."""

from __future__ import annotations

import numpy as np
import pytest

from modec import data
from tools.digits_vlm import build_data, scenes


@pytest.fixture(scope="module")
def pools():
    return scenes.digit_pools(seed=0)


def test_pools_are_disjoint_and_cover_every_digit(pools):
    flat = {k: {p.tobytes() for p in v.images} for k, v in pools.items()}
    assert not flat["train"] & flat["eval"]
    assert not flat["calib"] & flat["eval"]
    assert not flat["train"] & flat["calib"]
    for pool in pools.values():
        assert set(pool.labels.tolist()) == set(range(10))


def test_images_are_mostly_background(pools):
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(200):
        image, placed = scenes.render(pools["eval"], rng, int(rng.integers(1, 4)))
        patches = image.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, -1)
        digit_patches = (patches.max(axis=1) > 2 * scenes.NOISE).sum()
        assert digit_patches <= 4 * len(placed)
        shares.append(1 - digit_patches / 64)
    assert min(shares) >= 0.80  # at least 70% background is the requirement


@pytest.mark.parametrize("family", scenes.FAMILIES)
def test_answers_are_right(family, pools):
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = scenes.make_sample(family, pools["eval"], rng)
        words = [scenes.VOCAB[t] for t in s.tokens if t not in (scenes.BOS_ID, scenes.IMAGE_ID)]
        answer = scenes.VOCAB[s.answer]
        assert len(words) <= scenes.MAX_QUESTION
        if family in scenes.TEXT_FAMILIES:
            assert s.image is None and scenes.IMAGE_ID not in s.tokens
            nums = [int(w) for w in words if w.isdigit()]
            if family == "arith":
                want = nums[0] + nums[1] if "plus" in words else nums[0] - nums[1]
                assert answer == str(want)
            elif family == "compare":
                assert answer == ("yes" if nums[0] > nums[1] else "no")
            elif family == "succ":
                assert answer == str(nums[0] + 1 if "after" in words else nums[0] - 1)
            else:
                even = nums[0] % 2 == 0
                assert answer == ("yes" if even == ("even" in words) else "no")
        else:
            assert s.image is not None
            assert s.tokens.count(scenes.IMAGE_ID) == scenes.NUM_PATCHES
            # at least 5x more vision tokens than text tokens
            assert 5 * (len(s.tokens) - scenes.NUM_PATCHES) <= scenes.NUM_PATCHES


def test_split_files_are_deterministic_and_balanced(tmp_path):
    a = build_data.build(tmp_path / "a", seed=0)
    b = build_data.build(tmp_path / "b", seed=0)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    ev = data.load(a["eval"])
    assert len(ev) >= 2000
    counts = np.bincount(ev.family, minlength=len(scenes.FAMILIES))
    assert (counts == counts[0]).all()
    cal = data.load(a["calib"])
    assert len(cal) == 128
    assert 0.5 < cal.multimodal.mean() < 1.0  # mostly multimodal, some text-only
    # modality mask agrees with the image token id
    derived = data.derive_modality(
        ev.inputs["input_ids"], scenes.IMAGE_ID, ev.inputs["attention_mask"]
    )
    np.testing.assert_array_equal(derived, ev.modality)
    mm = ev.multimodal
    assert (ev.inputs["pixel_values"][~mm] == 0).all()
