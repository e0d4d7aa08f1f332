"""Step 2 of MODE: key vision tokens (arXiv 2606.17118, §3.1, "modality-aware frequency").

Vision tokens outnumber text 10–100× and most of an image is background, so MODE counts an
expert's vision routing over *key* vision tokens only: per layer and sample, score each
vision token by the attention the question (the text after the image) pays it, averaged over
the question's tokens and the heads, keep the top ``key_ratio`` (20%) and normalise the
expert counts over them within the layer.

Pure numpy. collect-routing scores every vision token while it runs the calibration set
(`key_scores`, one forward pass serves routing and scores); the select-key-vision pass
chooses the key tokens from those scores and counts them (`select_key_vision`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modec.data import TEXT, VISION
from modec.errors import BadInputError
from modec.facts import VisionRouting

__all__ = [
    "KeyScores",
    "KeySelection",
    "attention_key_scores",
    "hidden_key_scores",
    "key_count",
    "key_scores",
    "query_mask",
    "select_key_tokens",
    "select_key_vision",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BoolA = npt.NDArray[np.bool_]

#: How the fallback ranks vision tokens (said in the report).
HIDDEN_RULE = "cosine similarity of vision MoE inputs to the mean question MoE input"


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


@dataclass(frozen=True)
class KeyScores:
    """The key score of every vision token of one batch and one layer.

    Attributes:
        scores: ``[B, T]`` float64, the score of each vision token (NaN elsewhere).
        sources: which scores were used: ``attention``, ``hidden`` or both.
        no_query: samples whose image ends the sequence (no question to read), which took
            the hidden-state score.
        reason: why the attention could not be read at all, or None.
    """

    scores: F64
    sources: frozenset[str]
    no_query: int
    reason: str | None


def key_scores(
    probs: npt.ArrayLike | None, hidden: npt.ArrayLike, modality: npt.ArrayLike
) -> KeyScores:
    """Score a batch's vision tokens from the layer's attention, falling back where needed.

    Args:
        probs: the attention probabilities ``[B, heads, T, T]`` of the layer's block, or None
            where they cannot be read (no tap, a fused attention op).
        hidden: the layer's MoE input ``[B, T, H]`` (the fallback's input).
        modality: ``[B, T]``.

    Rules:
        1. Attention probabilities of shape ``[B, heads, T, T]`` give `attention_key_scores`.
        2. Probabilities of another shape are not used: the reason is returned.
        3. Samples with vision tokens but no question after the image, and every sample when
           there is no attention, take `hidden_key_scores`.
    """
    mod = np.asarray(modality)
    has_vision = (mod == VISION).any(1)
    reason = None
    scores = None
    if probs is not None:
        p = np.asarray(probs)
        if p.ndim == 4 and p.shape[0] == mod.shape[0] and p.shape[2:] == (mod.shape[1],) * 2:
            scores = attention_key_scores(p, mod)
        else:
            reason = (
                f"attention has shape {list(p.shape)}, not [B, heads, T, T] = "
                f"[{mod.shape[0]}, h, {mod.shape[1]}, {mod.shape[1]}]"
            )
    if scores is None:
        fallback = frozenset({"hidden"}) if has_vision.any() else frozenset[str]()
        return KeyScores(hidden_key_scores(hidden, mod), fallback, 0, reason)
    sources = {"attention"}
    missing = has_vision & np.isnan(np.where(mod == VISION, scores, 0.0)).any(1)
    if missing.any():
        scores = np.where(missing[:, None], hidden_key_scores(hidden, mod), scores)
        sources.add("hidden")
    return KeyScores(scores, frozenset(sources), int(missing.sum()), None)


@dataclass(frozen=True, eq=False)
class KeySelection:
    """The key vision tokens of one layer and the expert counts over them."""

    key: BoolA
    count_key: I64
    count_redundant: I64


def select_key_vision(vision: VisionRouting, num_experts: int, key_ratio: float) -> KeySelection:
    """Choose each sample's key vision tokens of one layer and count their routing.

    Per sample: the top `key_count` vision tokens by score (ties to the earlier token); a
    sample whose scores are all NaN gets none. ``count_key[e]`` counts the selections of
    expert e by key tokens, ``count_redundant[e]`` by the other vision tokens.
    """
    if not 0.0 < key_ratio <= 1.0:
        raise BadInputError(f"key_ratio must be in (0, 1]; got {key_ratio}")
    key = np.zeros(vision.sample.shape, dtype=bool)
    if vision.sample.size:
        # Tokens of one sample are contiguous: split at every change of sample id.
        starts = np.flatnonzero(np.r_[True, vision.sample[1:] != vision.sample[:-1]])
        ends = np.r_[starts[1:], vision.sample.size]
        for a, b in zip(starts, ends, strict=True):
            s = vision.score[a:b]
            if np.isnan(s).all():
                continue
            order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
            key[a + order[: key_count(b - a, key_ratio)]] = True
    experts = np.asarray(vision.experts)
    count_key = np.bincount(experts[key].ravel(), minlength=num_experts).astype(np.int64)
    count_red = np.bincount(experts[~key].ravel(), minlength=num_experts).astype(np.int64)
    return KeySelection(key, count_key, count_red)
