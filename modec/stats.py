"""Confidence intervals and paired tests for `modec eval` (numpy only, seeded, vectorised).

- `wilson_interval`: the Wilson score interval of a proportion (accuracy of one split).
- `bootstrap_mean_interval`: percentile bootstrap interval of a (weighted) mean over samples
  (answer NLL; mean KL per position, resampling whole samples).
- `paired_bootstrap_difference`: the same for the mean of per-sample differences of two
  outputs on the same samples (one resample of sample indices serves both outputs).
- `mcnemar_exact_p`: two-sided exact McNemar test (a sign test on the discordant pairs).

Every bootstrap draws its indices from ``numpy.random.default_rng(seed)`` in one stream:
resample ``r`` is the ``r``-th run of ``n`` draws of ``integers(0, n, dtype=uint32)``. A result
depends only on the data, the seed and the number of resamples (not on how the rows are
chunked in memory), and a loop drawing one resample at a time reproduces it exactly.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

#: Defaults of `modec eval`: a 95% interval from 10,000 bootstrap resamples, seed 0.
CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0

#: Index elements drawn per chunk (8 MiB of indices, 8 MiB of gathered values).
_CHUNK = 1 << 20


class Interval(NamedTuple):
    """A point estimate and its confidence interval [low, high] (NaN when there is no data)."""

    estimate: float
    low: float
    high: float


_NAN = Interval(float("nan"), float("nan"), float("nan"))


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of the proportion ``successes / n``.

    The interval inverts the normal-approximation score test: it stays inside [0, 1], is not
    degenerate at 0/n or n/n (the low end of 0/n is exactly 0, the high end of n/n exactly
    1), and keeps close to nominal coverage for small n, unlike the Wald interval.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"successes {successes} of n {n}: need 0 <= successes <= n")
    if n == 0:
        return _NAN
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(p * (1 - p) / n + z2n / (4 * n))
    low = 0.0 if successes == 0 else max(0.0, float(center - half))
    high = 1.0 if successes == n else min(1.0, float(center + half))
    return Interval(p, low, high)


def _as_1d(name: str, values: npt.ArrayLike) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one value per sample (1-D); got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _bootstrap_stats(
    values: np.ndarray, weights: np.ndarray | None, resamples: int, seed: int
) -> np.ndarray:
    """The weighted mean ``Σ w·x / Σ w`` of each of ``resamples`` resamples (with
    replacement, ``n`` of ``n`` sample indices each)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    wx = values if weights is None else values * weights
    rows = max(1, _CHUNK // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        # uint32 draws are faster than int64 ones; numpy gathers fastest with intp indices.
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.uint32).astype(np.intp)
        total = np.take(wx, idx).sum(axis=1)
        out[start:stop] = total / (n if weights is None else np.take(weights, idx).sum(axis=1))
    return out


def _percentile(
    estimate: float, stats: np.ndarray, confidence: float, *, exact_zero: bool = False
) -> Interval:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    if exact_zero:
        low, high = 0.0, 0.0
    return Interval(estimate, float(low), float(high))


def _check(resamples: int, confidence: float, weights: np.ndarray | None, n: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples {resamples}: need at least 1")
    _z(confidence)
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights have shape {weights.shape}; expected ({n},)")
        if (weights <= 0).any():
            raise ValueError("weights must be positive (drop samples that weigh nothing)")


def bootstrap_mean_interval(
    values: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Percentile bootstrap interval of the mean of per-sample ``values``.

    With ``weights`` the statistic is the weighted mean ``Σ wᵢ·xᵢ / Σ wᵢ`` (a ratio
    estimator): e.g. ``xᵢ`` a sample's mean KL over its ``wᵢ`` positions gives the mean KL per
    position, and resampling whole samples keeps the positions of one sample together (they
    are not independent). Vectorised: 10,000 resamples of 10,000 samples take well under a
    second.
    """
    x = _as_1d("values", values)
    w = None if weights is None else _as_1d("weights", weights)
    _check(resamples, confidence, w, len(x))
    if len(x) == 0:
        return _NAN
    estimate = float(x.mean() if w is None else (w * x).sum() / w.sum())
    return _percentile(estimate, _bootstrap_stats(x, w, resamples, seed), confidence)


def paired_bootstrap_difference(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Percentile bootstrap interval of mean(a) − mean(b) for two outputs on the same samples.

    ``a[i]`` and ``b[i]`` belong to sample ``i`` (e.g. 1.0/0.0 for correct/wrong, or an
    NLL); each resample draws sample indices once and uses them for both, so what the two
    outputs share cancels. ``weights`` as in `bootstrap_mean_interval` (the same for both).
    Identical ``a`` and ``b`` give exactly [0, 0].
    """
    x, y = _as_1d("a", a), _as_1d("b", b)
    if x.shape != y.shape:
        raise ValueError(f"a has {len(x)} samples and b {len(y)}; pair them by sample")
    w = None if weights is None else _as_1d("weights", weights)
    _check(resamples, confidence, w, len(x))
    if len(x) == 0:
        return _NAN
    d = x - y
    estimate = float(d.mean() if w is None else (w * d).sum() / w.sum())
    stats = _bootstrap_stats(d, w, resamples, seed)
    # Identical outputs: every resampled difference is 0 already; say so without rounding.
    return _percentile(estimate, stats, confidence, exact_zero=not d.any())


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``a_only``: samples output A gets right and B wrong; ``b_only``: the reverse. Under the
    null hypothesis (equal accuracy) each discordant pair goes either way with probability
    1/2, so this is a sign test: ``p = min(1, 2·P(X ≤ min(a_only, b_only)))`` with
    ``X ~ Binomial(a_only + b_only, 1/2)``; 1.0 when there are no discordant pairs. Computed
    in log space (no overflow for large counts).
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts {a_only}, {b_only} must be non-negative")
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0 or 2 * k >= n:
        return 1.0
    j = np.arange(1, k + 1, dtype=np.float64)
    # log C(n, i) for i = 0..k, from the ratios C(n, i) / C(n, i-1) = (n - i + 1) / i.
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - j + 1) / j))])
    log_terms = log_comb - n * np.log(2.0)
    top = log_terms.max()
    log_tail = top + np.log(np.exp(log_terms - top).sum())
    return float(min(1.0, 2.0 * np.exp(log_tail)))
