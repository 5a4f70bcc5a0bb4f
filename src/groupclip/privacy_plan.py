"""Privacy settings, checked once and resolved into a :class:`PrivacyPlan`.

Every front end (``make_private`` and its distributed builders, ``groupclip train``, the Trainer integration) passes
what the user gave through :func:`plan_privacy`; nothing else validates or completes privacy settings. An error
names the argument and the fix, and is raised before anything is attached.

    >>> plan = plan_privacy(target_epsilon=3.0, target_delta=1e-5, epochs=2, batch_size=256, data_size=60000)
    >>> round(plan.noise_multiplier, 2), plan.planned_steps
    (0.9, 469)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

from .accounting import AccountantKind, calibrate_noise_multiplier
from .errors import GroupClipError
from .sampling import expected_steps

ACCOUNTANTS = ("rdp", "pld")


class PrivacySetupError(GroupClipError, ValueError):
    """The privacy settings are incomplete or inconsistent."""


class NoPrivacyWarning(UserWarning):
    """A noise multiplier of 0: the run is not differentially private (epsilon is infinite)."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP run will do, resolved from the user's settings.

    Attributes:
        noise_multiplier: sigma, the stated multiplier the accountant records (calibrated if a target was given).
        sample_rate: q, the Poisson sampling rate.
        data_size: N.
        delta: the run's delta (the target's, or ``min(1e-5, 1 / (10 N))``).
        accountant: ``"rdp"`` or ``"pld"``.
        planned_steps: steps the calibration assumed (from ``steps`` or ``epochs``), None if not planned.
        target_epsilon: the epsilon sigma was calibrated for, None if sigma was given.
    """

    noise_multiplier: float
    sample_rate: float
    data_size: int
    delta: float
    accountant: AccountantKind
    planned_steps: int | None
    target_epsilon: float | None

    @property
    def expected_batch_size(self) -> float:
        """``q N``: the gradient sum is divided by it."""
        return self.sample_rate * self.data_size

    def describe(self) -> str:
        how = (
            f"calibrated to epsilon {self.target_epsilon:g} over {self.planned_steps} steps"
            if self.target_epsilon is not None
            else "given"
        )
        return (
            f"noise multiplier {self.noise_multiplier:.4g} ({how}), sample rate {self.sample_rate:.4g} "
            f"(expected batch {self.expected_batch_size:.4g} of N = {self.data_size}), delta {self.delta:g}, "
            f"{self.accountant.upper()} accounting"
        )


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacySetupError(f"Expected {name} to be a number; got {value!r}.")
    if integer and not (isinstance(value, numbers.Integral) or float(value).is_integer()):
        raise PrivacySetupError(f"Expected {name}={value!r} to be a whole number.")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise PrivacySetupError(f"Expected {name}={value!r} to be finite and {bound}.")
    return int(value) if integer else float(value)


def plan_privacy(
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float | None = None,
    batch_size: float | None = None,
    data_size: int | None = None,
    accountant: AccountantKind = "rdp",
    stacklevel: int = 2,
) -> PrivacyPlan:
    """Check and complete the privacy settings of a run (one place for all front ends).

    Give ``data_size`` N with ``sample_rate`` q or ``batch_size`` (the expected batch size, q = B / N); and
    ``noise_multiplier``, or ``target_epsilon`` with ``epochs`` or ``steps`` to calibrate it (``target_delta``
    defaults to ``min(1e-5, 1 / (10 N))``).

    Raises:
        PrivacySetupError: a missing, malformed or contradictory setting (named, with the fix).
        UnreachableEpsilonError: the target epsilon cannot be reached in the planned steps.

    Warns:
        UserWarning: ``delta >= 1/N``; :class:`NoPrivacyWarning`: noise multiplier 0.
    """
    if data_size is None:
        raise PrivacySetupError("Give data_size (the number of training examples N).")
    data_size = _positive("data_size", data_size, integer=True)
    if accountant not in ACCOUNTANTS:
        raise PrivacySetupError(f"Expected accountant={accountant!r} in {ACCOUNTANTS}.")
    if sample_rate is None and batch_size is None:
        raise PrivacySetupError("Give sample_rate, or batch_size (the expected batch size) with data_size.")
    if batch_size is not None:
        batch_size = _positive("batch_size", batch_size)
    if sample_rate is None:
        sample_rate = batch_size / data_size
        if sample_rate > 1:
            raise PrivacySetupError(
                f"batch_size={batch_size:g} exceeds data_size={data_size}: the expected batch size is at most N."
            )
    else:
        sample_rate = _positive("sample_rate", sample_rate)
        if sample_rate > 1:
            raise PrivacySetupError(f"Expected sample_rate={sample_rate} in (0, 1].")
        if batch_size is not None and not math.isclose(sample_rate * data_size, batch_size, rel_tol=1e-9):
            raise PrivacySetupError(
                f"sample_rate={sample_rate} and batch_size={batch_size:g} disagree for data_size={data_size} "
                f"(q * N = {sample_rate * data_size:g}); give one of them."
            )
    if target_delta is not None:
        target_delta = _positive("target_delta", target_delta)
        if target_delta >= 1:
            raise PrivacySetupError(f"Expected target_delta={target_delta} in (0, 1); use a delta well below 1/N.")
    delta = target_delta if target_delta is not None else min(1e-5, 1 / (10 * data_size))
    if delta >= 1 / data_size:
        warnings.warn(
            f"target_delta={delta} >= 1/N = {1 / data_size:.3g}: such a delta allows leaking a whole example; "
            "use delta well below 1/N (e.g. 1/(10 N)).",
            stacklevel=stacklevel + 1,
        )
    if epochs is not None and steps is not None:
        raise PrivacySetupError(f"Give epochs or steps, not both (got epochs={epochs}, steps={steps}).")
    planned = None
    if steps is not None:
        planned = _positive("steps", steps, integer=True)
    elif epochs is not None:
        planned = expected_steps(sample_rate, _positive("epochs", epochs))
    if noise_multiplier is not None and target_epsilon is not None:
        raise PrivacySetupError(
            f"Give noise_multiplier or target_epsilon, not both (got {noise_multiplier} and {target_epsilon}): "
            "a given noise multiplier fixes epsilon, a target epsilon fixes the noise multiplier."
        )
    if noise_multiplier is None:
        if target_epsilon is None:
            raise PrivacySetupError(
                "Give noise_multiplier, or target_epsilon with epochs or steps to calibrate the noise multiplier."
            )
        target_epsilon = _positive("target_epsilon", target_epsilon)
        if target_delta is None:
            raise PrivacySetupError(
                f"target_epsilon={target_epsilon} needs target_delta: an epsilon means nothing without its delta "
                f"(e.g. target_delta=1/(10 N) = {1 / (10 * data_size):.3g})."
            )
        if planned is None:
            raise PrivacySetupError(
                f"target_epsilon={target_epsilon} needs the length of the run to calibrate the noise: give epochs "
                "or steps (> 0)."
            )
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, planned, accountant)
    else:
        noise_multiplier = _positive("noise_multiplier", noise_multiplier, allow_zero=True)
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: no noise is added, so the run is not differentially private (epsilon is "
                "infinite). Use it only to test clipping.",
                NoPrivacyWarning,
                stacklevel=stacklevel + 1,
            )
    return PrivacyPlan(noise_multiplier, sample_rate, data_size, delta, accountant, planned, target_epsilon)
