"""Noise calibration over a grid of (epsilon, delta, q, steps), checked against dp-accounting directly.

For every grid point, :func:`groupclip.accounting.calibrate_noise_multiplier` (RDP, the default accountant) must
return a sigma whose epsilon -- computed here with ``dp_accounting.rdp.RdpAccountant`` composing
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` ``steps`` times, not with groupclip's own epsilon function --
is at most the target, and tight: within the calibration's tolerance (0.5%) below the target. Two exceptions are
checked for what they are instead of being skipped:

* epsilon jumps at sigma (it drops to 0 there when delta is large next to q * steps): a sigma 1e-6 smaller must
  already exceed the target, so no smaller sigma meets it;
* sigma is the smallest the search tries (``MIN_NOISE_MULTIPLIER``) and already meets the target.

A target no sigma up to ``MAX_NOISE_MULTIPLIER`` reaches must be refused with :class:`UnreachableEpsilonError`,
and then epsilon at that largest sigma must exceed the target and be the nearest epsilon the error reports.

The grid: q = 1 (cheap to account) over every epsilon in {0.5, 1, 3, 8}, delta in {1e-6, 1e-3, 0.1} and steps in
{1, 2, 3, 5, 10, 100, 1000}; q in {0.001, 0.01, 0.1} (slow: seconds per calibration on a loaded CPU) over a cover
in which every q meets small and large step counts, every delta and every epsilon; and the case of the issue
(epsilon 3, delta 1e-3, q 0.01, 10 steps: a math domain error before) through ``make_private``.
"""

from __future__ import annotations

import itertools
import logging

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch import nn

from groupclip import make_private
from groupclip.accounting import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    UnreachableEpsilonError,
    calibrate_noise_multiplier,
)

TOLERANCE = 0.005  # calibrate_noise_multiplier's default: epsilon in [target (1 - tolerance), target]
EPSILONS = (0.5, 1.0, 3.0, 8.0)
DELTAS = (1e-6, 1e-3, 0.1)
STEPS = (1, 2, 3, 5, 10, 100, 1000)

FULL_SAMPLING = [(eps, delta, 1.0, steps) for eps, delta, steps in itertools.product(EPSILONS, DELTAS, STEPS)]
SUBSAMPLED = [
    (0.5, 1e-6, 0.001, 1),
    (3.0, 1e-3, 0.001, 3),
    (8.0, 1e-6, 0.001, 5),
    (1.0, 1e-3, 0.001, 100),
    (1.0, 1e-6, 0.001, 10),
    (1.0, 1e-3, 0.01, 1),
    (3.0, 1e-6, 0.01, 2),
    (8.0, 0.1, 0.01, 3),
    (3.0, 1e-3, 0.01, 10),  # the issue's case
    (0.5, 1e-3, 0.01, 1000),
    (3.0, 0.1, 0.1, 1),
    (0.5, 1e-6, 0.1, 3),
    (1.0, 0.1, 0.1, 5),
    (3.0, 1e-3, 0.1, 10),
    (8.0, 1e-6, 0.1, 100),
    (0.5, 0.1, 0.1, 1000),
]


def direct_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps, by dp-accounting's RDP accountant alone."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def check_calibrated(sigma: float, target: float, delta: float, q: float, steps: int) -> None:
    spent = direct_epsilon(sigma, q, steps, delta)
    assert spent <= target, f"sigma {sigma} spends {spent} > {target}"
    if spent >= target * (1 - TOLERANCE):
        return  # tight
    if sigma == MIN_NOISE_MULTIPLIER:
        return  # the smallest sigma searched already meets the target
    below = direct_epsilon(sigma * (1 - 1e-6), q, steps, delta)
    assert below > target, f"sigma {sigma} spends {spent}, {1e-6:g} less spends {below}: not tight"


def check_grid_point(target: float, delta: float, q: float, steps: int) -> None:
    try:
        sigma = calibrate_noise_multiplier(target, delta, q, steps)
    except UnreachableEpsilonError as err:
        nearest = direct_epsilon(MAX_NOISE_MULTIPLIER, q, steps, delta)
        assert nearest > target
        assert err.nearest_epsilon == pytest.approx(nearest, rel=1e-9)
        assert err.noise_multiplier == MAX_NOISE_MULTIPLIER
        return
    assert MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER
    check_calibrated(sigma, target, delta, q, steps)


@pytest.mark.parametrize(("target", "delta", "q", "steps"), FULL_SAMPLING + SUBSAMPLED)
def test_calibrated_sigma_meets_the_target_tightly(target, delta, q, steps):
    check_grid_point(target, delta, q, steps)


def test_the_issue_case_calibrates_through_make_private():
    """epsilon 3, delta 1e-3, q 0.01, 10 steps raised a math domain error in the calibration."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(torch.float64)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_epsilon=3.0,
        target_delta=1e-3,
        steps=10,
        sample_rate=0.01,
        data_size=100,
    )
    assert private.plan.planned_steps == 10 and private.sample_rate == 0.01
    check_calibrated(private.noise_multiplier, 3.0, 1e-3, 0.01, 10)
    private.detach()


def test_the_grid_covers_every_value():
    subsampled = set(SUBSAMPLED)
    for q in (0.001, 0.01, 0.1):
        rows = [row for row in subsampled if row[2] == q]
        assert min(r[3] for r in rows) <= 2 and max(r[3] for r in rows) >= 5
    assert {r[0] for r in subsampled} == set(EPSILONS)
    assert {r[1] for r in subsampled} == set(DELTAS)
    assert {r[3] for r in subsampled} | {r[3] for r in FULL_SAMPLING} == set(STEPS)
    assert set(STEPS) <= {r[3] for r in subsampled}
