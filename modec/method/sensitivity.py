"""Per-modality expert sensitivity of MODE (arXiv 2606.17118, §3.2): the pure numerics.

δ_M(e, b) is the mean KL divergence KL(p_fp32 ‖ p_quant) of the model's next-token
distribution when only expert e of one layer is quantized to b bits and the quantized weights
serve only the tokens of modality M. The measure-sensitivity pass runs the model; this module
holds the arithmetic: log-softmax, KL, where KL is read, which samples. The probes themselves
(re-running the model with one expert quantized) are `modec.method.probes`; the result type
is `modec.facts.Sensitivity`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from modec.data import PAD, TEXT
from modec.errors import BadInputError

__all__ = [
    "choose_subset",
    "kl_divergence",
    "kl_positions",
    "log_softmax",
]

F64 = npt.NDArray[np.float64]
BoolA = npt.NDArray[np.bool_]


def log_softmax(logits: npt.ArrayLike) -> F64:
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=-1, keepdims=True)))


def kl_divergence(ref_logp: npt.ArrayLike, logits: npt.ArrayLike) -> F64:
    """KL(p ‖ q) per row, p = exp(ref_logp) (the fp32 model), q = softmax(logits).

    Args:
        ref_logp: reference log-probabilities ``[N, V]`` (`log_softmax` of the fp32 logits).
        logits: the perturbed model's logits ``[N, V]``.

    Returns:
        ``[N]`` float64, clipped at 0 (float64 rounding can leave -1e-17 for equal rows).
    """
    lp = np.asarray(ref_logp, dtype=np.float64)
    lq = log_softmax(logits)
    if lp.shape != lq.shape:
        raise BadInputError(f"KL of shapes {lp.shape} and {lq.shape}: need equal [N, V]")
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.asarray(np.maximum(kl, 0.0))


def kl_positions(
    modality: npt.ArrayLike,
    positions: Literal["answer", "text"],
    answer_lengths: npt.ArrayLike | None = None,
) -> BoolA:
    """Where the KL is read, ``[B, T]`` bool.

    ``answer``: the answer positions of each sample: the last one (left padding puts every
    sample's answer position last), or the last n of a sample whose answer has n tokens
    (``answer_lengths``; docs/data-format.md: the input ends with a multi-token answer's
    tokens but the last); ``text``: every text position (the next-token distribution after
    each text token).
    """
    mod = np.asarray(modality)
    if positions == "text":
        return np.asarray(mod == TEXT)
    if positions != "answer":
        raise BadInputError(f"positions must be 'answer' or 'text'; got {positions!r}")
    t = mod.shape[1]
    n = np.ones(mod.shape[0], np.int64) if answer_lengths is None else np.asarray(answer_lengths)
    return np.asarray((np.arange(t)[None, :] >= t - n[:, None]) & (mod != PAD))


def choose_subset(multimodal: npt.ArrayLike, samples: int, seed: int) -> npt.NDArray[np.int64]:
    """The sensitivity subset: ``samples`` indices, multimodal and text-only in proportion.

    A deterministic permutation with ``seed`` orders each kind; the subset takes
    round(samples · share of text-only) text-only samples (at least one when the dataset has
    any and ``samples`` ≥ 2, so δ_text sees text-only inputs) and fills the rest with
    multimodal ones. Returned sorted, so the subset does not depend on the permutation order.

    Args:
        multimodal: ``[S]`` bool, the sample has vision tokens.
        samples: how many to take (all when the dataset has fewer).
        seed: the permutation seed (the run's ``seed``).
    """
    mm = np.asarray(multimodal, dtype=bool)
    n_all = mm.size
    if samples < 1:
        raise BadInputError(f"samples must be at least 1; got {samples}")
    n = min(samples, n_all)
    perm = np.random.default_rng(seed).permutation(n_all)
    vis = perm[mm[perm]]
    txt = perm[~mm[perm]]
    n_txt = round(n * txt.size / n_all) if n_all else 0
    if txt.size and n >= 2:
        n_txt = max(n_txt, 1)
    n_txt = min(n_txt, txt.size)
    n_vis = min(n - n_txt, vis.size)
    n_txt = min(n - n_vis, txt.size)
    return np.sort(np.concatenate([vis[:n_vis], txt[:n_txt]])).astype(np.int64)
