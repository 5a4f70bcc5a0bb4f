"""Empirical epsilon lower bounds from in/out canary scores: one place to import them from.

* :func:`epsilon_one_run` -- the one-run bound of Steinke, Nasr & Jagielski (2023); certified at level alpha
  with no assumption on the scores (:mod:`groupclip.audit.one_run`).
* :func:`estimate_gdp` / :func:`epsilon_from_gdp` -- a Gaussian-DP estimate of mu and its exact (eps, delta)
  (:mod:`groupclip.audit.gdp`); an estimate, not a certificate.
* :func:`epsilon_threshold` / :func:`tpr_at_fpr` -- a Clopper-Pearson bound from a threshold test; certified when
  the canaries are independent trials (:mod:`groupclip.audit.rates`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> inc = rng.random(1000) < 0.5
    >>> scores = rng.normal(size=1000) + 2.0 * inc
    >>> one = epsilon_one_run(scores, inc, delta=1e-5)
    >>> gdp = estimate_gdp(scores, inc, delta=1e-5)
    >>> 0 < one.epsilon < gdp.epsilon          # the certified bound sits below the Gaussian estimate
    True
"""

from __future__ import annotations

from .gdp import GDPEstimate, delta_from_gdp, epsilon_from_gdp, estimate_gdp
from .one_run import OneRunBound, default_guess_counts, epsilon_one_run, one_run_epsilon, one_run_p_value
from .rates import Rates, ThresholdBound, epsilon_from_rates, epsilon_threshold, tpr_at_fpr

__all__ = [
    "GDPEstimate",
    "OneRunBound",
    "Rates",
    "ThresholdBound",
    "default_guess_counts",
    "delta_from_gdp",
    "epsilon_from_gdp",
    "epsilon_from_rates",
    "epsilon_one_run",
    "epsilon_threshold",
    "estimate_gdp",
    "one_run_epsilon",
    "one_run_p_value",
    "tpr_at_fpr",
]
