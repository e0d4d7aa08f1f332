"""Accuracy of a model on a modec dataset: overall, multimodal, text-only and per family."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from modec.data import Dataset
from modec.errors import DataError

log = logging.getLogger(__name__)

#: Runs one batch of model inputs and returns logits [B, T, V] (or [B, V]).
BatchRunner = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Split:
    """Accuracy over one subset of samples."""

    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """Accuracies, and the predicted token of every sample (for agreement checks)."""

    overall: Split
    multimodal: Split
    text_only: Split
    families: dict[str, Split] = field(default_factory=dict)
    predictions: np.ndarray | None = None

    def to_json(self) -> dict[str, object]:
        def s(x: Split) -> dict[str, object]:
            return {**asdict(x), "accuracy": x.accuracy}

        return {
            "samples": self.overall.n,
            "overall": s(self.overall),
            "multimodal": s(self.multimodal),
            "text_only": s(self.text_only),
            "families": {k: s(v) for k, v in self.families.items()},
        }

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [
            ("overall", self.overall),
            ("multimodal", self.multimodal),
            ("text-only", self.text_only),
        ] + [(f"  {k}", v) for k, v in self.families.items()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'split':<{width}}  {'accuracy':>8}  {'correct':>7}  {'samples':>7}"]
        for name, sp in rows:
            lines.append(f"{name:<{width}}  {100 * sp.accuracy:7.2f}%  {sp.correct:7d}  {sp.n:7d}")
        return "\n".join(lines)


def evaluate(
    run: BatchRunner,
    ds: Dataset,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run every sample and score the argmax at the last position against ``answer``.

    Args:
        run: runs one batch of inputs, returns logits.
        ds: the dataset; it must have answers.
        batch_size: samples per batch. Batches are formed in file order after grouping
            multimodal and text-only samples, so text-only batches stay short.
        progress: called with the number of samples done after each batch.
    """
    if ds.answer is None:
        raise DataError(f"{ds.path}: missing key 'answer'; an evaluation set needs answers")
    mm = ds.multimodal
    # Group by modality so that the sequences of one batch have similar length.
    order = np.concatenate([np.flatnonzero(mm), np.flatnonzero(~mm)])
    preds = np.full(len(ds), -1, dtype=np.int64)
    grouped = ds.subset(order)
    for idx, feeds in grouped.batches(batch_size):
        logits = np.asarray(run(feeds))
        last = logits[:, -1, :] if logits.ndim == 3 else logits
        preds[order[idx]] = last.argmax(axis=-1)
        if progress is not None:
            progress(len(idx))
    ok = preds == ds.answer

    def split(mask: np.ndarray) -> Split:
        return Split(int(mask.sum()), int(ok[mask].sum()))

    families: dict[str, Split] = {}
    if ds.family is not None:
        names = ds.families
        for code in np.unique(ds.family):
            name = names[code] if code < len(names) else str(code)
            families[name] = split(ds.family == code)
    return EvalResult(
        overall=split(np.ones(len(ds), dtype=bool)),
        multimodal=split(mm),
        text_only=split(~mm),
        families=families,
        predictions=preds,
    )


#: The modality splits of `kl_divergence`: every non-pad position, text, vision.
KL_SPLITS = ("all", "text", "vision")


@dataclass(frozen=True)
class Divergence:
    """KL and top-1 agreement summed over the positions of one modality split."""

    positions: int
    kl_sum: float
    agree: int

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.positions if self.positions else float("nan")

    def to_json(self) -> dict[str, object]:
        empty = not self.positions
        return {
            "positions": self.positions,
            "mean_kl": None if empty else self.mean_kl,
            "top1_agreement": None if empty else self.top1_agreement,
        }


@dataclass(frozen=True)
class KLResult:
    """Next-token KL(p_reference ‖ p_model) and top-1 agreement, per modality split."""

    samples: int
    splits: dict[str, Divergence]

    def to_json(self) -> dict[str, object]:
        return {"samples": self.samples, **{k: v.to_json() for k, v in self.splits.items()}}

    def table(self) -> str:
        lines = [f"{'split':<7}  {'positions':>9}  {'mean KL':>10}  {'top-1 agreement':>15}"]
        for name, d in self.splits.items():
            if d.positions:
                kl, agree = f"{d.mean_kl:10.3e}", f"{100 * d.top1_agreement:14.2f}%"
            else:
                kl, agree = f"{'-':>10}", f"{'-':>15}"
            lines.append(f"{name:<7}  {d.positions:9d}  {kl}  {agree}")
        return "\n".join(lines)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


def kl_divergence(
    reference: BatchRunner,
    model: BatchRunner,
    ds: Dataset,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> KLResult:
    """Mean KL(p_reference ‖ p_model) of the next-token distribution and top-1 agreement.

    Every non-pad position of every sample counts once, split by the dataset's modality mask
    (``all`` = text + vision). No labels are needed. A model that returns only the last
    position's logits ([B, V]) is compared there. Computed in float64, one sample at a time.
    """
    from modec.data import PAD, TEXT, VISION

    count = dict.fromkeys(KL_SPLITS, 0)
    kl_sum = dict.fromkeys(KL_SPLITS, 0.0)
    agree_sum = dict.fromkeys(KL_SPLITS, 0)
    for idx, feeds in ds.batches(batch_size):
        ref = np.asarray(reference(feeds))
        got = np.asarray(model(feeds))
        if ref.shape != got.shape:
            raise DataError(
                f"{ds.path}: the two models return logits of shapes {list(ref.shape)} and "
                f"{list(got.shape)}; compare models with the same outputs"
            )
        mod = ds.trimmed_modality(idx)
        if ref.ndim == 2:
            ref, got, mod = ref[:, None, :], got[:, None, :], mod[:, -1:]
        if ref.shape[1] != mod.shape[1]:
            raise DataError(
                f"{ds.path}: the models return {ref.shape[1]} positions for {mod.shape[1]} "
                "tokens; --kl-to needs logits at every position (or only the last)"
            )
        for b in range(ref.shape[0]):
            keep = mod[b] != PAD
            if not keep.any():
                continue
            lp = _log_softmax(ref[b][keep])
            lq = _log_softmax(got[b][keep])
            kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)
            agree = lp.argmax(axis=-1) == lq.argmax(axis=-1)
            m = mod[b][keep]
            for name, sel in (("all", m != PAD), ("text", m == TEXT), ("vision", m == VISION)):
                count[name] += int(sel.sum())
                kl_sum[name] += float(kl[sel].sum())
                agree_sum[name] += int(agree[sel].sum())
        if progress is not None:
            progress(len(idx))
    return KLResult(
        samples=len(ds),
        splits={k: Divergence(count[k], kl_sum[k], agree_sum[k]) for k in KL_SPLITS},
    )
