"""The importance signals that turn routing statistics and sensitivities into ILP costs.

Every method uses the same ILP and the same quantizer; only ``cost[e, j]`` (the price of
giving expert ``e`` width ``bits[j]``) changes. All arrays are per layer.

- ``mode`` (MODE, arXiv 2606.17118): f_text(e)·δ_text(e,b) + f_key-vision(e)·δ_vision(e,b).
- ``mode-no-key``: ablation, all vision tokens counted (no key-token filter).
- ``mode-no-sens``: ablation, text + key-vision frequency times the expert's own output error
  (no KL sensitivity).
- ``mode-sens-only``: ablation, δ_text + δ_vision with no frequency weighting.
- ``mode-redundant``: ablation, text + the *redundant* (non-key) vision tokens only.
- ``mc-moe`` (MC-MoE): f_global^α · w̄^β · err(e,b), α = 1, β = 1.5, err the expert's
  output error at width b on its calibration inputs.
- ``veq-me`` (VEQ): S(e) = γ·N_text(e) + β·N_vision(e) times err(e,b); β = text/vision token
  ratio, γ = ratio of text to vision output sensitivity measured on the calibration set.
- ``uniform``: no ILP; every expert at the budget width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Method = Literal[
    "mode", "uniform", "mc-moe", "veq-me",
    "mode-no-key", "mode-no-sens", "mode-sens-only", "mode-redundant",
]  # fmt: skip
METHODS: tuple[str, ...] = (
    "mode", "uniform", "mc-moe", "veq-me",
    "mode-no-key", "mode-no-sens", "mode-sens-only", "mode-redundant",
)  # fmt: skip
#: Methods whose cost needs the KL sensitivities δ (measure-sensitivity).
NEEDS_SENSITIVITY = frozenset({"mode", "mode-no-key", "mode-sens-only", "mode-redundant", "veq-me"})
#: Methods whose cost prices an expert's own output error err(e, b) (needs its Hessians).
NEEDS_OUTPUT_ERROR = frozenset({"mode-no-sens", "mc-moe", "veq-me"})

F = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LayerSignals:
    """Everything the cost functions may use for one layer (E experts, J widths).

    Attributes:
        f_text, f_key, f_vision, f_redundant, f_global: routing frequencies [E], each
            normalised to sum to 1 within the layer (text tokens; key vision tokens; all
            vision tokens; non-key vision tokens; all tokens).
        n_text, n_vision: raw token counts [E].
        mean_weight: mean routing weight of the tokens routed to each expert [E].
        err: the expert's own output error at each width [E, J] (RTN, Hessian-weighted).
        delta_text, delta_vision: KL sensitivities [E, J], or None when not measured.
    """

    f_text: F
    f_key: F
    f_vision: F
    f_redundant: F
    f_global: F
    n_text: F
    n_vision: F
    mean_weight: F
    err: F
    delta_text: F | None = None
    delta_vision: F | None = None


def _need_delta(s: LayerSignals, method: str) -> tuple[F, F]:
    if s.delta_text is None or s.delta_vision is None:
        raise ValueError(f"method {method!r} needs the sensitivities from measure-sensitivity")
    return s.delta_text, s.delta_vision


def veq_gamma(layers: list[LayerSignals]) -> float:
    """VEQ's γ: how much more a text token's output moves than a vision token's.

    VEQ measures the ratio of output-gradient norms of text and vision tokens. modec's
    executor has no autograd, so γ is the ratio of the mean per-token KL sensitivity of text
    tokens to that of vision tokens at the smallest width, over all layers and experts — the
    same quantity (output change per token of each modality) measured by perturbation.
    """
    num = den = 0.0
    for s in layers:
        dt, dv = _need_delta(s, "veq-me")
        num += float(dt[:, 0].sum())
        den += float(dv[:, 0].sum())
    return num / den if den > 0 else 1.0


def layer_cost(method: str, s: LayerSignals, gamma: float = 1.0) -> F:
    """The ILP cost matrix [E, J] of one layer for ``method``."""
    if method == "mode":
        dt, dv = _need_delta(s, method)
        return s.f_text[:, None] * dt + s.f_key[:, None] * dv
    if method == "mode-no-key":
        dt, dv = _need_delta(s, method)
        return s.f_text[:, None] * dt + s.f_vision[:, None] * dv
    if method == "mode-redundant":
        dt, dv = _need_delta(s, method)
        return s.f_text[:, None] * dt + s.f_redundant[:, None] * dv
    if method == "mode-sens-only":
        dt, dv = _need_delta(s, method)
        return dt + dv
    if method == "mode-no-sens":
        return (s.f_text + s.f_key)[:, None] * s.err
    if method == "mc-moe":
        # MC-MoE: importance = frequency^α · mean routing weight^β, α = 1, β = 1.5.
        return (s.f_global * np.power(s.mean_weight, 1.5))[:, None] * s.err
    if method == "veq-me":
        total_t, total_v = float(s.n_text.sum()), float(s.n_vision.sum())
        beta = total_t / total_v if total_v > 0 else 1.0
        score = gamma * s.n_text + beta * s.n_vision
        return score[:, None] * s.err
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def output_error(weight: npt.NDArray[np.float32], hessian: F | None, n_tokens: int,
                 bits: tuple[int, ...], group_size: int) -> F:  # fmt: skip
    """Mean squared output error per token of RTN at each width: tr(ΔW H ΔWᵀ) / n.

    With no tokens (or no Hessian) the error is measured against an identity Hessian, i.e.
    the plain weight error, so untouched experts still rank widths sensibly.
    """
    from modec.numerics.quant import quantize_rtn
    from modec.numerics.schemes import QuantScheme

    out = np.zeros(len(bits))
    for j, b in enumerate(bits):
        dw = (weight - quantize_rtn(weight, QuantScheme(b, group_size)).dequantize()).astype(
            np.float64
        )
        if hessian is None or n_tokens == 0:
            out[j] = float((dw * dw).sum())
        else:
            # tr(ΔW H ΔWᵀ) through BLAS: a plain einsum loops in C at ~60x the time here.
            out[j] = float(((dw @ hessian) * dw).sum()) / n_tokens
    return out
