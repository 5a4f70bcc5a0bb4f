"""Empirical privacy auditing: lower bounds on epsilon from canaries, to catch bugs in DP training.

Train with canaries -- :class:`DiracCanaries` (white-box: each canary's gradient is a chosen direction in every
clipping group) or :class:`InputCanaries` (black-box: extra examples scored by loss decrease) -- each included with
probability 1/2; score them after training; :func:`audit_report` compares the certified one-run lower bound with
the accountant's epsilon. A bound above the claim proves a bug (except with probability alpha); a bound below it
says nothing about tightness. :func:`run_audit` does all of it on a small model, optionally with a planted bug.

Example:
    >>> import numpy as np
    >>> from groupclip.audit import audit_report
    >>> rng = np.random.default_rng(0)
    >>> inc = rng.random(1000) < 0.5
    >>> audit_report(rng.normal(size=1000), inc, claimed_epsilon=1.0, delta=1e-5).contradicted
    False
"""

from __future__ import annotations

from .bounds import (
    GDPEstimate,
    OneRunBound,
    Rates,
    ThresholdBound,
    delta_from_gdp,
    epsilon_from_gdp,
    epsilon_from_rates,
    epsilon_one_run,
    epsilon_threshold,
    estimate_gdp,
    one_run_epsilon,
    one_run_p_value,
    tpr_at_fpr,
)
from .canaries import NOT_A_CANARY, AuditedModel, AuditLayer, DiracCanaries, InputCanaries, draw_inclusion, expected_mu
from .experiment import AuditConfig, AuditConfigError, AuditResult, run_audit
from .plants import PLANTS, PlantedSetup, PlantError, plant_after_setup, planted_setup
from .plot import plot_scores
from .run import Auditor, AuditReport, audit_report

__all__ = [
    "NOT_A_CANARY",
    "PLANTS",
    "AuditConfig",
    "AuditConfigError",
    "AuditLayer",
    "AuditReport",
    "AuditResult",
    "AuditedModel",
    "Auditor",
    "DiracCanaries",
    "GDPEstimate",
    "InputCanaries",
    "OneRunBound",
    "PlantError",
    "PlantedSetup",
    "Rates",
    "ThresholdBound",
    "audit_report",
    "delta_from_gdp",
    "draw_inclusion",
    "epsilon_from_gdp",
    "epsilon_from_rates",
    "epsilon_one_run",
    "epsilon_threshold",
    "estimate_gdp",
    "expected_mu",
    "one_run_epsilon",
    "one_run_p_value",
    "plant_after_setup",
    "planted_setup",
    "plot_scores",
    "run_audit",
    "tpr_at_fpr",
]
