"""The real pipeline, audited: an honest run is tight enough and not flagged; each planted bug is flagged.

Tiny MLP, Dirac canaries in every group, 4 full-batch steps with sigma = 4: each canary is 0.5-GDP, the RDP
accountant claims epsilon ~2.17 at delta = 1e-5. The honest run uses 4000 canaries so that its statistical checks
hold for any seed (the GDP standard error is ~0.03), the planted bugs 1000 (they separate perfectly).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from groupclip.audit import AuditConfig, AuditConfigError, PlantError, plant_after_setup, run_audit

BASE = AuditConfig(canaries=1000, steps=4, noise_multiplier=4.0, grouping="layer-wise", seed=0)
HONEST = replace(BASE, canaries=4000)


@pytest.fixture(scope="module")
def honest():
    return run_audit(HONEST)


def test_honest_run_is_not_contradicted(honest):
    report = honest.report
    assert report.claimed_epsilon == pytest.approx(2.1657, abs=1e-3)
    assert not report.contradicted
    assert 0 < report.lower_bound < report.claimed_epsilon


def test_gdp_estimate_recovers_the_canary_mechanism(honest):
    # sigma = 4, T = 4, q = 1: each canary is exactly a Gaussian mechanism with mu = sqrt(T) / sigma = 0.5.
    assert honest.expected_mu == 0.5
    gdp = honest.report.gdp
    assert gdp.mu == pytest.approx(0.5, abs=0.15)  # ~5 standard errors
    assert gdp.mu_lower < gdp.mu
    # Tightness target: the GDP lower limit reaches at least half the claimed epsilon.
    assert gdp.epsilon_lower >= 0.5 * honest.report.claimed_epsilon


@pytest.mark.parametrize("plant", ["no-clipping", "low-noise", "unclipped-group"])
def test_planted_bug_is_flagged(plant):
    result = run_audit(replace(BASE, plant=plant))
    report = result.report
    assert report.claimed_epsilon == pytest.approx(2.1657, abs=1e-3)  # the accountant sees the stated sigma
    assert report.contradicted, report.summary()
    if plant == "unclipped-group":  # the leak shows in the unclipped group's coordinates only
        assert result.group_bounds["0"] > report.claimed_epsilon >= result.group_bounds["2"]


def test_low_noise_plant_fails_loudly_without_its_attribute():
    with pytest.raises(PlantError, match="gradient_noise_multiplier"):
        plant_after_setup(object(), "low-noise")


def test_black_box_honest_run_is_not_contradicted():
    result = run_audit(AuditConfig(canaries=200, steps=2, kind="black-box", seed=1))
    assert not result.report.contradicted and result.expected_mu is None


def test_black_box_catches_missing_clipping():
    # Loss-decrease scores see unclipped out-of-distribution canaries (caught on every seed tried, with margin);
    # the low-noise plant is caught on some seeds only, so it is not asserted here.
    result = run_audit(replace(BASE, kind="black-box", plant="no-clipping"))
    assert result.report.contradicted, result.report.summary()


@pytest.mark.parametrize(
    "change",
    [{"canaries": 2}, {"steps": 0}, {"alpha": 1.5}, {"delta": 0.0}, {"plant": "typo"}, {"noise_multiplier": None}],
)
def test_bad_settings_raise_one_line_errors(change):
    with pytest.raises(AuditConfigError) as info:
        run_audit(replace(BASE, **change))
    assert "\n" not in str(info.value)


def test_certified_bound_is_reported_against_the_claim(honest):
    # The one-run bound certifies a fraction of the claim only (~0.2-0.4 at this m, as the theorem's
    # randomized-response analysis allows); it must stay positive -- the canaries do leak -- and below the claim.
    one = honest.report.one_run
    assert 0 < one.epsilon < honest.report.claimed_epsilon and one.canaries == 4000
