"""Privacy accounting with Google's ``dp-accounting`` (``docs/MATH.md``, section "Accounting").

One DP-SGD step is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; a run is the composition of its steps.
:class:`PrivacyAccountant` keeps the ledger of those events (runs of equal steps compressed), answers epsilon for a
delta with dp-accounting's RDP or PLD accountant, and saves / restores the ledger with checkpoints.
:func:`calibrate_noise_multiplier` finds the noise multiplier reaching a target epsilon by a bracketed search over
epsilons computed by dp-accounting.

``dp-accounting`` is an optional dependency: ``pip install dp-accounting`` (or ``groupclip[accounting]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import GroupClipError

AccountantKind = Literal["rdp", "pld"]
ACCOUNTANTS = ("rdp", "pld")

# The calibration search never goes beyond this noise multiplier; targets needing more are "unreachable".
MAX_NOISE_MULTIPLIER = 100.0
MIN_NOISE_MULTIPLIER = 0.05


class UnreachableEpsilonError(GroupClipError, ValueError):
    """No noise multiplier within the search range reaches the target epsilon."""

    def __init__(self, message: str, nearest_epsilon: float, noise_multiplier: float) -> None:
        super().__init__(message)
        self.nearest_epsilon = nearest_epsilon
        self.noise_multiplier = noise_multiplier


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Privacy accounting needs Google's dp-accounting package: pip install dp-accounting "
            "(or pip install 'groupclip[accounting]')."
        ) from exc
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that fail to converge are dropped, not news
    return dp_accounting


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"Expected accountant={kind!r} in {ACCOUNTANTS}.")


def make_accountant(kind: AccountantKind = "rdp"):
    """A fresh dp-accounting accountant: ``RdpAccountant()`` or ``pld.PLDAccountant()``."""
    _check_kind(kind)
    dp = _dp_accounting()
    if kind == "rdp":
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant()
    return dp.pld.PLDAccountant()


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int):
    """``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``."""
    dp = _dp_accounting()
    return dp.SelfComposedDpEvent(
        dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier)), int(steps)
    )


def _check_event(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"Expected noise_multiplier={noise_multiplier} in [0, inf).")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"Expected sample_rate={sample_rate} in (0, 1].")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"Expected steps={steps} to be a non-negative integer.")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"Expected delta={delta} in (0, 1).")


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "rdp",
    prior: Sequence[LedgerEntry] = (),
) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps (``inf`` for ``noise_multiplier == 0``), composed
    after the ``prior`` ledger entries (earlier DP training on the same data, e.g. a linear probe first)."""
    _check_kind(accountant)
    _check_event(noise_multiplier, sample_rate, steps)
    _check_delta(delta)
    for entry in prior:
        _check_event(entry.noise_multiplier, entry.sample_rate, entry.steps)
    events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in prior]
    return _composed_epsilon([*events, (noise_multiplier, sample_rate, steps)], delta, accountant)


def _composed_epsilon(events: Sequence[tuple[float, float, int]], delta: float, kind: AccountantKind) -> float:
    """Epsilon of ``(noise_multiplier, sample_rate, steps)`` events composed in order (0 with no step, ``inf`` if
    a step had no noise)."""
    events = [e for e in events if e[2]]
    if not events:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in events):
        return math.inf
    acc = make_accountant(kind)
    for sigma, rate, steps in events:
        acc.compose(dp_sgd_event(sigma, rate, steps))
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = "rdp",
    tolerance: float = 0.005,
    prior: Sequence[LedgerEntry] = (),
) -> float:
    """The noise multiplier whose epsilon after ``steps`` lies in ``[target * (1 - tolerance), target]``; with
    ``prior`` ledger entries, the epsilon of those composed with the ``steps`` (the rest of a budget).

    Every epsilon comes from dp-accounting; the search is a bracketed false-position search on ``log epsilon`` vs
    ``log sigma`` (epsilon falls monotonically as sigma grows). For PLD it starts from the RDP-calibrated sigma,
    an upper bound (RDP's epsilon is never below PLD's), so the slow PLD evaluations stay few and at large sigma.

    Raises:
        UnreachableEpsilonError: even ``MAX_NOISE_MULTIPLIER`` gives more than the target; the error names the
            nearest reachable epsilon.
    """
    _check_kind(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"Expected target_epsilon={target_epsilon} in (0, inf).")
    if not 0 < tolerance < 1:
        raise ValueError(f"Expected tolerance={tolerance} in (0, 1).")
    _check_delta(delta)
    _check_event(1.0, sample_rate, steps)
    if steps < 1:
        raise ValueError(f"Expected steps={steps} >= 1 to calibrate a noise multiplier (no step spends nothing).")

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant, prior)

    high = MAX_NOISE_MULTIPLIER
    if accountant == "pld":
        try:
            high = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, "rdp", tolerance, prior)
        except UnreachableEpsilonError:  # PLD is tighter: it may still reach what RDP cannot
            high = MAX_NOISE_MULTIPLIER
    eps_high = eps(high)
    if eps_high > target_epsilon:
        raise UnreachableEpsilonError(
            f"target_epsilon={target_epsilon} is unreachable in {steps} steps at sample rate {sample_rate} and "
            f"delta={delta}: the nearest reachable epsilon is {eps_high:.4g} (noise multiplier {high:g}). "
            "Train fewer steps, sample a smaller rate, or accept a larger epsilon.",
            nearest_epsilon=eps_high,
            noise_multiplier=high,
        )
    if eps_high >= target_epsilon * (1 - tolerance):
        return high
    low = max(MIN_NOISE_MULTIPLIER, high / 4) if accountant == "pld" else MIN_NOISE_MULTIPLIER
    eps_low = eps(low)
    while eps_low <= target_epsilon and low > MIN_NOISE_MULTIPLIER:  # widen the bracket downwards if needed
        high, eps_high = low, eps_low
        low = max(MIN_NOISE_MULTIPLIER, low / 4)
        eps_low = eps(low)
    if eps_low <= target_epsilon:
        return low  # even the smallest noise multiplier searched meets the target
    # Invariant: eps(low) > target >= eps(high). Illinois false position on (log sigma, log eps).
    target = math.log(target_epsilon)
    f_low, f_high = _log(eps_low) - target, _log(eps_high) - target
    side = 0
    for _ in range(60):
        x_low, x_high = math.log(low), math.log(high)
        if x_high - x_low < 1e-7:  # epsilon jumps at this sigma (it reaches 0 when delta is large): high is it
            break
        if f_high != f_low and max(abs(f_low), abs(f_high)) < 50:
            x = x_high - f_high * (x_high - x_low) / (f_high - f_low)
        else:  # an end at epsilon 0 (large delta, few steps) or overflowing: bisect
            x = (x_low + x_high) / 2
        sigma = math.exp(min(max(x, x_low), x_high))
        e = eps(sigma)
        if target_epsilon * (1 - tolerance) <= e <= target_epsilon:
            return sigma
        f = _log(e) - target
        if f > 0:
            low, f_low = sigma, f
            if side == -1:
                f_high /= 2
            side = -1
        else:
            high, f_high = sigma, f
            if side == 1:
                f_low /= 2
            side = 1
    return high  # eps(high) <= target always holds


def _log(epsilon: float) -> float:
    """``log epsilon`` for the search, finite at the extremes (a large sigma over few steps gives epsilon 0)."""
    return math.log(min(max(epsilon, 1e-300), 1e300))


@dataclass
class LedgerEntry:
    """``steps`` consecutive DP-SGD steps with the same noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyAccountant:
    """The ledger of a training run's DP events, and its epsilon by dp-accounting.

    Args:
        kind: ``"rdp"`` (Renyi DP, fast, slightly loose) or ``"pld"`` (privacy loss distributions, tight).

    Example:
        >>> accountant = PrivacyAccountant("rdp")
        >>> accountant.step(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
        >>> round(accountant.epsilon(delta=1e-5), 2)  # doctest: +SKIP
        1.24
    """

    def __init__(self, kind: AccountantKind = "rdp") -> None:
        _check_kind(kind)
        self.kind = kind
        self.ledger: list[LedgerEntry] = []
        self._cached: tuple | None = None  # (ledger, delta and kind; epsilon) of the last epsilon()

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.ledger)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps (merged into the last entry when the parameters are equal)."""
        _check_event(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        last = self.ledger[-1] if self.ledger else None
        if last is not None and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            last.steps += int(steps)
        else:
            self.ledger.append(LedgerEntry(float(noise_multiplier), float(sample_rate), int(steps)))

    def event(self):
        """The whole run as one dp-accounting ``ComposedDpEvent``."""
        dp = _dp_accounting()
        return dp.ComposedDpEvent([dp_sgd_event(e.noise_multiplier, e.sample_rate, e.steps) for e in self.ledger])

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step, ``inf`` if a step had no noise)."""
        _check_delta(delta)
        events = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in self.ledger)
        key = (events, delta, self.kind)
        if self._cached is not None and self._cached[0] == key:  # logging asks every step; RDP takes ~0.3 s
            return self._cached[1]
        value = _composed_epsilon(events, delta, self.kind)
        self._cached = (key, value)
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ledger": [vars(e).copy() for e in self.ledger]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state["kind"])
        self.kind = state["kind"]
        self.ledger = [LedgerEntry(**e) for e in state["ledger"]]
