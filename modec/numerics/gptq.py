"""GPTQ for one weight matrix (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", §4), after IST-DASLab `gptq.py`.

Given W[N, K] and the Hessian of the layer-wise objective H = Σ_t x_t x_tᵀ [K, K] over the
calibration tokens routed to this expert, GPTQ quantizes the columns of W in order and,
after each column, spreads its quantization error over the columns not yet quantized using
the inverse Hessian, minimising ||W X - Ŵ X||² = tr((W - Ŵ) H (W - Ŵ)ᵀ).

Choices and their sources:
  * dampening λ = percdamp · mean(diag H), percdamp = 0.01 (§4 Step 3, "Cholesky
    Reformulation"); the Hessian is inverted via Cholesky and the upper Cholesky factor of
    H⁻¹ supplies the rows used for the updates (§4 Step 3);
  * lazy batch updates over blocks of 128 columns (§4 Step 2);
  * dead inputs (H[i, i] == 0, never excited) get H[i, i] = 1 and W[:, i] = 0, as in the
    reference implementation;
  * group-wise asymmetric quantization with the parameters recomputed at the start of each
    group from the current, error-updated weights (reference, `groupsize` without
    `static_groups`). Blocks are kept a multiple of the group size so that a group never
    straddles a block and "current" is exact;
  * act-order (`actorder=True`, reference `--act-order`) quantizes columns by decreasing
    H[i, i]. Our storage needs contiguous groups in the original column order, so with
    act-order the group parameters are computed once from the original W before the
    updates (reference `static_groups=True`).

Everything heavy runs in float64 (H accumulated in float64 is advisable for long token
streams); the quantization itself uses the same float32 formulas as `quant.py`, so the
returned dequantized weight equals `dequantize(q, scale, zero)` bit for bit.

When GPTQ cannot run (no Hessian, too few tokens, a Hessian that stays indefinite after
dampening, non-finite entries), the weight is quantized with RTN instead; the result says
`method="rtn"` with the reason and a warning names the setting to change. This is the only
module that imports torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from modec.errors import BadInputError
from modec.numerics.quant import QuantizedWeight, compute_qparams, quantize_rtn
from modec.numerics.schemes import QuantScheme

__all__ = ["GPTQResult", "gptq_quantize"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """What `gptq_quantize` produced.

    Attributes:
        qweight: codes, fp16 scales and uint8 zeros.
        dequantized: ŵ = (q - z) · s as float32 [N, K] (equal to `qweight.dequantize()`).
        method: "gptq", or "rtn" when it fell back.
        fallback_reason: why it fell back (None for GPTQ).
        loss: GPTQ's own objective Σ_i (w_i - q_i)² / (2 [U]_ii²) summed over all
            columns and rows (U the upper Cholesky factor of the damped H⁻¹), as returned
            by the reference; equals ½ tr(ΔW H_damped ΔWᵀ). None for RTN.
        output_error: tr((W - Ŵ) H (W - Ŵ)ᵀ) with the undamped H, i.e. Σ_t ||(W - Ŵ) x_t||²
            over the calibration tokens. None when no usable Hessian was given.
        output_mse: output_error / n_tokens (the squared output error per token, summed
            over the N outputs), when n_tokens was given.
    """

    qweight: QuantizedWeight
    dequantized: npt.NDArray[np.float32]
    method: Literal["gptq", "rtn"]
    fallback_reason: str | None
    loss: float | None
    output_error: float | None
    output_mse: float | None


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """tr(Δ H Δᵀ) in float64."""
    return float(torch.einsum("nk,kl,nl->", delta, h, delta))


def _fallback(
    w: npt.NDArray[np.float32],
    scheme: QuantScheme,
    reason: str,
    fix: str,
    h: torch.Tensor | None,
    n_tokens: int | None,
    name: str,
) -> GPTQResult:
    logger.warning("GPTQ fell back to RTN for %s: %s; %s", name, reason, fix)
    qw = quantize_rtn(w, scheme)
    deq = qw.dequantize()
    err = None
    if h is not None and bool(torch.isfinite(h).all()):
        delta = torch.from_numpy(w.astype(np.float64) - deq.astype(np.float64))
        err = _output_error(delta, h)
    mse = err / n_tokens if err is not None and n_tokens else None
    return GPTQResult(qw, deq, "rtn", reason, None, err, mse)


def gptq_quantize(
    weight: npt.ArrayLike | torch.Tensor,
    hessian: npt.ArrayLike | torch.Tensor | None,
    scheme: QuantScheme,
    *,
    n_tokens: int | None = None,
    min_tokens: int = 32,
    percdamp: float = 0.01,
    blocksize: int = 128,
    actorder: bool = False,
    name: str = "weight",
) -> GPTQResult:
    """Quantize one weight W[N, K] with GPTQ at `scheme`, falling back to RTN when needed.

    Args:
        weight: W [N, K] (output rows × reduction axis).
        hessian: H = Σ_t x_t x_tᵀ [K, K] over the tokens routed here (any positive scale
            gives the same codes), or None when there is none.
        scheme: bit width and group size (group-wise asymmetric, last group may be short).
        n_tokens: number of tokens in H; enables `output_mse` and the `min_tokens` check.
        min_tokens: fall back to RTN when n_tokens < min_tokens: with fewer tokens than
            that H is far from full rank and GPTQ over-fits the few tokens it saw. A
            heuristic, not from the paper.
        percdamp: dampening as a fraction of mean(diag H) (GPTQ §4 Step 3: 0.01).
        blocksize: lazy-batch block size (GPTQ §4 Step 2: 128); rounded to a multiple of
            the group size.
        actorder: quantize columns by decreasing H[i, i] (static groups, see module doc).
        name: how the warning names this weight (e.g. "layer 3 expert 17 down_proj").

    Returns:
        GPTQResult.

    Raises:
        BadInputError: shapes of W and H do not agree, W is not finite, or bad settings.
    """
    w_np = np.asarray(
        weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else weight,
        dtype=np.float32,
    )
    if w_np.ndim != 2 or 0 in w_np.shape:
        raise BadInputError(f"{name}: GPTQ needs a 2-D weight [N, K]; got shape {w_np.shape}")
    if not np.all(np.isfinite(w_np)):
        raise BadInputError(f"{name}: weight contains NaN or inf")
    if not (math.isfinite(percdamp) and percdamp >= 0) or blocksize < 1:
        raise BadInputError(
            f"{name}: percdamp must be a finite value ≥ 0 and blocksize ≥ 1; got "
            f"{percdamp}, {blocksize}"
        )
    n_rows, k = w_np.shape

    if hessian is None:
        return _fallback(
            w_np, scheme, "no Hessian was collected", "collect expert inputs for it "
            "(raise the calibration sample count if the expert is rarely routed)",
            None, n_tokens, name,
        )  # fmt: skip
    h_orig = torch.as_tensor(hessian).detach().to(device="cpu", dtype=torch.float64)
    if h_orig.shape != (k, k):
        raise BadInputError(
            f"{name}: Hessian shape {tuple(h_orig.shape)} does not match the weight's K={k}"
        )
    if not bool(torch.isfinite(h_orig).all()):
        return _fallback(
            w_np, scheme, "the Hessian has NaN or inf entries",
            "accumulate the Hessian in float64 and check the calibration inputs",
            None, n_tokens, name,
        )  # fmt: skip
    if n_tokens is not None and n_tokens < min_tokens:
        return _fallback(
            w_np, scheme, f"only {n_tokens} calibration tokens < min_tokens={min_tokens}",
            "raise the calibration sample count or lower min_tokens", h_orig, n_tokens, name,
        )  # fmt: skip

    H = h_orig.clone()
    W = torch.from_numpy(w_np.astype(np.float64))
    dead = torch.diag(H) == 0
    if bool(dead.all()):
        return _fallback(
            w_np, scheme, "the Hessian is zero (the expert saw no input)",
            "raise the calibration sample count", h_orig, n_tokens, name,
        )  # fmt: skip
    H[dead, dead] = 1
    W[:, dead] = 0

    g = scheme.group_size
    n_groups = scheme.num_groups(k)
    scale = np.zeros((n_rows, n_groups), dtype=np.float16)
    zero = np.zeros((n_rows, n_groups), dtype=np.uint8)

    perm = torch.arange(k)
    if actorder:
        # Static groups (reference `static_groups=True`): parameters from the original W.
        for gi in range(n_groups):
            cols = W[:, gi * g : (gi + 1) * g].float().numpy()
            scale[:, gi], zero[:, gi] = compute_qparams(cols, scheme.bits)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(k, dtype=torch.float64)
    # §4 Step 3: Cholesky of H, its inverse, and the upper Cholesky factor of H⁻¹.
    L, info = torch.linalg.cholesky_ex(H)
    Hinv, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0 or int(info_inv) != 0 or not bool(torch.isfinite(Hinv).all()):
        return _fallback(
            w_np, scheme, f"Cholesky failed after dampening percdamp={percdamp}",
            "raise percdamp (e.g. 0.1) or collect more calibration tokens", h_orig,
            n_tokens, name,
        )  # fmt: skip

    qmax = scheme.qmax
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    Losses = torch.zeros_like(W)
    # Column-wise (per original column) fp32 scale and zero; filled per group as we go.
    s_col = torch.zeros(n_rows, k, dtype=torch.float32)
    z_col = torch.zeros(n_rows, k, dtype=torch.float32)
    if actorder:
        s_col = torch.from_numpy(np.repeat(scale.astype(np.float32), g, axis=1)[:, :k])[:, perm]
        z_col = torch.from_numpy(np.repeat(zero.astype(np.float32), g, axis=1)[:, :k])[:, perm]

    bs = g * max(1, blocksize // g)  # blocks hold whole groups (see module doc)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = i1 + i
            if not actorder and col % g == 0:
                # Group start: parameters from the current (error-updated) weights.
                gi = col // g
                cur = W1[:, i : i + g].float().numpy()
                scale[:, gi], zero[:, gi] = compute_qparams(cur, scheme.bits)
                width = min(g, k - col)
                s_col[:, col : col + width] = torch.from_numpy(scale[:, gi].astype(np.float32))[
                    :, None
                ]
                z_col[:, col : col + width] = torch.from_numpy(zero[:, gi].astype(np.float32))[
                    :, None
                ]
            w = W1[:, i]
            d = Hinv1[i, i]
            s, z = s_col[:, col], z_col[:, col]
            # Same float32 formulas as quant.quantize_codes / quant.dequantize.
            q = torch.clamp(torch.round(w.float() / s) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            dq = ((q - z) * s).double()
            Q1[:, i] = dq
            Losses1[:, i] = (w - dq) ** 2 / d**2
            err1 = (w - dq) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if actorder:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        codes = codes[:, invperm]

    qw = QuantizedWeight(q=codes.numpy(), scale=scale, zero=zero, scheme=scheme)
    deq = Q.float().numpy()
    delta = torch.from_numpy(w_np.astype(np.float64)) - Q
    err = _output_error(delta, h_orig)
    return GPTQResult(
        qweight=qw,
        dequantized=deq,
        method="gptq",
        fallback_reason=None,
        loss=float(Losses.sum()),
        output_error=err,
        output_mse=err / n_tokens if n_tokens else None,
    )
