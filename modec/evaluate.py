"""Accuracy of a model on a modec dataset: overall, multimodal, text-only and per family, each
with a 95% interval; the paired comparison of two models on the same samples; next-token KL
to a reference model. The statistics are `modec.stats`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from modec import stats
from modec.data import Dataset, answer_lengths
from modec.errors import DataError
from modec.stats import Interval

log = logging.getLogger(__name__)

#: Runs one batch of model inputs and returns logits [B, T, V] (or [B, V]).
BatchRunner = Callable[[dict[str, np.ndarray]], np.ndarray]

_NAN = Interval(float("nan"), float("nan"), float("nan"))


@dataclass(frozen=True)
class Resampling:
    """How `modec eval` computes its 95% intervals: bootstrap resamples and their seed."""

    resamples: int = stats.RESAMPLES
    seed: int = stats.SEED

    def mean(self, values: np.ndarray, weights: np.ndarray | None = None) -> Interval:
        """Bootstrap interval of a (weighted) mean over samples; no interval for non-finite
        values (an infinite NLL)."""
        if not len(values):
            return _NAN
        if not np.isfinite(values).all():
            return Interval(float(np.mean(values)), float("nan"), float("nan"))
        return stats.bootstrap_mean_interval(
            values, weights, resamples=self.resamples, seed=self.seed
        )

    def difference(
        self, a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None
    ) -> Interval:
        """Paired bootstrap interval of mean(a) − mean(b) over the same samples."""
        if not len(a):
            return _NAN
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return Interval(float(np.mean(a) - np.mean(b)), float("nan"), float("nan"))
        return stats.paired_bootstrap_difference(
            a, b, weights, resamples=self.resamples, seed=self.seed
        )

    def to_json(self) -> dict[str, object]:
        return {
            "confidence": stats.CONFIDENCE,
            "accuracy": "Wilson score interval",
            "means": "percentile bootstrap over samples",
            "differences": "paired percentile bootstrap over samples (A - B); p: exact "
            "McNemar test on the discordant samples",
            "resamples": self.resamples,
            "seed": self.seed,
        }

    def describe(self) -> str:
        return f"percentile bootstrap over samples, {self.resamples} resamples, seed {self.seed}"


def _pair(iv: Interval | None) -> list[float | None] | None:
    """``[low, high]`` for JSON (NaN as null)."""
    if iv is None:
        return None
    return [None if np.isnan(v) else float(v) for v in (iv.low, iv.high)]


def _num(x: float | None) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


@dataclass(frozen=True)
class Split:
    """Accuracy over one subset of samples."""

    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


class Group(NamedTuple):
    """One row of the accuracy table: its label, JSON key, whether it is a family, the split
    and which samples it holds (None for a result made without per-sample data)."""

    label: str
    key: str
    family: bool
    split: Split
    mask: np.ndarray | None


def _nest(rows: Sequence[tuple[Group, object]]) -> dict[str, object]:
    """``{"overall": …, "multimodal": …, "text_only": …, "families": {name: …}}``."""
    doc: dict[str, object] = {g.key: v for g, v in rows if not g.family}
    doc["families"] = {g.key: v for g, v in rows if g.family}
    return doc


@dataclass(frozen=True)
class EvalResult:
    """Accuracies, and per sample: the predicted token, whether it is right, the answer NLL."""

    overall: Split
    multimodal: Split
    text_only: Split
    families: dict[str, Split] = field(default_factory=dict)
    predictions: np.ndarray | None = None
    #: bool [S]: the prediction is the answer.
    correct: np.ndarray | None = None
    #: float64 [S]: −log p(answer) at the answer position; NaN where the answer id is outside
    #: the model's vocabulary.
    answer_nll: np.ndarray | None = None
    multimodal_mask: np.ndarray | None = None
    family_masks: dict[str, np.ndarray] = field(default_factory=dict)
    #: float32 [S, A, V]: log-softmax at each answer token's position (zeros past a
    #: sample's answer); only with ``evaluate(..., keep_logprobs=True)``.
    answer_logprobs: np.ndarray | None = None
    #: int64 [S]: tokens per answer.
    answer_lengths: np.ndarray | None = None

    def groups(self) -> list[Group]:
        mm = self.multimodal_mask
        rows = [
            Group("overall", "overall", False, self.overall,
                  None if mm is None else np.ones_like(mm)),
            Group("multimodal", "multimodal", False, self.multimodal, mm),
            Group("text-only", "text_only", False, self.text_only, None if mm is None else ~mm),
        ]  # fmt: skip
        rows += [Group(f"  {k}", k, True, v, self.family_masks.get(k))
                 for k, v in self.families.items()]  # fmt: skip
        return rows

    def _nll(self, mask: np.ndarray | None, opts: Resampling) -> Interval | None:
        if self.answer_nll is None or mask is None:
            return None
        x = self.answer_nll[mask]
        return None if np.isnan(x).any() else opts.mean(x)

    def to_json(self, opts: Resampling | None = None) -> dict[str, object]:
        """Counts and accuracies; with ``opts`` also the 95% intervals (accuracy: Wilson;
        answer NLL: bootstrap) and the mean answer NLL of every split."""

        def s(g: Group) -> dict[str, object]:
            doc: dict[str, object] = {**asdict(g.split), "accuracy": g.split.accuracy}
            if opts is not None:
                nll = self._nll(g.mask, opts)
                doc["accuracy_ci95"] = _pair(stats.wilson_interval(g.split.correct, g.split.n))
                doc["answer_nll"] = None if nll is None else _num(nll.estimate)
                doc["answer_nll_ci95"] = _pair(nll)
            return doc

        doc: dict[str, object] = {"samples": self.overall.n}
        doc.update(_nest([(g, s(g)) for g in self.groups()]))
        if opts is not None:
            doc["intervals"] = opts.to_json()
        return doc

    def table(self, opts: Resampling | None = None) -> str:
        """A plain-text table for the terminal; with ``opts`` the 95% intervals too."""
        head = ["split", "accuracy", "correct", "samples"]
        if opts is not None:
            head = ["split", "accuracy", "95% CI", "correct", "samples", "answer NLL", "95% CI"]
        rows = []
        for g in self.groups():
            sp = g.split
            acc = f"{100 * sp.accuracy:.2f}%" if sp.n else "-"
            if opts is None:
                rows.append([g.label, acc, str(sp.correct), str(sp.n)])
                continue
            nll = self._nll(g.mask, opts)
            rows.append([g.label, acc, _ci_pct(stats.wilson_interval(sp.correct, sp.n)),
                         str(sp.correct), str(sp.n), _g(None if nll is None else nll.estimate),
                         _ci_g(nll)])  # fmt: skip
        return _render(head, rows)


@dataclass(frozen=True)
class SplitDifference:
    """Model A − model B on one split, paired by sample."""

    n: int
    accuracy: Interval
    a_only: int
    b_only: int
    mcnemar_p: float
    answer_nll: Interval | None

    def to_json(self) -> dict[str, object]:
        nll = self.answer_nll
        return {
            "n": self.n,
            "accuracy_difference": _num(self.accuracy.estimate),
            "accuracy_difference_ci95": _pair(self.accuracy),
            "a_only_correct": self.a_only,
            "b_only_correct": self.b_only,
            "mcnemar_p": self.mcnemar_p,
            "answer_nll_difference": None if nll is None else _num(nll.estimate),
            "answer_nll_difference_ci95": _pair(nll),
        }


@dataclass(frozen=True)
class Comparison:
    """A − B on every split of the accuracy table."""

    rows: list[tuple[Group, SplitDifference]]

    def to_json(self) -> dict[str, object]:
        return _nest([(g, d.to_json()) for g, d in self.rows])

    def table(self) -> str:
        head = ["split", "Δ accuracy", "95% CI", "A only", "B only", "McNemar p",
                "Δ answer NLL", "95% CI"]  # fmt: skip
        rows = []
        for g, d in self.rows:
            nll = d.answer_nll
            dnll = None if nll is None else nll.estimate
            acc = d.accuracy
            row = [g.label, _pp(acc.estimate), _ci_pp(acc), str(d.a_only), str(d.b_only)]
            rows.append([*row, f"{d.mcnemar_p:.3g}", _g(dnll, "+"), _ci_g(nll, "+")])
        return _render(head, rows)


def compare(a: EvalResult, b: EvalResult, opts: Resampling) -> Comparison:
    """A − B on every split: accuracy (paired bootstrap, exact McNemar p) and answer NLL."""
    if a.correct is None or b.correct is None or a.correct.shape != b.correct.shape:
        raise ValueError("compare needs per-sample results of both models on the same samples")
    groups, other = a.groups(), b.groups()
    for ga, gb in zip(groups, other, strict=False):
        same = ga.mask is not None and gb.mask is not None and np.array_equal(ga.mask, gb.mask)
        if ga.key != gb.key or not same:
            raise ValueError(f"split {ga.key!r}: the two results are not of the same samples")
    if len(groups) != len(other):
        raise ValueError("the two results have different families: not the same samples")
    rows = []
    for g in groups:
        assert g.mask is not None
        ca, cb = a.correct[g.mask], b.correct[g.mask]
        a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
        nll = None
        if a.answer_nll is not None and b.answer_nll is not None:
            na, nb = a.answer_nll[g.mask], b.answer_nll[g.mask]
            if not (np.isnan(na).any() or np.isnan(nb).any()):
                nll = opts.difference(na, nb)
        diff = opts.difference(ca.astype(np.float64), cb.astype(np.float64))
        rows.append((g, SplitDifference(g.split.n, diff, a_only, b_only,
                                        stats.mcnemar_exact_p(a_only, b_only), nll)))  # fmt: skip
    return Comparison(rows)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


def evaluate(
    run: BatchRunner,
    ds: Dataset,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    keep_logprobs: bool = False,
) -> EvalResult:
    """Run every sample and score the argmax at the answer positions against ``answer``.

    A one-token answer is read at the last position. A multi-token answer of n tokens
    (``answer`` [S, A], docs/data-format.md) is read teacher-forced at the last n positions:
    the sample is right when every one of its tokens is the argmax, and its answer NLL is
    the mean −log softmax(logits)[token] over its n tokens (nats per answer token).

    Args:
        run: runs one batch of inputs, returns logits.
        ds: the dataset; it must have answers.
        batch_size: samples per batch. Batches are formed in file order after grouping
            multimodal and text-only samples, so text-only batches stay short.
        progress: called with the number of samples done after each batch.
        keep_logprobs: keep the log-softmax at every answer position (`answer_kl` compares
            two results by it).
    """
    if ds.answer is None:
        raise DataError(f"{ds.path}: missing key 'answer'; an evaluation set needs answers")
    mm = ds.multimodal
    answers = ds.answer if ds.answer.ndim == 2 else ds.answer[:, None]
    lengths = answer_lengths(answers)
    width = answers.shape[1]
    # Group by modality so that the sequences of one batch have similar length.
    order = np.concatenate([np.flatnonzero(mm), np.flatnonzero(~mm)])
    preds = np.full(answers.shape, -1, dtype=np.int64)
    nll = np.full(len(ds), np.nan)
    grouped = ds.subset(order)
    cols = np.arange(width)
    kept: np.ndarray | None = None
    for idx, feeds in grouped.batches(batch_size):
        rows = order[idx]
        logits = np.asarray(run(feeds))
        if logits.ndim == 2:
            if lengths[rows].max() > 1:
                raise DataError(
                    f"{ds.path}: the model returns only the last position's logits, but the "
                    "answers have several tokens; evaluate a model with logits at every position"
                )
            logits = logits[:, None, :]
        n = lengths[rows]
        used = cols[None, :] < n[:, None]  # [B, A]
        # Answer token j of a sample with n tokens is predicted at position T - n + j.
        pos = np.where(used, logits.shape[1] - n[:, None] + cols[None, :], logits.shape[1] - 1)
        at = logits[np.arange(len(idx))[:, None], pos]  # [B, A, V]
        preds[rows] = np.where(used, at.argmax(axis=-1), -1)
        ans = answers[rows]
        known = used & (ans >= 0) & (ans < at.shape[-1])
        lp = _log_softmax(at)
        if keep_logprobs:
            if kept is None:
                kept = np.zeros((len(ds), width, at.shape[-1]), dtype=np.float32)
            kept[rows] = np.where(used[..., None], lp, 0.0)
        tok_nll = -np.take_along_axis(lp, np.where(known, ans, 0)[..., None], axis=-1)[..., 0]
        whole = (known == used).all(axis=1)
        nll[rows[whole]] = (np.where(used, tok_nll, 0.0).sum(axis=1) / n)[whole]
        if progress is not None:
            progress(len(idx))
    if np.isnan(nll).any():
        log.warning("%s: %d answer(s) with ids outside the model's vocabulary; no answer NLL",
                    ds.path, int(np.isnan(nll).sum()))  # fmt: skip
    ok = (preds == answers).all(axis=1)
    if ds.answer.ndim == 1:
        preds = preds[:, 0]

    def split(mask: np.ndarray) -> Split:
        return Split(int(mask.sum()), int(ok[mask].sum()))

    families: dict[str, Split] = {}
    family_masks: dict[str, np.ndarray] = {}
    if ds.family is not None:
        names = ds.families
        for code in np.unique(ds.family):
            name = names[code] if code < len(names) else str(code)
            family_masks[name] = ds.family == code
            families[name] = split(family_masks[name])
    return EvalResult(
        overall=split(np.ones(len(ds), dtype=bool)),
        multimodal=split(mm),
        text_only=split(~mm),
        families=families,
        predictions=preds,
        correct=ok,
        answer_nll=nll,
        multimodal_mask=mm,
        family_masks=family_masks,
        answer_logprobs=kept,
        answer_lengths=lengths,
    )


def answer_kl(reference: EvalResult, model: EvalResult) -> np.ndarray:
    """Per sample, the mean KL(p_reference ‖ p_model) over its answer tokens' positions,
    from two results of `evaluate(..., keep_logprobs=True)` on the same data set."""
    lp, lq = reference.answer_logprobs, model.answer_logprobs
    if lp is None or lq is None or lp.shape != lq.shape or reference.answer_lengths is None:
        raise ValueError("answer_kl needs two evaluate(keep_logprobs=True) results of one data set")
    p = np.exp(lp.astype(np.float64))
    per_pos = np.maximum((p * (lp.astype(np.float64) - lq)).sum(axis=-1), 0.0)  # [S, A]
    return np.asarray(per_pos.sum(axis=1) / reference.answer_lengths)


#: The modality splits of `kl_divergence`: every non-pad position, text, vision; and, when
#: the data set has answers, the positions that predict an answer token.
KL_SPLITS = ("all", "text", "vision")
KL_ANSWER_SPLIT = "answer"


@dataclass(frozen=True)
class Divergence:
    """KL and top-1 agreement summed over the positions of one modality split; per sample
    too (for the intervals, which resample whole samples)."""

    positions: int
    kl_sum: float
    agree: int
    sample_positions: np.ndarray | None = None
    sample_kl: np.ndarray | None = None
    sample_agree: np.ndarray | None = None

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.positions if self.positions else float("nan")

    def _samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.sample_positions is None or self.sample_kl is None or self.sample_agree is None:
            return None
        sel = self.sample_positions > 0
        w = self.sample_positions[sel].astype(np.float64)
        return w, self.sample_kl[sel] / w, self.sample_agree[sel] / w

    def intervals(self, opts: Resampling) -> tuple[Interval, Interval] | None:
        """Mean KL and top-1 agreement per position, bootstrap over samples (each sample
        weighted by its positions)."""
        s = self._samples()
        return None if s is None else (opts.mean(s[1], s[0]), opts.mean(s[2], s[0]))

    def to_json(self, opts: Resampling | None = None) -> dict[str, object]:
        empty = not self.positions
        doc: dict[str, object] = {
            "positions": self.positions,
            "mean_kl": None if empty else self.mean_kl,
            "top1_agreement": None if empty else self.top1_agreement,
        }
        ivs = None if opts is None else self.intervals(opts)
        if ivs is not None:
            doc["mean_kl_ci95"], doc["top1_agreement_ci95"] = _pair(ivs[0]), _pair(ivs[1])
        return doc


@dataclass(frozen=True)
class KLResult:
    """Next-token KL(p_reference ‖ p_model) and top-1 agreement, per modality split."""

    samples: int
    splits: dict[str, Divergence]

    def to_json(self, opts: Resampling | None = None) -> dict[str, object]:
        return {"samples": self.samples,
                **{k: v.to_json(opts) for k, v in self.splits.items()}}  # fmt: skip

    def table(self, opts: Resampling | None = None) -> str:
        head = ["split", "positions", "mean KL", "top-1 agreement"]
        if opts is not None:
            head = ["split", "positions", "mean KL", "95% CI", "top-1 agreement", "95% CI"]
        rows = []
        for name, d in self.splits.items():
            kl = f"{d.mean_kl:.3e}" if d.positions else "-"
            agree = f"{100 * d.top1_agreement:.2f}%" if d.positions else "-"
            ivs = None if opts is None else d.intervals(opts)
            if opts is None:
                rows.append([name, str(d.positions), kl, agree])
            else:
                kl_iv, agree_iv = (None, None) if ivs is None else ivs
                rows.append([name, str(d.positions), kl, _ci_e(kl_iv), agree, _ci_pct(agree_iv)])
        return _render(head, rows)


@dataclass(frozen=True)
class KLComparison:
    """Model A − model B: mean KL and top-1 agreement to the same reference, per split,
    paired by sample (both weighted by the sample's positions)."""

    splits: dict[str, tuple[int, Interval, Interval]]

    def to_json(self) -> dict[str, object]:
        return {
            k: {"positions": n, "mean_kl_difference": _num(kl.estimate),
                "mean_kl_difference_ci95": _pair(kl),
                "top1_agreement_difference": _num(agree.estimate),
                "top1_agreement_difference_ci95": _pair(agree)}
            for k, (n, kl, agree) in self.splits.items()
        }  # fmt: skip

    def table(self) -> str:
        head = ["split", "positions", "Δ mean KL", "95% CI", "Δ top-1 agreement", "95% CI"]
        rows = [[k, str(n), f"{kl.estimate:+.3e}" if n else "-", _ci_e(kl, "+"),
                 _pp(agree.estimate), _ci_pp(agree)]
                for k, (n, kl, agree) in self.splits.items()]  # fmt: skip
        return _render(head, rows)


def compare_kl(a: KLResult, b: KLResult, opts: Resampling) -> KLComparison:
    """A − B of two `KLResult` against the same reference on the same samples."""
    out = {}
    for k, da in a.splits.items():
        sa, sb = da._samples(), b.splits[k]._samples()
        if sa is None or sb is None or sa[0].shape != sb[0].shape:
            raise ValueError("compare_kl needs per-sample results of both models")
        w = sa[0]
        out[k] = (da.positions, opts.difference(sa[1], sb[1], w),
                  opts.difference(sa[2], sb[2], w))  # fmt: skip
    return KLComparison(out)


def kl_divergence(
    reference: BatchRunner,
    model: BatchRunner,
    ds: Dataset,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> KLResult:
    """Mean KL(p_reference ‖ p_model) of the next-token distribution and top-1 agreement.

    Every non-pad position of every sample counts once, split by the dataset's modality mask
    (``all`` = text + vision); where the data set has answers, also the ``answer`` split: the
    positions that predict an answer token (the last n of a sample with an n-token answer).
    No labels are needed. A model that returns only the last
    position's logits ([B, V]) is compared there. Computed in float64, one sample at a time.
    """
    return kl_divergences(reference, [model], ds, batch_size, progress)[0]


def kl_divergences(
    reference: BatchRunner,
    models: Sequence[BatchRunner],
    ds: Dataset,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[KLResult]:
    """`kl_divergence` of several models against one reference, run once per batch."""
    from modec.data import PAD, TEXT, VISION

    names = KL_SPLITS + ((KL_ANSWER_SPLIT,) if ds.answer is not None else ())
    lengths = None if ds.answer is None else answer_lengths(ds.answer)
    shape = (len(models), len(names), len(ds))
    count = np.zeros(shape, dtype=np.int64)
    kl_sum = np.zeros(shape)
    agree_sum = np.zeros(shape, dtype=np.int64)
    for idx, feeds in ds.batches(batch_size):
        ref = np.asarray(reference(feeds))
        mod = ds.trimmed_modality(idx)
        outputs = [np.asarray(model(feeds)) for model in models]
        for got in outputs:
            if ref.shape != got.shape:
                raise DataError(
                    f"{ds.path}: the two models return logits of shapes {list(ref.shape)} and "
                    f"{list(got.shape)}; compare models with the same outputs"
                )
        if ref.ndim == 2:
            ref, mod = ref[:, None, :], mod[:, -1:]
            outputs = [got[:, None, :] for got in outputs]
        for m, got in enumerate(outputs):
            if ref.shape[1] != mod.shape[1]:
                raise DataError(
                    f"{ds.path}: the models return {ref.shape[1]} positions for "
                    f"{mod.shape[1]} tokens; --kl-to needs logits at every position (or only "
                    "the last)"
                )
            for b in range(ref.shape[0]):
                keep = mod[b] != PAD
                if not keep.any():
                    continue
                lp = _log_softmax(ref[b][keep])
                lq = _log_softmax(got[b][keep])
                kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)
                agree = lp.argmax(axis=-1) == lq.argmax(axis=-1)
                mb = mod[b][keep]
                sels = [mb != PAD, mb == TEXT, mb == VISION]
                if lengths is not None:
                    last = np.arange(len(keep)) >= len(keep) - lengths[idx[b]]
                    sels.append(last[keep])
                for s, sel in enumerate(sels):
                    count[m, s, idx[b]] = int(sel.sum())
                    kl_sum[m, s, idx[b]] = float(kl[sel].sum())
                    agree_sum[m, s, idx[b]] = int(agree[sel].sum())
        if progress is not None:
            progress(len(idx))
    return [
        KLResult(samples=len(ds), splits={
            k: Divergence(int(count[m, s].sum()), float(kl_sum[m, s].sum()),
                          int(agree_sum[m, s].sum()), count[m, s], kl_sum[m, s],
                          agree_sum[m, s])
            for s, k in enumerate(names)})
        for m in range(len(models))
    ]  # fmt: skip


# ---- text output ------------------------------------------------------------------------


def _render(head: list[str], rows: list[list[str]]) -> str:
    """Columns two spaces apart: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return "\n".join(line(r) for r in [head, *rows])


def _g(x: float | None, sign: str = "") -> str:
    return "-" if x is None or np.isnan(x) else f"{x:{sign}.4g}"


def _ci_g(iv: Interval | None, sign: str = "") -> str:
    if iv is None or np.isnan(iv.low):
        return "-"
    return f"[{iv.low:{sign}.4g}, {iv.high:{sign}.4g}]"


def _ci_e(iv: Interval | None, sign: str = "") -> str:
    if iv is None or np.isnan(iv.low):
        return "-"
    return f"[{iv.low:{sign}.3e}, {iv.high:{sign}.3e}]"


def _ci_pct(iv: Interval | None) -> str:
    if iv is None or np.isnan(iv.low):
        return "-"
    return f"[{100 * iv.low:.2f}%, {100 * iv.high:.2f}%]"


def _pp(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:+.2f} pp"


def _ci_pp(iv: Interval) -> str:
    if np.isnan(iv.low):
        return "-"
    return f"[{100 * iv.low:+.2f}, {100 * iv.high:+.2f}] pp"
