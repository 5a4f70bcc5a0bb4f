"""The one-run bound: its p-value re-derived from the theorem with math.comb, its inversion, and its behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from groupclip.audit import epsilon_one_run, one_run_epsilon, one_run_p_value
from groupclip.audit.one_run import default_guess_counts, guess_outcome


def theorem_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Bin(r, q) < v] / i, q = e^eps / (1 + e^eps)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = math.fsum(pmf[v:])
    worst = max((math.fsum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(100, 20, 15, 0.5, 1e-3), (1000, 60, 50, 1.2, 1e-5), (50, 50, 50, 3.0, 1e-4), (200, 10, 0, 0.1, 1e-5)],
)
def test_p_value_matches_the_theorem(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(theorem_p_value(m, r, v, eps, delta), rel=1e-9)


def test_bound_is_where_the_p_value_crosses_alpha():
    m, r, v, delta, alpha = 1000, 200, 150, 1e-5, 0.01
    eps = one_run_epsilon(m, r, v, delta, alpha)
    assert eps > 0
    # The crossing, up to rounding: just below it the claim is rejected, just above it is not.
    assert theorem_p_value(m, r, v, eps - 1e-9, delta) < alpha <= theorem_p_value(m, r, v, eps + 1e-9, delta)


def test_all_right_without_delta_has_a_closed_form():
    # v = r, delta = 0: p = q^r, so the bound solves q^r = alpha: eps = -log(expm1(log(1 / alpha) / r)).
    for r in (10, 100, 1000):
        closed = -math.log(math.expm1(math.log(1 / 0.05) / r))
        assert one_run_epsilon(r, r, r, 0.0, 0.05) == pytest.approx(closed, abs=1e-9)


def test_all_guesses_right_bound_grows_with_m():
    bounds = [one_run_epsilon(m, m, m, 1e-6, 0.05) for m in (100, 1000, 10000)]
    assert bounds[0] < bounds[1] < bounds[2]
    assert bounds[2] < math.log(10000)  # a one-run audit can certify about log(r) at most


def test_delta_only_weakens_the_bound():
    no_delta = one_run_epsilon(1000, 200, 180, 0.0, 0.05)
    assert one_run_epsilon(1000, 200, 180, 1e-5, 0.05) <= no_delta
    assert one_run_epsilon(1000, 200, 180, 1e-3, 0.05) < no_delta


def test_chance_level_certifies_nothing():
    rng = np.random.default_rng(1234)
    bounds = []
    for _ in range(8):
        included = rng.random(1000) < 0.5
        bounds.append(epsilon_one_run(rng.normal(size=1000), included, delta=1e-5).epsilon)
    assert sum(b > 0 for b in bounds) <= 1  # each is > 0 with probability at most alpha = 0.05


def test_more_signal_gives_a_larger_bound_and_alpha_trades_off():
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    noise = rng.normal(size=1000)
    weak = epsilon_one_run(noise + 1.0 * included, included, delta=1e-5)
    strong = epsilon_one_run(noise + 3.0 * included, included, delta=1e-5)
    assert 0 < weak.epsilon < strong.epsilon
    loose = epsilon_one_run(noise + 1.0 * included, included, delta=1e-5, alpha=0.2)
    assert loose.epsilon >= weak.epsilon


def test_search_reports_its_guesses_and_corrects_for_them():
    rng = np.random.default_rng(3)
    included = rng.random(500) < 0.5
    scores = rng.normal(size=500) + 2.0 * included
    best = epsilon_one_run(scores, included, delta=1e-5)
    assert best.candidates == len(default_guess_counts(500))
    assert (best.guesses, best.correct) == guess_outcome(scores, included, best.k_included, best.k_excluded)
    # The same guesses tested alone (no correction) certify at least as much.
    alone = epsilon_one_run(scores, included, delta=1e-5, guess_counts=[(best.k_included, best.k_excluded)])
    assert alone.epsilon >= best.epsilon and alone.candidates == 1


def test_guess_outcome_counts_top_and_bottom():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    included = np.array([True, False, True, False, False])
    assert guess_outcome(scores, included, 2, 2) == (4, 3)  # top {5, 4}: 1 right; bottom {2, 1}: 2 right
    assert guess_outcome(scores, included, 0, 1) == (1, 1)
    with pytest.raises(ValueError):
        guess_outcome(scores, included, 3, 3)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        epsilon_one_run([1.0, float("nan")], [True, False], delta=1e-5)
    with pytest.raises(ValueError):
        epsilon_one_run([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError):
        one_run_p_value(10, 5, 6, 1.0, 1e-5)
