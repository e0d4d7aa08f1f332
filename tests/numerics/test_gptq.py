"""GPTQ for one weight (modec.numerics.gptq) against RTN and its own invariants."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from modec.errors import BadInputError
from modec.numerics.gptq import gptq_quantize
from modec.numerics.quant import dequantize, quantize_rtn
from modec.numerics.schemes import QuantScheme


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is shared; these problems are small.
    torch.set_num_threads(1)


def _problem(
    n: int = 48, k: int = 200, tokens: int = 600, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """W [n, k] and H = XᵀX from strongly correlated inputs (low-rank plus noise)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(tokens, 12))
    x = latent @ rng.normal(size=(12, k)) + 0.1 * rng.normal(size=(tokens, k))
    w = rng.normal(0, 0.1, size=(n, k)).astype(np.float32)
    return w, x.T @ x


def _out_err(w: np.ndarray, deq: np.ndarray, h: np.ndarray) -> float:
    d = w.astype(np.float64) - deq.astype(np.float64)
    return float(np.einsum("nk,kl,nl->", d, h, d))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group: int) -> None:
    w, h = _problem()  # K = 200: the last group is short at both group sizes
    scheme = QuantScheme(bits, group)
    res = gptq_quantize(w, h, scheme, n_tokens=600)
    assert res.method == "gptq" and res.fallback_reason is None
    rtn_err = _out_err(w, quantize_rtn(w, scheme).dequantize(), h)
    assert res.output_error is not None
    assert res.output_error == pytest.approx(_out_err(w, res.dequantized, h), rel=1e-9)
    assert res.output_error < 0.5 * rtn_err
    assert res.output_mse == pytest.approx(res.output_error / 600)
    # The reference's loss is ½ tr(ΔW H_damped ΔWᵀ) exactly (OBS updates are exact for a
    # quadratic); this checks the error propagation, not just the rounding.
    h_damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(h.shape[0])
    assert res.loss == pytest.approx(0.5 * _out_err(w, res.dequantized, h_damped), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("actorder", [False, True])
def test_codes_in_range_and_dequant_matches(bits: int, actorder: bool) -> None:
    w, h = _problem(n=16, k=150, seed=bits)
    scheme = QuantScheme(bits, 32)
    res = gptq_quantize(w, h, scheme, actorder=actorder)
    qw = res.qweight
    assert qw.q.shape == (16, 150) and qw.q.dtype == np.uint8
    assert qw.scale.shape == (16, 5) and qw.scale.dtype == np.float16
    assert int(qw.q.max()) <= scheme.qmax and int(qw.zero.max()) <= scheme.qmax
    np.testing.assert_array_equal(res.dequantized, dequantize(qw.q, qw.scale, qw.zero, scheme))
    if actorder:
        rtn_err = _out_err(w, quantize_rtn(w, scheme).dequantize(), h)
        assert _out_err(w, res.dequantized, h) < rtn_err


def test_diagonal_hessian_reduces_to_rtn() -> None:
    """Uncorrelated inputs leave nothing to compensate: GPTQ must equal RTN bit for bit,
    which pins down the grid (qparams, fp16 scale, rounding) shared with quant.py."""
    w, _ = _problem(n=8, k=130)
    h = np.diag(np.random.default_rng(1).uniform(0.5, 2.0, 130))
    scheme = QuantScheme(3, 64)
    res = gptq_quantize(w, h, scheme)
    rtn = quantize_rtn(w, scheme)
    np.testing.assert_array_equal(res.qweight.q, rtn.q)
    np.testing.assert_array_equal(res.qweight.scale, rtn.scale)
    np.testing.assert_array_equal(res.qweight.zero, rtn.zero)


def test_dead_inputs_are_zeroed() -> None:
    w, h = _problem(n=8, k=96)
    h[:, 5] = 0.0
    h[5, :] = 0.0
    res = gptq_quantize(w, h, QuantScheme(4, 32))
    assert res.method == "gptq"
    np.testing.assert_array_equal(res.dequantized[:, 5], 0.0)


def test_deterministic() -> None:
    w, h = _problem(n=16, k=160)
    a = gptq_quantize(w, h, QuantScheme(3, 64))
    b = gptq_quantize(torch.from_numpy(w), torch.from_numpy(h), QuantScheme(3, 64))
    np.testing.assert_array_equal(a.qweight.q, b.qweight.q)
    np.testing.assert_array_equal(a.qweight.scale, b.qweight.scale)
    np.testing.assert_array_equal(a.qweight.zero, b.qweight.zero)
    assert a.loss == b.loss


@pytest.mark.parametrize(
    ("hessian", "n_tokens", "reason", "setting"),
    [
        (None, None, "no Hessian", "calibration sample count"),
        ("zero", 100, "Hessian is zero", "calibration sample count"),
        ("indefinite", None, "Cholesky failed", "raise percdamp"),
        ("nan", None, "NaN", "float64"),
        ("ok", 3, "only 3 calibration tokens", "min_tokens"),
    ],
)
def test_fallback_to_rtn(
    hessian: str | None,
    n_tokens: int | None,
    reason: str,
    setting: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    w, h_ok = _problem(n=8, k=64)
    k = w.shape[1]
    h = {
        None: None,
        "zero": np.zeros((k, k)),
        "indefinite": -np.eye(k) + 0.5 * np.ones((k, k)) / k,
        "nan": np.where(np.eye(k) > 0, np.nan, h_ok),
        "ok": h_ok,
    }[hessian]
    scheme = QuantScheme(3, 32)
    with caplog.at_level(logging.WARNING, logger="modec.numerics.gptq"):
        res = gptq_quantize(w, h, scheme, n_tokens=n_tokens, name="layer 0 expert 3")
    assert res.method == "rtn" and res.fallback_reason is not None
    assert reason in res.fallback_reason
    assert res.loss is None
    rtn = quantize_rtn(w, scheme)
    np.testing.assert_array_equal(res.qweight.q, rtn.q)
    np.testing.assert_array_equal(res.dequantized, rtn.dequantize())
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "layer 0 expert 3" in msg and reason in msg and setting in msg


def test_bad_shapes() -> None:
    w, h = _problem(n=4, k=64)
    with pytest.raises(BadInputError, match="does not match"):
        gptq_quantize(w, h[:32, :32], QuantScheme(4, 32))
    with pytest.raises(BadInputError, match="2-D"):
        gptq_quantize(w[0], h, QuantScheme(4, 32))
