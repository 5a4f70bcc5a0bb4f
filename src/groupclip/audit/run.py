"""Running an audit in your own training loop: :class:`Auditor`, :func:`audit_report` and :class:`AuditReport`.

    canaries = DiracCanaries(1000, body, grouping="layer-wise", seed=0)      # or InputCanaries(...)
    private = make_private(canaries.model, optimizer, grouping=canaries.grouping, ...)
    canaries.use_thresholds(private.engine.thresholds)
    auditor = Auditor(canaries, delta=private.delta)
    auditor.start(canaries.model)
    ...                                                                        # train on canaries.training_set(data)
    report = auditor.finish(canaries.model, claimed_epsilon=private.epsilon())
    print(report.summary())

``report.contradicted`` is True when the certified one-run lower bound exceeds the claimed epsilon: the training
is then not (claimed epsilon, delta)-DP, except with probability alpha -- a bug. A bound below the claim proves
nothing about how tight the claim is; the Gaussian-DP estimate (``report.gdp``) is the better guide to that.

A self-contained experiment on a small model lives in :mod:`groupclip.audit.experiment`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from .canaries import CanarySet
from .gdp import GDPEstimate, estimate_gdp
from .one_run import OneRunBound, epsilon_one_run
from .rates import ThresholdBound, epsilon_threshold
from .scores import MaskLike, ScoreLike, as_scores


@dataclass(frozen=True)
class AuditReport:
    """The outcome of an audit.

    Attributes:
        claimed_epsilon: what the accountant claims at ``delta``.
        delta: the delta of the claim and of every bound.
        alpha: significance level of the certified bounds.
        canaries: m.
        included: canaries that were trained on.
        lower_bound: the certified lower bound used for the verdict (the one-run bound).
        one_run: the one-run bound with its guesses (no assumption on the scores).
        gdp: the Gaussian-DP estimate (assumes normal, independent scores); None if not estimable.
        threshold: the Clopper-Pearson bound (assumes independent canaries); None if not computable.
        contradicted: ``lower_bound > claimed_epsilon``: the claim is false, except with probability alpha.
    """

    claimed_epsilon: float
    delta: float
    alpha: float
    canaries: int
    included: int
    lower_bound: float
    one_run: OneRunBound
    gdp: GDPEstimate | None
    threshold: ThresholdBound | None
    contradicted: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats become strings such as ``"-inf"``)."""
        return json_ready(dataclasses.asdict(self))

    def summary(self) -> str:
        """A few human-readable lines."""
        one = self.one_run
        lines = [
            f"claimed epsilon      {self.claimed_epsilon:.4g}  (delta={self.delta:g})",
            f"one-run lower bound  {one.epsilon:.4g}  ({one.correct}/{one.guesses} guesses right, top "
            f"{one.k_included} in / bottom {one.k_excluded} out, m={self.canaries}, alpha={self.alpha:g})",
        ]
        if self.threshold is not None:
            t = self.threshold
            lines.append(
                f"threshold bound      {t.epsilon:.4g}  (TPR >= {t.tpr_lower:.3f}, FPR <= {t.fpr_upper:.3f}; "
                "assumes independent canaries)"
            )
        if self.gdp is not None:
            g = self.gdp
            lines.append(
                f"GDP estimate         epsilon {g.epsilon:.4g} (>= {g.epsilon_lower:.4g} at {g.confidence:.0%}), "
                f"mu {g.mu:.3f} (>= {g.mu_lower:.3f}); an estimate, not a certificate"
            )
        verdict = "CONTRADICTED: the claimed epsilon is violated" if self.contradicted else "not contradicted"
        lines.append(f"verdict              {verdict}")
        return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats as strings (``"inf"``), for JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def audit_report(
    scores: ScoreLike,
    included: MaskLike,
    claimed_epsilon: float,
    delta: float,
    alpha: float = 0.05,
    *,
    confidence: float = 0.95,
) -> AuditReport:
    """Every bound for one set of canary scores, and the verdict against ``claimed_epsilon``.

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: whether each canary was trained on (independent fair coin flips).
        claimed_epsilon: the accountant's epsilon at ``delta``.
        delta: the run's delta.
        alpha: significance level of the certified bounds.
        confidence: level of the GDP estimate's lower limit.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> inc = rng.random(1000) < 0.5
        >>> report = audit_report(rng.normal(size=1000) + 10 * inc, inc, claimed_epsilon=1.0, delta=1e-5)
        >>> report.contradicted                       # perfectly separable scores cannot be 1-DP
        True
    """
    s, inc = as_scores(scores, included)
    one = epsilon_one_run(s, inc, delta=delta, alpha=alpha)
    gdp = threshold = None
    if 2 <= inc.sum() <= len(inc) - 2:
        try:
            gdp = estimate_gdp(s, inc, delta=delta, confidence=confidence)
        except ValueError:  # every score equal on both sides: no spread to estimate mu from
            gdp = None
        threshold = epsilon_threshold(s, inc, delta=delta, alpha=alpha)
    return AuditReport(
        claimed_epsilon=float(claimed_epsilon),
        delta=delta,
        alpha=alpha,
        canaries=len(s),
        included=int(inc.sum()),
        lower_bound=one.epsilon,
        one_run=one,
        gdp=gdp,
        threshold=threshold,
        contradicted=one.epsilon > claimed_epsilon,
    )


class Auditor:
    """Collects canary scores around a user's training loop and reports.

    Args:
        canaries: a :class:`~groupclip.audit.canaries.DiracCanaries` or
            :class:`~groupclip.audit.canaries.InputCanaries` (anything with ``included``, ``snapshot`` and
            ``scores``).
        delta: the run's delta.
        alpha: significance level of the certified bounds.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from groupclip.audit.canaries import DiracCanaries
        >>> canaries = DiracCanaries(20, nn.Linear(3, 2), seed=0)
        >>> auditor = Auditor(canaries, delta=1e-5)
        >>> auditor.start(canaries.model)           # before the first step
        >>> auditor.scores(canaries.model).shape    # nothing trained yet: all zero
        (20,)
    """

    def __init__(self, canaries: CanarySet, *, delta: float, alpha: float = 0.05) -> None:
        self.canaries = canaries
        self.delta = delta
        self.alpha = alpha
        self.started = False

    def start(self, model: nn.Module) -> None:
        """Record the canaries' starting point; call before training."""
        self.canaries.snapshot(model)
        self.started = True

    def scores(self, model: nn.Module) -> np.ndarray:
        """``[m]`` scores now (float64)."""
        if not self.started:
            raise RuntimeError("Call Auditor.start(model) before training.")
        return self.canaries.scores(model).detach().cpu().double().numpy()

    @property
    def included(self) -> np.ndarray:
        """``[m]`` bool: which canaries were in the training set."""
        return self.canaries.included.detach().cpu().numpy().astype(bool)

    def finish(self, model: nn.Module, claimed_epsilon: float) -> AuditReport:
        """Score the canaries and report against ``claimed_epsilon`` (e.g. ``private.epsilon()``)."""
        return audit_report(self.scores(model), self.included, claimed_epsilon, self.delta, self.alpha)
