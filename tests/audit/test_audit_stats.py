"""Binomial tails, Clopper-Pearson limits and the normal tail, against values re-derived here from definitions."""

from __future__ import annotations

import math

import pytest

from groupclip.audit.stats import (
    binomial_cdf,
    binomial_pmf,
    binomial_sf,
    clopper_pearson_lower,
    clopper_pearson_upper,
    normal_cdf,
    normal_log_cdf,
)


def direct_sf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= k] summed term by term with math.comb."""
    return math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.3), (8, 10, 0.5), (30, 40, 0.73), (1, 1, 0.2), (57, 120, 0.41)])
def test_binomial_tail_matches_direct_sum(k, n, p):
    assert binomial_sf(k, n, p) == pytest.approx(direct_sf(k, n, p), rel=1e-10, abs=1e-15)
    assert binomial_cdf(k - 1, n, p) == pytest.approx(1 - direct_sf(k, n, p), rel=1e-9, abs=1e-12)


def test_binomial_pmf_edges_and_total():
    assert binomial_pmf(3, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert binomial_pmf(3, 1.0).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert math.fsum(binomial_pmf(500, 0.37)) == pytest.approx(1.0, abs=1e-10)
    assert binomial_sf(11, 10, 0.5) == 0.0 and binomial_sf(-1, 10, 0.5) == 1.0


@pytest.mark.parametrize(("k", "n"), [(1, 10), (9, 10), (355, 492), (10, 508), (0, 50), (50, 50)])
def test_clopper_pearson_limits_solve_their_defining_equations(k, n):
    a = 0.025
    lo, hi = clopper_pearson_lower(k, n, a), clopper_pearson_upper(k, n, a)
    assert 0 <= lo <= k / n <= hi <= 1
    if k > 0:  # P[Bin(n, lo) >= k] = a
        assert direct_sf(k, n, lo) == pytest.approx(a, rel=1e-6)
    else:
        assert lo == 0.0
    if k < n:  # P[Bin(n, hi) <= k] = a
        assert 1 - direct_sf(k + 1, n, hi) == pytest.approx(a, rel=1e-6)
    else:
        assert hi == 1.0


def test_clopper_pearson_matches_beta_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(3, 20), (90, 100), (250, 1000)]:
        assert clopper_pearson_lower(k, n, 0.05) == pytest.approx(stats.beta.ppf(0.05, k, n - k + 1), rel=1e-8)
        assert clopper_pearson_upper(k, n, 0.05) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), rel=1e-8)


def test_normal_log_cdf_is_continuous_into_the_far_tail():
    for x in (-5.0, -20.0, -29.9):
        assert normal_log_cdf(x) == pytest.approx(math.log(0.5 * math.erfc(-x / math.sqrt(2))), rel=1e-12)
    for x in (-30.0, -33.0, -36.0):  # the asymptotic series, where erfc is still representable
        assert normal_log_cdf(x) == pytest.approx(math.log(0.5 * math.erfc(-x / math.sqrt(2))), rel=1e-12)
    assert math.isfinite(normal_log_cdf(-1e4))  # where Phi itself is 0
    assert normal_cdf(0.0) == 0.5
