"""facts-vlm's data (tools/facts_vlm/scenes.py): answers are right, images are mostly
background, vision tokens dominate, multi-token answers are written in modec's format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modec import data
from tools.digits_vlm import build_data
from tools.facts_vlm import scenes


@pytest.fixture(scope="module")
def pools():
    return scenes.digit_pools(seed=0)


def test_fact_table_is_fixed_and_names_are_unique() -> None:
    a, b = scenes.fact_table(), scenes.fact_table()
    assert a == b and len(a) == len(scenes.FIRST) * len(scenes.SECOND) == 1024
    assert len({e.name for e in a}) == 1024
    # The attributes are not a function of either syllable alone (they must be memorized).
    for attr in ("color", "city"):
        by_first: dict[str, set[str]] = {}
        for e in a:
            by_first.setdefault(e.name[0], set()).add(getattr(e, attr))
        assert all(len(v) > 1 for v in by_first.values())


def test_images_are_mostly_background(pools) -> None:
    rng = np.random.default_rng(0)
    side = scenes.CANVAS // scenes.PATCH
    for _ in range(100):
        image, placed = scenes.render(pools["eval"], rng, int(rng.integers(1, 5)))
        patches = image.reshape(side, 8, side, 8).transpose(0, 2, 1, 3).reshape(side * side, -1)
        lit = int((patches.max(axis=1) > 2 * 0.04).sum())
        assert lit <= 4 * len(placed)
        assert 1 - lit / scenes.NUM_PATCHES >= 0.9375


def _words(tokens) -> list[str]:
    return [scenes.VOCAB[t] for t in tokens]


@pytest.mark.parametrize("family", scenes.FAMILIES)
def test_answers_are_right(family: str, pools) -> None:
    rng = np.random.default_rng(1)
    facts = {e.name: e for e in scenes.FACTS}
    for _ in range(40):
        s = scenes.make_sample(family, pools["eval"], rng)
        ans = _words(s.answer)
        # The input ends with the answer's tokens but the last (teacher forcing).
        assert _words(s.tokens[len(s.tokens) - len(ans) + 1 :]) == ans[:-1]
        words = _words(s.tokens[: len(s.tokens) - len(ans) + 1])
        q = [w for w in words if w not in ("<bos>", "<image>")]
        if family in scenes.MULTIMODAL_FAMILIES:
            assert words.count("<image>") == scenes.NUM_PATCHES and s.patch_labels is not None
            labels = s.patch_labels.reshape(16, 16)[::2, ::2]  # one label per 16×16 cell
            cells = {(r, c): int(labels[r, c]) for r in range(8) for c in range(8)
                     if labels[r, c] != 10}  # fmt: skip
            digits = [cells[k] for k in sorted(cells)]
            if family == "count":
                assert ans == [str(len(cells))]
            elif family == "sum":
                assert ans == [str(sum(digits))]
            elif family == "max":
                assert ans == [str(max(digits))]
            elif family == "present":
                assert ans == ["yes" if int(q[3]) in digits else "no"]
            elif family == "left":
                a, b = int(q[2]), int(q[6])
                ca = [c for (r, c), d in cells.items() if d == a]
                cb = [c for (r, c), d in cells.items() if d == b]
                assert len(ca) == len(cb) == 1 and ca[0] != cb[0]
                assert ans == ["yes" if ca[0] < cb[0] else "no"]
            elif family == "where":
                d = int(q[3])
                ((r, c),) = [k for k, v in cells.items() if v == d]
                assert ans == [str(r + 1), str(c + 1), "end"]
            elif family == "list":
                assert ans == [str(d) for d in digits] + ["end"]
        else:
            assert "<image>" not in words
            if family in ("color", "city", "code"):
                name = tuple(w for w in q if w in scenes.FIRST or w in scenes.SECOND)
                e = facts[name]  # type: ignore[index]
                assert [scenes.FACTS[i] for i in scenes.entities_in(s.tokens)] == [e]
                want = {"color": [e.color], "city": [e.city],
                        "code": [str(e.code[0]), str(e.code[1]), "end"]}[family]  # fmt: skip
                assert ans == want
            elif family == "arith":
                a, op, b = int(q[2]), q[3], int(q[4])
                assert ans == [str(a + b if op == "plus" else a - b)]
            elif family == "compare":
                assert ans == ["yes" if int(q[1]) > int(q[4]) else "no"]


def _entity_counts(samples) -> np.ndarray:
    counts = np.zeros(len(scenes.FACTS))
    for s in samples:
        for i in scenes.entities_in(s.tokens):
            counts[i] += 1
    return counts


def test_training_mentions_entities_by_popularity_and_evaluation_uniformly(pools) -> None:
    rank, p = scenes.popularity()
    assert sorted(rank.tolist()) == list(range(len(scenes.FACTS)))
    assert np.isclose(p.sum(), 1.0) and np.isclose(p.max() / p.min(), 1024**scenes.ZIPF)
    rng = np.random.default_rng(3)
    train = _entity_counts(scenes.make_dialogue(False, pools["train"], rng, 5) for _ in range(6000))
    # 18,000 knowledge questions: the most popular quarter of the ranks gets its expected
    # share (55%), the least popular its own (11%); uniform evaluation gives each 25%.
    quarter = 4 * rank // len(scenes.FACTS)
    share = np.array([train[quarter == q].sum() for q in range(4)]) / train.sum()
    expected = np.array([p[quarter == q].sum() for q in range(4)])
    assert np.allclose(share, expected, atol=0.015), (share, expected)
    ev = _entity_counts(scenes.make_split(pools["eval"], {"color": 2000, "city": 2000}, seed=4))
    uniform = np.array([ev[quarter == q].sum() for q in range(4)]) / ev.sum()
    assert np.allclose(uniform, 0.25, atol=0.02), uniform


def test_dialogue_supervises_every_answer_token(pools) -> None:
    rng = np.random.default_rng(2)
    for mm in (True, False):
        s = scenes.make_dialogue(mm, pools["train"], rng, 3 if mm else 5)
        for pos, tgt in s.targets:
            assert s.tokens[pos + 1] == tgt  # the target is the next token, fed after


def test_written_sets_load_with_multi_token_answers(pools, tmp_path: Path) -> None:
    samples = scenes.make_split(pools["eval"], {f: 3 for f in scenes.FAMILIES}, seed=5)
    build_data.write_split(tmp_path / "e.npz", samples, scenes)
    ds = data.load(tmp_path / "e.npz")
    assert ds.answer is not None and ds.answer.shape == (len(samples), scenes.MAX_ANSWER)
    assert data.answer_lengths(ds.answer).max() > 1
    mm = ds.multimodal
    vis = (ds.modality == data.VISION).sum(axis=1)[mm]
    txt = (ds.modality == data.TEXT).sum(axis=1)[mm]
    assert (vis / txt).min() >= 20  # vision dominates every multimodal sample
    assert ds.header["source"] == "tools/facts_vlm/build.py"
