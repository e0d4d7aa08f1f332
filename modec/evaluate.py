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
