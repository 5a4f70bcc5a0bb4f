"""A threshold test on canary scores and the Clopper-Pearson epsilon lower bound it gives.

Guess "included" when a canary's score exceeds a threshold. (eps, delta)-DP bounds every such test:
``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``. With a one-sided lower limit on TPR and
an upper limit on FPR (Clopper-Pearson, each at alpha / 2) this gives

    eps >= max(log((TPR_lower - delta) / FPR_upper), log((1 - FPR_upper - delta) / (1 - TPR_lower))).

The intervals treat the canaries as independent trials: true for Dirac gradient canaries (disjoint coordinates,
gradients that do not depend on the model), an approximation for input canaries sharing a model. The threshold is
the empirical FPR quantile of the excluded scores, for which the Clopper-Pearson upper limit is exact.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> inc = rng.random(2000) < 0.5
    >>> rates = tpr_at_fpr(rng.normal(size=2000) + 2.0 * inc, inc, fpr=0.05)
    >>> rates.fpr <= 0.05 and rates.tpr > 0.5
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scores import MaskLike, ScoreLike, as_scores
from .stats import clopper_pearson_lower, clopper_pearson_upper

DEFAULT_FPRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class Rates:
    """Empirical rates of the test "score > threshold".

    Attributes:
        threshold: the threshold (``-inf``: every canary is guessed included).
        tpr: true positive rate, over included canaries.
        fpr: false positive rate, over excluded canaries.
        true_positives: included canaries above the threshold.
        false_positives: excluded canaries above the threshold.
        included: canaries in the training set.
        excluded: canaries left out.
    """

    threshold: float
    tpr: float
    fpr: float
    true_positives: int
    false_positives: int
    included: int
    excluded: int


@dataclass(frozen=True)
class ThresholdBound:
    """The best Clopper-Pearson bound over the thresholds tried.

    Attributes:
        epsilon: the lower bound (0 when nothing is certified).
        rates: the rates at the threshold that gave it.
        tpr_lower: the TPR lower limit there.
        fpr_upper: the FPR upper limit there.
        alpha: the overall significance level.
        candidates: thresholds tried (each at alpha / candidates).
    """

    epsilon: float
    rates: Rates
    tpr_lower: float
    fpr_upper: float
    alpha: float
    candidates: int


def tpr_at_fpr(scores: ScoreLike, included: MaskLike, fpr: float) -> Rates:
    """Rates at the lowest threshold whose false positive rate on the excluded canaries is at most ``fpr``.

    Example:
        >>> r = tpr_at_fpr([3.0, 2.0, 1.0, 0.0], [True, False, True, False], fpr=0.5)
        >>> r.threshold, r.tpr, r.fpr
        (0.0, 1.0, 0.5)
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"Expected fpr={fpr} in [0, 1].")
    s, inc = as_scores(scores, included)
    inside, outside = s[inc], s[~inc]
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError(f"Need included and excluded canaries; got {len(inside)} and {len(outside)}.")
    allowed = math.floor(fpr * len(outside) + 1e-9)  # false positives permitted
    ranked = np.sort(outside)[::-1]
    threshold = float(ranked[allowed]) if allowed < len(ranked) else -math.inf
    tp = int((inside > threshold).sum())
    fp = int((outside > threshold).sum())
    return Rates(threshold, tp / len(inside), fp / len(outside), tp, fp, len(inside), len(outside))


def epsilon_from_rates(rates: Rates, *, delta: float, alpha: float) -> tuple[float, float, float]:
    """``(epsilon lower bound, TPR lower limit, FPR upper limit)`` for one test, at significance ``alpha``.

    Example:
        >>> rates = Rates(0.0, 0.9, 0.01, 900, 10, 1000, 1000)
        >>> eps, tpr_lo, fpr_hi = epsilon_from_rates(rates, delta=1e-5, alpha=0.05)
        >>> 3.5 < eps < 4.5
        True
    """
    if not 0 <= delta < 1:
        raise ValueError(f"Expected delta={delta} in [0, 1).")
    tpr_lo = clopper_pearson_lower(rates.true_positives, rates.included, alpha / 2)
    fpr_hi = clopper_pearson_upper(rates.false_positives, rates.excluded, alpha / 2)
    eps = 0.0
    if tpr_lo - delta > 0 and fpr_hi > 0:
        eps = max(eps, math.log((tpr_lo - delta) / fpr_hi))
    if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
        eps = max(eps, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return eps, tpr_lo, fpr_hi


def epsilon_threshold(
    scores: ScoreLike,
    included: MaskLike,
    *,
    delta: float,
    alpha: float = 0.05,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> ThresholdBound:
    """The Clopper-Pearson lower bound, best over thresholds at the target false positive rates ``fprs``.

    Each threshold is tested at ``alpha / len(fprs)`` (Bonferroni).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> inc = rng.random(2000) < 0.5
        >>> epsilon_threshold(rng.normal(size=2000), inc, delta=1e-5).epsilon     # no signal
        0.0
    """
    if not fprs:
        raise ValueError("Expected at least one target false positive rate.")
    if not 0 < alpha < 1:
        raise ValueError(f"Expected alpha={alpha} in (0, 1).")
    level = alpha / len(fprs)
    best: ThresholdBound | None = None
    for fpr in fprs:
        rates = tpr_at_fpr(scores, included, fpr)
        eps, tpr_lo, fpr_hi = epsilon_from_rates(rates, delta=delta, alpha=level)
        if best is None or eps > best.epsilon:
            best = ThresholdBound(eps, rates, tpr_lo, fpr_hi, alpha, len(fprs))
    return best
