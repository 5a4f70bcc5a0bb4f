"""TPR at FPR and the Clopper-Pearson bound, against the formula evaluated here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from groupclip.audit import Rates, epsilon_from_rates, epsilon_threshold, tpr_at_fpr


def test_tpr_at_fpr_by_hand():
    scores = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    included = [True, True, False, True, False, False, True, False]
    rates = tpr_at_fpr(scores, included, fpr=0.25)  # 4 excluded: one false positive allowed
    assert (rates.threshold, rates.true_positives, rates.false_positives) == (5.0, 3, 1)
    assert (rates.tpr, rates.fpr) == (0.75, 0.25)
    assert tpr_at_fpr(scores, included, fpr=0.0).false_positives == 0
    assert tpr_at_fpr(scores, included, fpr=1.0).threshold == -math.inf


def test_fpr_never_exceeds_the_target():
    rng = np.random.default_rng(5)
    included = rng.random(999) < 0.5
    scores = np.round(rng.normal(size=999), 1)  # ties at the threshold
    for target in (0.01, 0.1, 0.33):
        assert tpr_at_fpr(scores, included, target).fpr <= target


def test_bound_is_the_formula_at_the_clopper_pearson_limits():
    stats = pytest.importorskip("scipy.stats")
    rates = Rates(0.0, 0.8, 0.02, 400, 10, 500, 500)
    eps, tpr_lo, fpr_hi = epsilon_from_rates(rates, delta=1e-5, alpha=0.05)
    assert tpr_lo == pytest.approx(stats.beta.ppf(0.025, 400, 101), rel=1e-8)
    assert fpr_hi == pytest.approx(stats.beta.ppf(0.975, 11, 490), rel=1e-8)
    assert eps == pytest.approx(math.log((tpr_lo - 1e-5) / fpr_hi), rel=1e-12)


def test_null_scores_certify_nothing_and_a_leak_is_found():
    rng = np.random.default_rng(11)
    included = rng.random(2000) < 0.5
    noise = rng.normal(size=2000)
    assert epsilon_threshold(noise, included, delta=1e-5).epsilon == 0.0
    leak = epsilon_threshold(noise + 4.0 * included, included, delta=1e-5)
    assert leak.epsilon > 2.0 and leak.candidates == 6
