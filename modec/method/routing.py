"""Step 1 of MODE: routing counted separately for text and vision tokens (arXiv 2606.17118, §3.1).

Pure numpy. The collect-routing pass feeds `RoutingAccumulator` one batch and one MoE layer
at a time and freezes the result into `modec.facts.RoutingStats`:

- per expert, selections by all / text / vision tokens (padding never counts) and the
  frequencies normalised within the layer — a global count would be dominated by vision
  tokens, which outnumber text 10–100×, and hide the experts text needs;
- the routing and key score of every vision token, from which select-key-vision chooses the
  key tokens (`modec.method.key_vision`).

Everything is per layer because each layer has its own router and attention.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from modec.data import PAD, TEXT, VISION
from modec.errors import BadInputError
from modec.facts import RoutingStats, VisionRouting
from modec.moe.reference import Routing

__all__ = ["CATEGORIES", "RoutingAccumulator", "expert_counts", "normalise"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: The token categories counted per expert, in report order.
CATEGORIES = ("all", "text", "vision")


def expert_counts(experts: npt.ArrayLike, mask: npt.ArrayLike, num_experts: int) -> I64:
    """How many of the masked tokens chose each expert: ``experts [T, k]``, ``mask [T]``."""
    ex = np.asarray(experts)
    m = np.asarray(mask, dtype=bool)
    return np.bincount(ex[m].ravel(), minlength=num_experts).astype(np.int64)


def normalise(counts: npt.ArrayLike) -> F64:
    """Counts → frequencies that sum to 1 within the layer (all zeros when nothing counted)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


class RoutingAccumulator:
    """Sums routing statistics batch by batch; `finish` freezes them into `RoutingStats`.

    Args:
        shapes: ``(num_experts, top_k)`` of every MoE layer (execution order).
    """

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = [(int(e), int(k)) for e, k in shapes]
        self.samples = 0
        self.counts = [{c: np.zeros(e, np.int64) for c in CATEGORIES} for e, _ in self.shapes]
        self.weight_sum = [np.zeros(e) for e, _ in self.shapes]
        self.vision: list[dict[str, list[np.ndarray]]] = [
            {"experts": [], "sample": [], "score": []} for _ in self.shapes
        ]
        self.score_source: list[set[str]] = [set() for _ in self.shapes]

    def add(
        self,
        layer: int,
        routing: Routing,
        modality: npt.ArrayLike,
        scores: npt.ArrayLike,
        sample: npt.ArrayLike,
    ) -> None:
        """Add one batch of one layer.

        Args:
            layer: the MoE layer index.
            routing: that layer's routing over the batch's flattened tokens ``[T]``.
            modality: flattened modality mask ``[T]``.
            scores: flattened key scores ``[T]`` (used at vision tokens).
            sample: flattened sample id of each token ``[T]``.
        """
        num_experts = self.shapes[layer][0]
        mod = np.asarray(modality).ravel()
        if routing.experts.shape[0] != mod.size:
            raise BadInputError(
                f"layer {layer}: routing covers {routing.experts.shape[0]} tokens but the batch "
                f"has {mod.size}; the MoE input must be [B, T, H] or [B·T, H] (batch-major)"
            )
        masks = {"all": mod != PAD, "text": mod == TEXT, "vision": mod == VISION}
        c = self.counts[layer]
        for name, m in masks.items():
            c[name] += expert_counts(routing.experts, m, num_experts)
        vis = masks["vision"]
        trace = self.vision[layer]
        trace["experts"].append(np.asarray(routing.experts[vis], np.int64))
        trace["sample"].append(np.asarray(sample, np.int64).ravel()[vis])
        trace["score"].append(np.asarray(scores, np.float64).ravel()[vis])
        valid = masks["all"]
        w = np.where(valid[:, None], routing.weights, 0.0).astype(np.float64)
        np.add.at(self.weight_sum[layer], routing.experts.ravel(), w.ravel())

    def note_score_source(self, layer: int, sources: frozenset[str]) -> None:
        """Record which scores ranked the vision tokens of ``layer`` in some batch."""
        self.score_source[layer] |= sources

    def finish(self) -> RoutingStats:
        """The frozen statistics (frequencies normalised within each layer)."""
        c = self.counts

        def per(name: str) -> tuple[I64, ...]:
            return tuple(layer[name].copy() for layer in c)

        mean_w = tuple(
            np.divide(ws, np.maximum(layer["all"], 1))
            for ws, layer in zip(self.weight_sum, c, strict=True)
        )
        vision = tuple(
            VisionRouting(
                experts=_concat(t["experts"], (0, k), np.int64),
                sample=_concat(t["sample"], (0,), np.int64),
                score=_concat(t["score"], (0,), np.float64),
            )
            for t, (_, k) in zip(self.vision, self.shapes, strict=True)
        )
        return RoutingStats(
            samples=self.samples,
            count_all=per("all"),
            count_text=per("text"),
            count_vision=per("vision"),
            mean_weight=mean_w,
            f_text=tuple(normalise(layer["text"]) for layer in c),
            f_vision=tuple(normalise(layer["vision"]) for layer in c),
            f_global=tuple(normalise(layer["all"]) for layer in c),
            vision=vision,
            score_source=tuple("+".join(sorted(s)) or "none" for s in self.score_source),
        )


def _concat(parts: list[np.ndarray], empty: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty, dtype)
