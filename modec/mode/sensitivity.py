"""Per-modality expert sensitivity of MODE (arXiv 2606.17118, §3.2): the pure numerics.

δ_M(e, b) is the mean KL divergence KL(p_fp32 ‖ p_quant) of the model's next-token
distribution when only expert e of one layer is quantized to b bits and the quantized weights
serve only the tokens of modality M. The measure-sensitivity pass runs the model; this module
holds the result type and the arithmetic: log-softmax, KL, where KL is read, which samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from modec.data import PAD, TEXT
from modec.errors import BadInputError

__all__ = [
    "Sensitivity",
    "choose_subset",
    "kl_divergence",
    "kl_positions",
    "log_softmax",
]

F64 = npt.NDArray[np.float64]
BoolA = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """KL sensitivities of every expert (artifact ``sensitivity``).

    Attributes:
        bits: the widths measured, the last axis of the δ arrays.
        delta_text: ``[L, E, B]`` float64, δ_text(e, b) per MoE layer.
        delta_vision: ``[L, E, B]`` float64, δ_vision(e, b).
        samples: calibration samples the KL was averaged over.
        unused_text / unused_vision: ``[L, E]`` bool, the expert received no token of that
            modality in the subset; its δ for the modality is 0 by rule (the quantized
            weights are never used there), not measured.
    """

    bits: tuple[int, ...]
    delta_text: F64
    delta_vision: F64
    samples: int
    unused_text: BoolA
    unused_vision: BoolA

    def __post_init__(self) -> None:
        want = (*self.delta_text.shape[:2], len(self.bits))
        if self.delta_text.shape != want or self.delta_vision.shape != want:
            raise BadInputError(
                f"sensitivity arrays {self.delta_text.shape} / {self.delta_vision.shape} do not "
                f"match [L, E, {len(self.bits)}] for widths {list(self.bits)}"
            )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as named arrays (for `modec.cache`)."""
        return {
            "bits": np.asarray(self.bits, dtype=np.int64),
            "delta_text": self.delta_text,
            "delta_vision": self.delta_vision,
            "samples": np.asarray(self.samples),
            "unused_text": self.unused_text,
            "unused_vision": self.unused_vision,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Sensitivity:
        return cls(
            bits=tuple(int(b) for b in a["bits"]),
            delta_text=np.asarray(a["delta_text"], dtype=np.float64),
            delta_vision=np.asarray(a["delta_vision"], dtype=np.float64),
            samples=int(a["samples"]),
            unused_text=np.asarray(a["unused_text"], dtype=bool),
            unused_vision=np.asarray(a["unused_vision"], dtype=bool),
        )


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


def kl_positions(modality: npt.ArrayLike, positions: Literal["answer", "text"]) -> BoolA:
    """Where the KL is read, ``[B, T]`` bool.

    ``answer``: the last position of each sample (left padding puts every sample's answer
    position last); ``text``: every text position (the next-token distribution after each
    text token).
    """
    mod = np.asarray(modality)
    if positions == "text":
        return np.asarray(mod == TEXT)
    if positions != "answer":
        raise BadInputError(f"positions must be 'answer' or 'text'; got {positions!r}")
    out = np.zeros(mod.shape, dtype=bool)
    out[:, -1] = mod[:, -1] != PAD
    return out


def choose_subset(multimodal: npt.ArrayLike, samples: int, seed: int) -> npt.NDArray[np.int64]:
    """The sensitivity subset: ``samples`` indices, multimodal and text-only in proportion.

    A deterministic permutation with ``seed`` orders each kind; the subset takes
    round(samples · share of text-only) text-only samples (at least one when the dataset has
    any and ``samples`` ≥ 2, so δ_text sees text-only inputs) and fills the rest with
    multimodal ones. Returned sorted, so the subset does not depend on the permutation order.

    Args:
        multimodal: ``[S]`` bool, the sample has vision tokens.
        samples: how many to take (all when the dataset has fewer).
        seed: the permutation seed (``ctx.options["seed"]``).
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
