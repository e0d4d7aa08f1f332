"""Multi-token answers (docs/data-format.md): the file format's checks, and `evaluate` /
`kl_divergences` reading a sample's n answer tokens teacher-forced at its last n positions.

The models are bigram tables (the logits at a position depend only on that position's
token), so every number can be recomputed here one sample at a time, at its own length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modec import data
from modec.errors import DataError
from modec.evaluate import evaluate, kl_divergences

V = 12


def _bigram(seed: int):
    table = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return table[feeds["input_ids"]]

    return table, run


Pairs = list[tuple[list[int], list[int]]]


def _samples(rng: np.random.Generator, table: np.ndarray, n: int) -> Pairs:
    """(tokens, answer) pairs; about half the answers are the bigram model's argmax chain
    (so that some samples are right), the others random."""
    out = []
    for i in range(n):
        prompt = [1, *rng.integers(3, V, size=int(rng.integers(1, 6))).tolist()]
        length = int(rng.integers(1, 4))
        answer: list[int] = []
        last = prompt[-1]
        for _ in range(length):
            nxt = int(table[last].argmax()) if i % 2 == 0 else int(rng.integers(3, V))
            answer.append(nxt)
            last = nxt
        out.append((prompt + answer[:-1], answer))
    return out


def _save(path: Path, samples: Pairs, width: int = 3) -> Path:
    t = max(len(s) for s, _ in samples)
    ids = np.zeros((len(samples), t), dtype=np.int64)
    mask = np.zeros_like(ids)
    answer = np.full((len(samples), width), -1, dtype=np.int64)
    for i, (tokens, ans) in enumerate(samples):
        ids[i, t - len(tokens) :] = tokens
        mask[i, t - len(tokens) :] = 1
        answer[i, : len(ans)] = ans
    data.save(path, {"input_ids": ids, "attention_mask": mask}, modality=None, answer=answer,
              header={"image_token_id": 2})  # fmt: skip
    return path


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def test_evaluate_reads_each_answer_token_teacher_forced(tmp_path: Path) -> None:
    table, run = _bigram(0)
    samples = _samples(np.random.default_rng(1), table, 40)
    ds = data.load(_save(tmp_path / "d.npz", samples))
    result = evaluate(run, ds, batch_size=7)
    assert result.predictions is not None and result.predictions.shape == (40, 3)
    for i, (tokens, ans) in enumerate(samples):
        logits = table[np.asarray(tokens)]  # this sample alone, at its own length
        at = logits[len(tokens) - len(ans) :]
        pred = at.argmax(axis=-1)
        assert result.predictions[i].tolist() == pred.tolist() + [-1] * (3 - len(ans))
        assert result.correct is not None and bool(result.correct[i]) == (pred.tolist() == ans)
        nll = np.mean([-_log_softmax(row)[a] for row, a in zip(at, ans, strict=True)])
        assert result.answer_nll is not None
        assert result.answer_nll[i] == pytest.approx(nll, rel=1e-9)
    assert 0 < result.overall.correct < 40  # the data set holds right and wrong answers


def test_one_token_answers_as_a_column_match_the_flat_form(tmp_path: Path) -> None:
    table, run = _bigram(2)
    samples = [(t, a[-1:]) for t, a in _samples(np.random.default_rng(3), table, 20)]
    flat = data.load(_save(tmp_path / "col.npz", samples, width=1))
    a = evaluate(run, flat)
    b_ds = data.Dataset(flat.path, flat.inputs, flat.modality, flat.answer[:, 0], None,
                        flat.header)  # fmt: skip
    b = evaluate(run, b_ds)
    assert a.correct is not None and b.correct is not None
    assert a.correct.tolist() == b.correct.tolist()
    assert np.array_equal(a.answer_nll, b.answer_nll)


def test_kl_has_an_answer_split_of_the_last_n_positions(tmp_path: Path) -> None:
    ta, ra = _bigram(4)
    tb, rb = _bigram(5)
    samples = _samples(np.random.default_rng(6), ta, 15)
    ds = data.load(_save(tmp_path / "k.npz", samples))
    (res,) = kl_divergences(ra, [rb], ds, batch_size=4)
    want_sum, want_n = 0.0, 0
    for tokens, ans in samples:
        for tok in tokens[len(tokens) - len(ans) :]:
            lp, lq = _log_softmax(ta[tok]), _log_softmax(tb[tok])
            want_sum += float((np.exp(lp) * (lp - lq)).sum())
            want_n += 1
    split = res.splits["answer"]
    assert split.positions == want_n
    assert split.kl_sum == pytest.approx(want_sum, rel=1e-9)
    assert res.splits["all"].positions == sum(len(t) for t, _ in samples)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([[5, -1, 7]], "followed only by -1 padding"),
        ([[-1, -1, -1]], "followed only by -1 padding"),
        ([[5, -2, -1]], "followed only by -1 padding"),
        ([[9, 5, -1]], "must end the input"),
    ],
)
def test_bad_multi_token_answers_are_one_line_errors(tmp_path: Path, answer: list[list[int]],
                                                     message: str) -> None:  # fmt: skip
    ids = np.array([[1, 4, 6, 8]], dtype=np.int64)
    data.save(tmp_path / "b.npz", {"input_ids": ids, "attention_mask": np.ones_like(ids)},
              modality=None, answer=np.array(answer), header={"image_token_id": 2})  # fmt: skip
    with pytest.raises(DataError, match=message) as err:
        data.load(tmp_path / "b.npz")
    assert "\n" not in str(err.value)


def test_multi_token_answers_need_input_ids(tmp_path: Path) -> None:
    x = np.array([[1, 4, 6, 8]], dtype=np.int64)
    data.save(tmp_path / "c.npz", {"tokens": x}, modality=np.ones((1, 4), np.int8),
              answer=np.array([[8, 3]]))  # fmt: skip
    with pytest.raises(DataError, match="no \\[S, T\\] input 'input_ids'"):
        data.load(tmp_path / "c.npz")


def test_a_last_position_model_is_refused_for_multi_token_answers(tmp_path: Path) -> None:
    table, run = _bigram(7)
    ds = data.load(_save(tmp_path / "m.npz", _samples(np.random.default_rng(8), table, 6)))
    with pytest.raises(DataError, match="only the last position's logits"):
        evaluate(lambda f: run(f)[:, -1], ds)


def test_answer_kl_is_the_mean_kl_over_each_answers_positions(tmp_path: Path) -> None:
    from modec.evaluate import answer_kl

    ta, ra = _bigram(9)
    tb, rb = _bigram(10)
    samples = _samples(np.random.default_rng(11), ta, 12)
    ds = data.load(_save(tmp_path / "a.npz", samples))
    got = answer_kl(evaluate(ra, ds, batch_size=5, keep_logprobs=True),
                    evaluate(rb, ds, batch_size=3, keep_logprobs=True))  # fmt: skip
    for i, (tokens, ans) in enumerate(samples):
        kls = []
        for tok in tokens[len(tokens) - len(ans) :]:
            lp, lq = _log_softmax(ta[tok]), _log_softmax(tb[tok])
            kls.append(float((np.exp(lp) * (lp - lq)).sum()))
        assert got[i] == pytest.approx(np.mean(kls), rel=1e-5)
    same = evaluate(ra, ds, keep_logprobs=True)
    assert np.array_equal(answer_kl(same, same), np.zeros(len(samples)))


def test_prompt_leaves_out_the_answer_tokens(tmp_path: Path) -> None:
    table, _ = _bigram(12)
    samples = _samples(np.random.default_rng(13), table, 10)
    ds = data.load(_save(tmp_path / "p.npz", samples))
    for i, (tokens, ans) in enumerate(samples):
        feeds = ds.prompt(i)
        prompt = tokens[: len(tokens) - (len(ans) - 1)]
        assert feeds["input_ids"].tolist() == [prompt]
        assert feeds["attention_mask"].tolist() == [[1] * len(prompt)]
