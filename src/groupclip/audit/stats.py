"""Small exact statistics the bounds need: binomial tails, Clopper-Pearson limits and the normal distribution.

Written against numpy and the standard library only, so the auditor needs nothing beyond groupclip's own
dependencies (scipy is not one of them).

Example:
    >>> round(binomial_sf(8, 10, 0.5), 6)          # P[Binomial(10, 1/2) >= 8] = 56 / 1024
    0.054688
    >>> lo = clopper_pearson_lower(9, 10, 0.05)    # one-sided 95% lower limit of a 9/10 success rate
    >>> 0.60 < lo < 0.61
    True
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

_STANDARD_NORMAL = NormalDist()
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# Bisection steps for quantities in [0, 1]: 2^-60 is below double precision around any value used here.
_BISECTION_STEPS = 60


def _log_factorials(n: int) -> np.ndarray:
    """``log k!`` for ``k = 0..n`` (a running sum of logs: exact enough for the n of an audit, up to ~1e6)."""
    out = np.zeros(n + 1)
    if n > 0:
        out[1:] = np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))
    return out


def binomial_log_pmf(n: int, log_p: float, log_1mp: float) -> np.ndarray:
    """``log P[Binomial(n, p) = k]`` for ``k = 0..n``, from ``log p`` and ``log(1 - p)``.

    Taking logs as input keeps ``p`` close to 1 accurate (the one-run bound uses ``p = e^eps / (1 + e^eps)``).

    Args:
        n: number of trials, >= 0.
        log_p: ``log p`` (``-inf`` for p = 0).
        log_1mp: ``log(1 - p)`` (``-inf`` for p = 1).
    """
    k = np.arange(n + 1, dtype=np.float64)
    logfact = _log_factorials(n)
    log_choose = logfact[n] - logfact[: n + 1] - logfact[n::-1]
    # 0 * log(0) is 0 here (an impossible outcome only when its count is positive), not nan.
    with np.errstate(invalid="ignore"):
        succ = np.where(k > 0, k * log_p, 0.0)
        fail = np.where(n - k > 0, (n - k) * log_1mp, 0.0)
    return log_choose + succ + fail


def binomial_pmf(n: int, p: float) -> np.ndarray:
    """``P[Binomial(n, p) = k]`` for ``k = 0..n``.

    Example:
        >>> binomial_pmf(2, 0.5).round(4).tolist()
        [0.25, 0.5, 0.25]
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected p={p} in [0, 1].")
    log_p = math.log(p) if p > 0 else -math.inf
    log_1mp = math.log1p(-p) if p < 1 else -math.inf
    return np.exp(binomial_log_pmf(n, log_p, log_1mp))


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P[Binomial(n, p) >= k]`` (1 for ``k <= 0``, 0 for ``k > n``)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(min(1.0, math.fsum(binomial_pmf(n, p)[k:])))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P[Binomial(n, p) <= k]`` (0 for ``k < 0``, 1 for ``k >= n``)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, math.fsum(binomial_pmf(n, p)[: k + 1])))


def _bisect(fn, target: float, increasing: bool) -> float:
    """The ``p`` in [0, 1] where the monotone ``fn`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < target
        if below == increasing:
            lo = mid
        else:
            hi = mid
    return lo if increasing else hi


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` lower confidence limit of a success probability (Clopper-Pearson).

    The ``p`` with ``P[Binomial(trials, p) >= successes] = alpha``; 0 when there is no success. Returned from the
    low side of the bisection so the limit never exceeds the exact one.
    """
    _check_counts(successes, trials, alpha)
    if successes == 0:
        return 0.0
    return _bisect(lambda p: binomial_sf(successes, trials, p), alpha, increasing=True)


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` upper confidence limit of a success probability (Clopper-Pearson).

    The ``p`` with ``P[Binomial(trials, p) <= successes] = alpha``; 1 when every trial succeeded.
    """
    _check_counts(successes, trials, alpha)
    if successes == trials:
        return 1.0
    return _bisect(lambda p: binomial_cdf(successes, trials, p), alpha, increasing=False)


def _check_counts(successes: int, trials: int, alpha: float) -> None:
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"Expected 0 <= successes={successes} <= trials={trials} and trials >= 1.")
    if not 0 < alpha < 1:
        raise ValueError(f"Expected alpha={alpha} in (0, 1).")


def normal_cdf(x: float) -> float:
    """``Phi(x)``, the standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_log_cdf(x: float) -> float:
    """``log Phi(x)``, accurate in the far left tail where ``Phi`` itself underflows."""
    if x > -30.0:
        return math.log(normal_cdf(x))
    # Asymptotic (Mills ratio) series: at x <= -30 the terms kept are accurate to far below double precision.
    inv2 = 1.0 / (x * x)
    series = 1.0 - inv2 + 3.0 * inv2 * inv2 - 15.0 * inv2**3
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log(series)


def normal_quantile(p: float) -> float:
    """``Phi^{-1}(p)`` for ``p`` in (0, 1)."""
    return _STANDARD_NORMAL.inv_cdf(p)
