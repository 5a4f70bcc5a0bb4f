"""The one-run epsilon lower bound of Steinke, Nasr & Jagielski (2023), "Privacy auditing with one training run".

Setting: m canaries, each included in the training set independently with probability 1/2. After training, the
auditor ranks the canaries by score, guesses "included" for the ``k_in`` highest and "excluded" for the ``k_out``
lowest, and abstains on the rest: r = k_in + k_out guesses, of which v are right.

Their theorem: if training is (eps, delta)-DP, the number of right guesses W satisfies, for every v,

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i,

with ``q = e^eps / (1 + e^eps)``. The right-hand side is therefore a p-value for "training is (eps, delta)-DP";
the lower bound is the smallest eps that this p-value no longer rejects at level alpha: every smaller eps is
rejected, and (eps, delta)-DP implies (eps', delta)-DP for eps' > eps, so the claim "epsilon is at least this" is
wrong with probability at most alpha.

Choosing ``(k_in, k_out)`` after looking at the scores would be multiple testing: :func:`epsilon_one_run` tests a
fixed list of candidate pairs, each at level ``alpha / len(candidates)`` (Bonferroni), and reports the best.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> included = rng.random(1000) < 0.5
    >>> scores = rng.normal(size=1000) + 3.0 * included          # a strongly leaking mechanism
    >>> bound = epsilon_one_run(scores, included, delta=1e-5)
    >>> bound.epsilon > 1.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scores import MaskLike, ScoreLike, as_scores
from .stats import binomial_log_pmf

# Fractions of m tried as guess counts by default; both tails, the top alone and the bottom alone.
DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
_SCAN_STEP = 0.5  # coarse scan for the first rejected-to-accepted crossing, then bisection
_MAX_EPSILON = 100.0  # no one-run audit can certify more: log(r) is the ceiling even for r = 1e40 guesses
_BISECTION_STEPS = 50


@dataclass(frozen=True)
class OneRunBound:
    """A one-run lower bound and the guesses behind it.

    Attributes:
        epsilon: the lower bound (0 when nothing could be rejected).
        k_included: how many of the highest-scoring canaries were guessed "included".
        k_excluded: how many of the lowest-scoring canaries were guessed "excluded".
        guesses: r = k_included + k_excluded.
        correct: v, the right guesses among them.
        canaries: m.
        delta: the delta of the tested (eps, delta)-DP hypothesis.
        alpha: the overall significance level.
        candidates: how many (k_included, k_excluded) pairs were tried (each at level alpha / candidates).
    """

    epsilon: float
    k_included: int
    k_excluded: int
    guesses: int
    correct: int
    canaries: int
    delta: float
    alpha: float
    candidates: int


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The theorem's p-value of ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    Args:
        canaries: m, each included with probability 1/2.
        guesses: r <= m guesses made (abstentions excluded).
        correct: v <= r right guesses.
        epsilon: >= 0.
        delta: in [0, 1].

    Example:
        >>> round(one_run_p_value(100, 10, 10, 0.0, 0.0), 6)    # ten fair coin flips all right: 2^-10
        0.000977
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"Expected 0 <= correct={correct} <= guesses={guesses} <= canaries={canaries}.")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"Expected a finite epsilon={epsilon} >= 0.")
    if not 0 <= delta <= 1:
        raise ValueError(f"Expected delta={delta} in [0, 1].")
    softplus = math.log1p(math.exp(-epsilon))  # log(1 + e^-eps): q = e^eps / (1 + e^eps) in log form
    pmf = np.exp(binomial_log_pmf(guesses, -softplus, -epsilon - softplus))
    p = math.fsum(pmf[correct:])
    if delta > 0 and correct > 0:
        # P[v - i <= Binomial < v] for i = 1..v: sums of the pmf walking down from v - 1.
        window = np.cumsum(pmf[correct - 1 :: -1])
        p += 2 * canaries * delta * float(np.max(window / np.arange(1, correct + 1)))
    return min(1.0, p)


def one_run_epsilon(canaries: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """The one-run lower bound for fixed guess counts: the first eps whose p-value reaches ``alpha``.

    Scans upward from 0 in steps of 0.5 and bisects the first crossing, returning its low end: the p-value is not
    guaranteed monotone in eps when delta > 0, and a plain bisection over a wide bracket could land on a later
    crossing, past an eps that is not rejected.

    Example:
        >>> one_run_epsilon(1000, 100, 50, delta=1e-5, alpha=0.05)    # chance level: nothing certified
        0.0
        >>> 3.0 < one_run_epsilon(1000, 100, 100, delta=1e-5, alpha=0.05) < 4.0
        True
    """
    if not 0 < alpha < 1:
        raise ValueError(f"Expected alpha={alpha} in (0, 1).")

    def rejected(eps: float) -> bool:
        return one_run_p_value(canaries, guesses, correct, eps, delta) < alpha

    if not rejected(0.0):
        return 0.0
    lo = 0.0
    while lo < _MAX_EPSILON and rejected(lo + _SCAN_STEP):
        lo += _SCAN_STEP
    if lo >= _MAX_EPSILON:
        return _MAX_EPSILON
    hi = lo + _SCAN_STEP
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_counts(canaries: int) -> list[tuple[int, int]]:
    """The ``(k_included, k_excluded)`` pairs :func:`epsilon_one_run` tries by default.

    Fractions of m from :data:`DEFAULT_GUESS_FRACTIONS`, guessing on both tails, on the top only (membership
    signals such as a loss decrease are often one-sided) and on the bottom only.

    Example:
        >>> default_guess_counts(100)[:3]
        [(1, 1), (2, 2), (5, 5)]
    """
    if canaries < 1:
        raise ValueError(f"Expected canaries={canaries} >= 1.")
    sizes = sorted({max(1, round(canaries * f)) for f in DEFAULT_GUESS_FRACTIONS})
    both = [(k, k) for k in sizes if 2 * k <= canaries]
    return both + [(k, 0) for k in sizes] + [(0, k) for k in sizes]


def guess_outcome(scores: np.ndarray, included: np.ndarray, k_included: int, k_excluded: int) -> tuple[int, int]:
    """``(r, v)``: guesses made and right when guessing the top ``k_included`` in and bottom ``k_excluded`` out.

    Ties are broken by canary index (a stable sort), which does not depend on the coin flips.
    """
    m = len(scores)
    if k_included < 0 or k_excluded < 0 or k_included + k_excluded > m:
        raise ValueError(f"Expected k_included={k_included}, k_excluded={k_excluded} >= 0 with sum <= m={m}.")
    order = np.argsort(-scores, kind="stable")
    right_in = int(included[order[:k_included]].sum())
    right_out = int((~included[order[m - k_excluded :]]).sum()) if k_excluded else 0
    return k_included + k_excluded, right_in + right_out


def epsilon_one_run(
    scores: ScoreLike,
    included: MaskLike,
    *,
    delta: float,
    alpha: float = 0.05,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunBound:
    """The one-run (eps, delta) lower bound from m canary scores, searched over guess counts.

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: whether each canary was in the training set (independent fair coin flips).
        delta: delta of the tested (eps, delta)-DP claim (use the run's target delta).
        alpha: significance level: the bound exceeds the true epsilon with probability at most alpha.
        guess_counts: ``(k_included, k_excluded)`` pairs to try (default :func:`default_guess_counts`); each is
            tested at ``alpha / len(guess_counts)``. Give one pair, fixed in advance, to avoid the correction.

    Returns:
        The best bound over the candidates with its guess counts.

    Example:
        >>> bound = epsilon_one_run([5.0, 4.0, -4.0, -5.0], [True, True, False, False], delta=0.0,
        ...                         guess_counts=[(2, 2)])
        >>> bound.correct, bound.guesses, bound.epsilon   # 4 of 4 right happens by chance 1 time in 16 > alpha
        (4, 4, 0.0)
    """
    s, inc = as_scores(scores, included)
    m = len(s)
    pairs = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not pairs:
        raise ValueError("Expected at least one (k_included, k_excluded) pair.")
    if not 0 <= delta < 1:
        raise ValueError(f"Expected delta={delta} in [0, 1).")
    level = alpha / len(pairs)
    best: OneRunBound | None = None
    for k_in, k_out in pairs:
        r, v = guess_outcome(s, inc, int(k_in), int(k_out))
        eps = one_run_epsilon(m, r, v, delta, level) if r > 0 else 0.0
        if best is None or eps > best.epsilon:
            best = OneRunBound(eps, int(k_in), int(k_out), r, v, m, delta, alpha, len(pairs))
    return best
