"""Gaussian differential privacy: the exact (eps, delta) of mu-GDP, and an estimate of mu from canary scores.

A mechanism is mu-GDP when telling neighbouring datasets apart is no easier than telling N(0, 1) from N(mu, 1).
For T full-batch DP-SGD steps with noise multiplier sigma, one canary whose clipped gradient always points along
its own coordinate is exactly a Gaussian mechanism with ``mu = sqrt(T) / sigma``. The exact (eps, delta) curve of
mu-GDP (Dong, Roth & Su; Balle & Wang's analytic Gaussian mechanism) is

    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2).

The estimate is NOT a certified lower bound: it assumes the scores of included and excluded canaries are normal
with one variance, and independent across canaries (true for Dirac gradient canaries, see
:mod:`groupclip.audit.canaries`). Use it to judge how tight the accountant is; use the one-run bound to prove a bug.

Example:
    >>> round(epsilon_from_gdp(1.0, 1e-5), 4)
    4.3772
    >>> delta_from_gdp(1.0, epsilon_from_gdp(1.0, 1e-5)) < 1.0001e-5
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scores import MaskLike, ScoreLike, split_scores
from .stats import normal_cdf, normal_log_cdf, normal_quantile

_BISECTION_STEPS = 200  # bisection on [0, hi] to well below 1e-12 relative precision


def _check_mu(mu: float) -> None:
    if not (mu >= 0 and math.isfinite(mu)):
        raise ValueError(f"Expected a finite mu={mu} >= 0.")


def delta_from_gdp(mu: float, epsilon: float) -> float:
    """The smallest delta such that mu-GDP implies (epsilon, delta)-DP.

    Example:
        >>> round(delta_from_gdp(1.0, 0.0), 4)        # at eps = 0: total variation 2 Phi(mu / 2) - 1
        0.3829
    """
    _check_mu(mu)
    if not epsilon >= 0:
        raise ValueError(f"Expected epsilon={epsilon} >= 0.")
    if mu == 0:
        return 0.0
    if math.isinf(epsilon):
        return 0.0
    first = normal_cdf(-epsilon / mu + mu / 2)
    # e^eps Phi(b) in log space: Phi(b) underflows long before e^eps overflows matters.
    second = math.exp(epsilon + normal_log_cdf(-epsilon / mu - mu / 2))
    return max(0.0, first - second)


def epsilon_from_gdp(mu: float, delta: float) -> float:
    """The smallest epsilon such that mu-GDP implies (epsilon, delta)-DP (exact, by bisection).

    Args:
        mu: the GDP parameter, >= 0.
        delta: in (0, 1).

    Example:
        >>> epsilon_from_gdp(0.0, 1e-5)
        0.0
    """
    _check_mu(mu)
    if not 0 < delta < 1:
        raise ValueError(f"Expected delta={delta} in (0, 1).")
    if mu == 0 or delta_from_gdp(mu, 0.0) <= delta:
        return 0.0
    # delta(eps) <= Phi(-eps / mu + mu / 2), which is delta at this eps: a guaranteed upper bracket.
    hi = max(mu * (mu / 2 - normal_quantile(delta)), 1e-12)
    lo = 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if delta_from_gdp(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return hi


@dataclass(frozen=True)
class GDPEstimate:
    """mu estimated from in/out canary scores, and the epsilon it implies at ``delta``.

    Attributes:
        mu: point estimate, ``(mean_in - mean_out) / pooled standard deviation`` (0 if negative).
        mu_lower: one-sided lower confidence limit of mu at ``confidence`` (normal approximation).
        epsilon: ``epsilon_from_gdp(mu, delta)``.
        epsilon_lower: ``epsilon_from_gdp(mu_lower, delta)``.
        confidence: the confidence level of ``mu_lower``.
        delta: the delta of the epsilons.
        included: canaries in the training set.
        excluded: canaries left out.
    """

    mu: float
    mu_lower: float
    epsilon: float
    epsilon_lower: float
    confidence: float
    delta: float
    included: int
    excluded: int


def estimate_gdp(scores: ScoreLike, included: MaskLike, *, delta: float, confidence: float = 0.95) -> GDPEstimate:
    """Estimate mu from the standardized difference of mean scores (Cohen's d), with a lower confidence limit.

    The limit is ``d - z * se``, ``se^2 = 1 / n_in + 1 / n_out + d^2 / (2 (n_in + n_out - 2))``, the large-sample
    standard error of d under equal-variance normal scores.

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: whether each canary was trained on.
        delta: delta at which to express the estimate as an epsilon.
        confidence: level of the one-sided lower limit ``mu_lower``.

    Raises:
        ValueError: fewer than two canaries on a side, or scores with no spread (mu is not estimable).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> inc = rng.random(4000) < 0.5
        >>> est = estimate_gdp(rng.normal(size=4000) + 0.5 * inc, inc, delta=1e-5)
        >>> abs(est.mu - 0.5) < 0.1 and est.mu_lower < est.mu
        True
    """
    if not 0 < confidence < 1:
        raise ValueError(f"Expected confidence={confidence} in (0, 1).")
    inside, outside = split_scores(scores, included)
    n_in, n_out = len(inside), len(outside)
    if n_in < 2 or n_out < 2:
        raise ValueError(f"Need at least two included and two excluded canaries; got {n_in} and {n_out}.")
    pooled = ((n_in - 1) * np.var(inside, ddof=1) + (n_out - 1) * np.var(outside, ddof=1)) / (n_in + n_out - 2)
    if not pooled > 0:
        raise ValueError("All canary scores are equal within each side: mu cannot be estimated.")
    d = float((np.mean(inside) - np.mean(outside)) / math.sqrt(pooled))
    se = math.sqrt(1 / n_in + 1 / n_out + d * d / (2 * (n_in + n_out - 2)))
    mu = max(0.0, d)
    mu_lower = max(0.0, d - normal_quantile(confidence) * se)
    return GDPEstimate(
        mu=mu,
        mu_lower=mu_lower,
        epsilon=epsilon_from_gdp(mu, delta),
        epsilon_lower=epsilon_from_gdp(mu_lower, delta),
        confidence=confidence,
        delta=delta,
        included=n_in,
        excluded=n_out,
    )
