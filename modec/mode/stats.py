"""Routing statistics of MODE (arXiv 2606.17118, §3.1): who routes where, by modality.

Pure numpy. The collect-routing pass feeds `RoutingAccumulator` one batch and one MoE layer
at a time and freezes the result into `RoutingStats`.

Token categories (padding never counts):

- *text*, *vision*: from the dataset's modality mask (1 text, 2 vision);
- *key vision*: per sample and layer, the ``key_ratio`` share of the sample's vision tokens
  that the question attends to most (`attention_key_scores`, `select_key_tokens`); MODE
  weights vision sensitivity by these tokens only, since most vision tokens of an image are
  redundant background (§3.1, "modality-aware frequency");
- *redundant vision*: the other vision tokens (for the ablation that counts them instead).

Everything is per layer because each layer has its own router and attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modec.data import PAD, TEXT, VISION
from modec.errors import BadInputError
from modec.moe.reference import MoEParams, Routing, expert_activation

__all__ = [
    "CATEGORIES",
    "RoutingAccumulator",
    "RoutingStats",
    "attention_key_scores",
    "expert_counts",
    "hidden_key_scores",
    "key_count",
    "normalise",
    "query_mask",
    "select_key_tokens",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
BoolA = npt.NDArray[np.bool_]

#: The token categories counted per expert, in report order.
CATEGORIES = ("all", "text", "vision", "key", "redundant")


def key_count(n_vision: int, key_ratio: float) -> int:
    """How many of a sample's ``n_vision`` tokens are key tokens: ⌈ratio·n⌉, at least 1.

    The ceiling keeps small images from losing their only informative tokens; the 1e-9 guard
    keeps ``0.1 * 30`` (= 3.0000000000000004 in binary) at 3.
    """
    if n_vision <= 0:
        return 0
    return max(1, min(n_vision, math.ceil(key_ratio * n_vision - 1e-9)))


def query_mask(modality: npt.ArrayLike) -> BoolA:
    """The text tokens placed after each sample's last vision token, ``[B, T]``.

    These are the question tokens (MODE §3.1): their attention to the image says which vision
    tokens the answer depends on. Samples without vision tokens get no query.
    """
    mod = np.asarray(modality)
    t = mod.shape[1]
    pos = np.arange(t)
    last = np.where((mod == VISION).any(1), t - 1 - np.argmax((mod == VISION)[:, ::-1], 1), t)
    return np.asarray((mod == TEXT) & (pos[None, :] > last[:, None]))


def attention_key_scores(probs: npt.ArrayLike, modality: npt.ArrayLike) -> F64:
    """Attention the question pays each vision token, averaged over heads and queries.

    Args:
        probs: attention probabilities ``[B, heads, T_query, T_key]`` of one layer.
        modality: the batch's modality mask ``[B, T]``.

    Returns:
        ``[B, T]`` float64: the score of every vision token; NaN elsewhere and for every
        token of a sample that has no text query after its image.
    """
    p = np.asarray(probs, dtype=np.float64)
    mod = np.asarray(modality)
    if p.ndim != 4 or p.shape[0] != mod.shape[0] or p.shape[2:] != (mod.shape[1],) * 2:
        raise BadInputError(
            f"attention probabilities have shape {p.shape}; expected [B, heads, T, T] with "
            f"B, T = {mod.shape}"
        )
    q = query_mask(mod)
    per_query = p.mean(axis=1)  # [B, Tq, Tk], mean over heads
    n_q = q.sum(1)
    summed = np.einsum("bq,bqk->bk", q.astype(np.float64), per_query)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = summed / n_q[:, None]
    return np.where((mod == VISION) & (n_q[:, None] > 0), scores, np.nan)


def hidden_key_scores(hidden: npt.ArrayLike, modality: npt.ArrayLike) -> F64:
    """Fallback score when attention cannot be read: hidden-state similarity to the question.

    The cosine similarity between each vision token's MoE input and the mean MoE input of
    the sample's question tokens (text after the image; all of the sample's text when there
    is none). A vision token that the question's representation resembles is one that the
    attention has mixed into it, which is what the attention score measures directly.

    Args:
        hidden: the layer's MoE input ``[B, T, H]``.
        modality: ``[B, T]``.

    Returns:
        ``[B, T]`` float64 scores of the vision tokens, NaN elsewhere.
    """
    x = np.asarray(hidden, dtype=np.float64)
    mod = np.asarray(modality)
    q = query_mask(mod)
    q = np.where(q.any(1, keepdims=True), q, mod == TEXT)
    n_q = np.maximum(q.sum(1, keepdims=True), 1)
    centre = np.einsum("bt,bth->bh", q.astype(np.float64), x) / n_q
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(centre, axis=-1)[:, None]
    cos = np.einsum("bth,bh->bt", x, centre) / np.maximum(norms, 1e-30)
    return np.where(mod == VISION, cos, np.nan)


def select_key_tokens(scores: npt.ArrayLike, modality: npt.ArrayLike, key_ratio: float) -> BoolA:
    """The top `key_count` vision tokens of each sample by score, ``[B, T]`` bool.

    Ties go to the earlier token (stable sort), so the choice is deterministic. A sample whose
    scores are all NaN (no question) gets no key tokens; callers fill those from a fallback.
    """
    s = np.asarray(scores, dtype=np.float64)
    mod = np.asarray(modality)
    out = np.zeros(mod.shape, dtype=bool)
    for b in range(mod.shape[0]):
        vis = np.flatnonzero(mod[b] == VISION)
        if vis.size == 0 or np.isnan(s[b, vis]).all():
            continue
        order = np.argsort(-np.nan_to_num(s[b, vis], nan=-np.inf), kind="stable")
        out[b, vis[order[: key_count(vis.size, key_ratio)]]] = True
    return out


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


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Per layer × expert routing statistics over the calibration set (artifact ``routing.stats``).

    Every field is a tuple over MoE layers (execution order) of arrays over that layer's
    experts, so layers may differ in their expert count.

    Attributes:
        key_ratio: share of each sample's vision tokens kept as key tokens.
        samples: calibration samples seen.
        count_all / count_text / count_vision / count_key / count_redundant: ``[E]`` int64
            selections (a token routed to k experts counts once for each); vision = key +
            redundant, all = text + vision.
        mean_weight: ``[E]`` mean combine weight of the tokens routed to the expert (0 if none).
        f_text / f_vision / f_vision_all / f_redundant / f_global: ``[E]`` float64 frequencies
            normalised within the layer; ``f_vision`` is over *key* vision tokens (the one
            MODE weights δ_vision with), ``f_vision_all`` over every vision token.
        hessian_in: ``[E, H, H]`` float64, Σ x xᵀ over the tokens routed to each expert (the
            input of gate and up; GPTQ's H up to the factor 2/n).
        hessian_act: ``[E, I, I]`` float64, Σ a aᵀ with a = act(x·gateᵀ)·(x·upᵀ) (the input of
            down), computed with the fp32 weights.
        key_source: per layer, ``attention`` or ``hidden`` (the fallback score).
    """

    key_ratio: float
    samples: int
    count_all: tuple[I64, ...]
    count_text: tuple[I64, ...]
    count_vision: tuple[I64, ...]
    count_key: tuple[I64, ...]
    count_redundant: tuple[I64, ...]
    mean_weight: tuple[F64, ...]
    f_text: tuple[F64, ...]
    f_vision: tuple[F64, ...]
    f_vision_all: tuple[F64, ...]
    f_redundant: tuple[F64, ...]
    f_global: tuple[F64, ...]
    hessian_in: tuple[F64, ...]
    hessian_act: tuple[F64, ...]
    key_source: tuple[str, ...]

    @property
    def tokens(self) -> tuple[I64, ...]:
        """Tokens each expert received (the ``n`` of its Hessians): ``count_all``."""
        return self.count_all

    @property
    def num_layers(self) -> int:
        return len(self.count_all)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as named arrays, ``{field}.{layer}`` for per-layer ones (`modec.cache`)."""
        out: dict[str, np.ndarray] = {
            "key_ratio": np.asarray(self.key_ratio),
            "samples": np.asarray(self.samples),
            "key_source": np.asarray(self.key_source, dtype=str),
        }
        for name in _PER_LAYER:
            for layer, arr in enumerate(getattr(self, name)):
                out[f"{name}.{layer}"] = arr
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RoutingStats:
        sources = tuple(str(s) for s in a["key_source"])
        per = {
            name: tuple(a[f"{name}.{layer}"] for layer in range(len(sources)))
            for name in _PER_LAYER
        }
        return cls(
            key_ratio=float(a["key_ratio"]), samples=int(a["samples"]), key_source=sources,
            **per,
        )  # fmt: skip


_PER_LAYER = (
    "count_all", "count_text", "count_vision", "count_key", "count_redundant", "mean_weight",
    "f_text", "f_vision", "f_vision_all", "f_redundant", "f_global", "hessian_in", "hessian_act",
)  # fmt: skip


class RoutingAccumulator:
    """Sums routing statistics batch by batch; `finish` freezes them into `RoutingStats`.

    Args:
        params: the parameters of every MoE layer (execution order).
        key_ratio: share of each sample's vision tokens kept as key tokens.
    """

    def __init__(self, params: list[MoEParams], key_ratio: float) -> None:
        if not 0.0 < key_ratio <= 1.0:
            raise BadInputError(f"key_ratio must be in (0, 1]; got {key_ratio}")
        self.params = params
        self.key_ratio = key_ratio
        self.samples = 0
        self.counts = [{c: np.zeros(p.num_experts, np.int64) for c in CATEGORIES} for p in params]
        self.weight_sum = [np.zeros(p.num_experts) for p in params]
        self.h_in = [np.zeros((p.num_experts, p.up.shape[2], p.up.shape[2])) for p in params]
        self.h_act = [np.zeros((p.num_experts, p.down.shape[2], p.down.shape[2])) for p in params]
        self.key_source: list[set[str]] = [set() for _ in params]

    def add(
        self,
        layer: int,
        routing: Routing,
        hidden: npt.ArrayLike,
        modality: npt.ArrayLike,
        key: npt.ArrayLike,
    ) -> None:
        """Add one batch of one layer.

        Args:
            layer: the MoE layer index.
            routing: that layer's routing over the batch's flattened tokens ``[T]``.
            hidden: the layer's MoE input, flattened ``[T, H]``.
            modality: flattened modality mask ``[T]``.
            key: flattened key-vision mask ``[T]``.
        """
        p = self.params[layer]
        mod = np.asarray(modality).ravel()
        key_m = np.asarray(key, dtype=bool).ravel()
        x = np.asarray(hidden, dtype=np.float32).reshape(mod.size, -1)
        if routing.experts.shape[0] != mod.size:
            raise BadInputError(
                f"layer {layer}: routing covers {routing.experts.shape[0]} tokens but the batch "
                f"has {mod.size}; the MoE input must be [B, T, H] or [B·T, H] (batch-major)"
            )
        masks = {
            "all": mod != PAD,
            "text": mod == TEXT,
            "vision": mod == VISION,
            "key": (mod == VISION) & key_m,
            "redundant": (mod == VISION) & ~key_m,
        }
        c = self.counts[layer]
        for name, m in masks.items():
            c[name] += expert_counts(routing.experts, m, p.num_experts)
        valid = masks["all"]
        w = np.where(valid[:, None], routing.weights, 0.0).astype(np.float64)
        np.add.at(self.weight_sum[layer], routing.experts.ravel(), w.ravel())
        for e in range(p.num_experts):
            tok = np.flatnonzero(valid & (routing.experts == e).any(axis=1))
            if tok.size == 0:
                continue
            rows = x[tok]
            r64 = rows.astype(np.float64)
            self.h_in[layer][e] += r64.T @ r64
            a = expert_activation(p, e, rows).astype(np.float64)
            self.h_act[layer][e] += a.T @ a

    def note_key_source(self, layer: int, source: str) -> None:
        """Record which score chose the key tokens of ``layer`` in some batch."""
        self.key_source[layer].add(source)

    def finish(self) -> RoutingStats:
        """The frozen statistics (frequencies normalised within each layer)."""
        c = self.counts

        def per(name: str) -> tuple[I64, ...]:
            return tuple(layer[name].copy() for layer in c)

        mean_w = tuple(
            np.divide(ws, np.maximum(layer["all"], 1))
            for ws, layer in zip(self.weight_sum, c, strict=True)
        )
        return RoutingStats(
            key_ratio=self.key_ratio,
            samples=self.samples,
            count_all=per("all"),
            count_text=per("text"),
            count_vision=per("vision"),
            count_key=per("key"),
            count_redundant=per("redundant"),
            mean_weight=mean_w,
            f_text=tuple(normalise(layer["text"]) for layer in c),
            f_vision=tuple(normalise(layer["key"]) for layer in c),
            f_vision_all=tuple(normalise(layer["vision"]) for layer in c),
            f_redundant=tuple(normalise(layer["redundant"]) for layer in c),
            f_global=tuple(normalise(layer["all"]) for layer in c),
            hessian_in=tuple(self.h_in),
            hessian_act=tuple(self.h_act),
            key_source=tuple("+".join(sorted(s)) or "none" for s in self.key_source),
        )
