"""mu-GDP to (eps, delta), checked by root finding written here and by dp-accounting; the mu estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from groupclip.audit import delta_from_gdp, epsilon_from_gdp, estimate_gdp


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gdp_delta(eps: float, mu: float) -> float:
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def root(mu: float, delta: float) -> float:
    """eps with gdp_delta(eps, mu) = delta, by plain bisection on [0, 100]."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mid, mu) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("mu", "delta"), [(1.0, 1e-5), (0.5, 1e-5), (2.0, 1e-6), (0.2, 1e-3), (4.0, 1e-5)])
def test_epsilon_from_gdp_matches_root_finding(mu, delta):
    assert epsilon_from_gdp(mu, delta) == pytest.approx(root(mu, delta), rel=1e-9)


def test_published_value_mu_1():
    # The analytic Gaussian mechanism at mu = 1 (sigma = 1, sensitivity 1), delta = 1e-5: eps = 4.3772.
    assert epsilon_from_gdp(1.0, 1e-5) == pytest.approx(4.37718, abs=1e-4)


def test_matches_dp_accounting_pld_for_one_gaussian_step():
    pytest.importorskip("dp_accounting")
    from groupclip import compute_epsilon

    # One full-batch Gaussian step with sigma = 2 is exactly 0.5-GDP; PLD accounting is tight for it.
    assert epsilon_from_gdp(0.5, 1e-5) == pytest.approx(compute_epsilon(2.0, 1.0, 1, 1e-5, "pld"), rel=1e-3)


def test_round_trip_monotonicity_and_edges():
    for mu in (0.3, 1.0, 3.0, 10.0):
        eps = epsilon_from_gdp(mu, 1e-5)
        assert delta_from_gdp(mu, eps) == pytest.approx(1e-5, rel=1e-6)
    eps_by_mu = [epsilon_from_gdp(mu, 1e-5) for mu in (0.1, 0.5, 1.0, 2.0)]
    assert eps_by_mu == sorted(eps_by_mu)
    assert epsilon_from_gdp(1.0, 1e-3) < epsilon_from_gdp(1.0, 1e-6)
    assert epsilon_from_gdp(0.0, 1e-5) == 0.0
    assert epsilon_from_gdp(0.1, 0.5) == 0.0  # delta above the total variation 2 Phi(mu / 2) - 1
    with pytest.raises(ValueError):
        epsilon_from_gdp(1.0, 0.0)


def test_estimate_recovers_mu_and_its_lower_limit_covers():
    rng = np.random.default_rng(0)
    included = rng.random(20000) < 0.5
    estimate = estimate_gdp(3.0 * rng.normal(size=20000) + 3.0 * 0.7 * included + 5.0, included, delta=1e-5)
    assert estimate.mu == pytest.approx(0.7, abs=0.05)  # scale and shift of the scores do not matter
    assert estimate.mu_lower < estimate.mu and estimate.epsilon_lower < estimate.epsilon
    assert estimate.epsilon == pytest.approx(epsilon_from_gdp(estimate.mu, 1e-5))
    covered = 0
    for _ in range(200):
        inc = rng.random(400) < 0.5
        covered += estimate_gdp(rng.normal(size=400) + 0.5 * inc, inc, delta=1e-5).mu_lower <= 0.5
    assert covered >= 180  # nominal 95%


def test_estimate_needs_both_sides():
    with pytest.raises(ValueError):
        estimate_gdp([1.0, 2.0, 3.0], [True, True, True], delta=1e-5)
