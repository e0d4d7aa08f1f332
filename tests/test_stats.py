"""`modec.stats` against references written here: closed forms, textbook values, loops that
draw one bootstrap resample at a time, and binomial sums in exact integer arithmetic."""

from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from modec.stats import (
    bootstrap_mean_interval,
    mcnemar_exact_p,
    paired_bootstrap_difference,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5% point of the standard normal


# ---- Wilson score interval ---------------------------------------------------------------


def _wilson_roots(x: int, n: int) -> tuple[float, float]:
    """The two p with (x/n − p)² = z²·p(1 − p)/n: the quadratic the score test inverts."""
    ph, z2 = x / n, Z95 * Z95
    a, b, c = 1 + z2 / n, -(2 * ph + z2 / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (score, no
    # continuity correction).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)  # fmt: skip
def test_wilson_textbook_values(x, n, low, high):
    iv = wilson_interval(x, n)
    assert iv.estimate == x / n
    assert round(iv.low, 4) == low and round(iv.high, 4) == high


@pytest.mark.parametrize("n", [1, 2, 7, 36, 250, 2250, 10**6])
def test_wilson_matches_the_quadratic_roots_for_every_count(n):
    for x in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        iv = wilson_interval(x, n)
        lo, hi = _wilson_roots(x, n)
        assert iv.low == pytest.approx(max(lo, 0.0), abs=1e-10)  # the roots cancel at 1e6
        assert iv.high == pytest.approx(min(hi, 1.0), abs=1e-10)
        assert 0.0 <= iv.low <= iv.estimate <= iv.high <= 1.0


@pytest.mark.parametrize("n", [1, 5, 20, 1000])
def test_wilson_at_0_and_n_is_exact_at_the_boundary(n):
    z2 = Z95 * Z95
    none, every = wilson_interval(0, n), wilson_interval(n, n)
    assert none.low == 0.0 and none.high == pytest.approx(z2 / (n + z2), rel=1e-12)
    assert every.high == 1.0 and every.low == pytest.approx(n / (n + z2), rel=1e-12)
    assert none.high > 0.0 and every.low < 1.0  # not degenerate like the Wald interval


def test_wilson_narrows_with_n_and_other_levels():
    widths = [wilson_interval(3 * k, 10 * k) for k in (1, 10, 100, 1000)]
    w = [iv.high - iv.low for iv in widths]
    assert all(a > b for a, b in itertools.pairwise(w))
    # A 99% interval holds the 95% one.
    i95, i99 = wilson_interval(30, 100), wilson_interval(30, 100, confidence=0.99)
    assert i99.low < i95.low and i99.high > i95.high


def test_wilson_empty_and_bad_counts():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    for x, n in ((5, 4), (-1, 4)):
        with pytest.raises(ValueError):
            wilson_interval(x, n)


# ---- bootstrap ----------------------------------------------------------------------------


def _quantile(sorted_stats: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default quantile)."""
    h = (len(sorted_stats) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_stats) - 1)
    return sorted_stats[lo] + (h - lo) * (sorted_stats[hi] - sorted_stats[lo])


def _loop_bootstrap(values, weights, resamples, seed):
    """One resample at a time: the documented index stream, a plain weighted mean."""
    n = len(values)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n, dtype=np.uint32)
        out.append(math.fsum(w[i] * values[i] for i in idx) / math.fsum(w[i] for i in idx))
    out.sort()
    return _quantile(out, 0.025), _quantile(out, 0.975)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [1, 2, 17, 300])
def test_bootstrap_matches_a_loop(n, weighted):
    rng = np.random.default_rng(n)
    x = rng.exponential(size=n)
    w = rng.integers(1, 80, size=n).astype(np.float64) if weighted else None
    iv = bootstrap_mean_interval(x, w, resamples=400, seed=11)
    lo, hi = _loop_bootstrap(x, w, 400, 11)
    assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12, abs=1e-15)
    want = x.mean() if w is None else (w * x).sum() / w.sum()
    assert iv.estimate == pytest.approx(want, rel=1e-12)
    assert iv.low <= iv.estimate <= iv.high


def test_bootstrap_of_a_proportion_is_close_to_the_normal_interval():
    """For a large sample of 0/1 values the percentile interval is p̂ ± z·√(p̂(1−p̂)/n)."""
    n, k = 4000, 1200
    x = np.zeros(n)
    x[:k] = 1.0
    iv = bootstrap_mean_interval(x, resamples=10_000, seed=0)
    half = Z95 * math.sqrt(0.3 * 0.7 / n)
    assert iv.estimate == 0.3
    assert iv.low == pytest.approx(0.3 - half, abs=1.5e-3)
    assert iv.high == pytest.approx(0.3 + half, abs=1.5e-3)


def test_bootstrap_properties():
    rng = np.random.default_rng(5)
    data = rng.normal(2.0, 1.0, size=10_000)
    widths = []
    for n in (100, 1000, 10_000):
        iv = bootstrap_mean_interval(data[:n], resamples=2000, seed=1)
        assert iv.low < iv.estimate < iv.high
        widths.append(iv.high - iv.low)
    assert widths[0] > widths[1] > widths[2]
    # Deterministic with a seed; another seed draws other resamples.
    a = bootstrap_mean_interval(data[:500], resamples=1000, seed=3)
    assert a == bootstrap_mean_interval(data[:500], resamples=1000, seed=3)
    assert a != bootstrap_mean_interval(data[:500], resamples=1000, seed=4)
    # A constant has a zero-width interval; one sample is its own interval.
    assert tuple(bootstrap_mean_interval(np.full(50, 0.25))) == (0.25, 0.25, 0.25)
    assert tuple(bootstrap_mean_interval([7.0], [3.0])) == (7.0, 7.0, 7.0)
    assert all(math.isnan(v) for v in bootstrap_mean_interval(np.array([])))


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="positive"):
        bootstrap_mean_interval([1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        bootstrap_mean_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_interval([1.0, 2.0], resamples=0)


def test_10k_resamples_of_10k_samples_take_under_a_second():
    x = np.random.default_rng(0).random(10_000)
    w = x + 1.0
    best = math.inf
    for _ in range(3):  # CPU time, best of three: the machine is shared
        t = time.process_time()
        bootstrap_mean_interval(x, resamples=10_000)
        paired_bootstrap_difference(x, x[::-1], resamples=10_000)
        best = min(best, (time.process_time() - t) / 2)
    assert best < 1.0, f"{best:.2f} s per 10k x 10k bootstrap"
    t = time.process_time()
    bootstrap_mean_interval(x, w, resamples=10_000)
    assert time.process_time() - t < 1.5  # weighted: two gathers


# ---- paired bootstrap --------------------------------------------------------------------


def _loop_paired(a, b, weights, resamples, seed):
    """Same indices for both outputs, one resample at a time."""
    n = len(a)
    w = np.ones(n) if weights is None else weights
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n, dtype=np.uint32)
        sw = math.fsum(w[i] for i in idx)
        out.append(
            math.fsum(w[i] * a[i] for i in idx) / sw - math.fsum(w[i] * b[i] for i in idx) / sw
        )
    out.sort()
    return _quantile(out, 0.025), _quantile(out, 0.975)


@pytest.mark.parametrize("weighted", [False, True])
def test_paired_difference_matches_a_loop(weighted):
    rng = np.random.default_rng(9)
    a = (rng.random(120) < 0.8).astype(np.float64)
    b = np.where(rng.random(120) < 0.1, 1 - a, a)  # B flips 10% of A
    w = rng.integers(1, 10, size=120).astype(np.float64) if weighted else None
    iv = paired_bootstrap_difference(a, b, w, resamples=500, seed=2)
    lo, hi = _loop_paired(a, b, w, 500, 2)
    assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
    ww = np.ones(120) if w is None else w
    assert iv.estimate == pytest.approx((ww * (a - b)).sum() / ww.sum(), abs=1e-15)
    assert iv.low <= iv.estimate <= iv.high


def test_paired_difference_of_identical_outputs_is_exactly_zero():
    x = np.random.default_rng(1).normal(size=333)
    for w in (None, np.arange(1.0, 334.0)):
        assert tuple(paired_bootstrap_difference(x, x.copy(), w)) == (0.0, 0.0, 0.0)


def test_pairing_is_narrower_than_independent_resampling():
    """Two correlated outputs: the paired interval of the difference is much narrower than
    the one from resampling each output on its own."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=2000)
    a, b = base + 0.05 * rng.normal(size=2000), base + 0.05 * rng.normal(size=2000) + 0.02
    paired = paired_bootstrap_difference(a, b, resamples=2000, seed=0)
    ia = bootstrap_mean_interval(a, resamples=2000, seed=0)
    ib = bootstrap_mean_interval(b, resamples=2000, seed=1)
    unpaired_half = math.hypot(ia.high - ia.low, ib.high - ib.low) / 2
    assert (paired.high - paired.low) / 2 < unpaired_half / 5
    assert paired.high < 0.0  # the 0.02 shift is found


def test_paired_difference_needs_pairs():
    with pytest.raises(ValueError, match="pair"):
        paired_bootstrap_difference([1.0, 0.0], [1.0])


# ---- McNemar / sign test -----------------------------------------------------------------


def _exact_sign_test(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def test_mcnemar_matches_the_binomial_sum():
    for b in range(0, 31):
        for c in range(0, 31):
            assert mcnemar_exact_p(b, c) == pytest.approx(_exact_sign_test(b, c), rel=1e-10)
    for b, c in ((600, 700), (3, 2000), (1000, 1000), (0, 1074)):
        want = _exact_sign_test(b, c)
        assert mcnemar_exact_p(b, c) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_mcnemar_known_values_and_symmetry():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == 2 / 32
    assert mcnemar_exact_p(3, 10) == pytest.approx(2 * 378 / 8192, rel=1e-12)
    assert mcnemar_exact_p(7, 7) == 1.0 and mcnemar_exact_p(6, 7) == 1.0
    assert mcnemar_exact_p(2, 19) == mcnemar_exact_p(19, 2)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)
