"""Adaptive per-group clipping thresholds by private quantile tracking (Andrew et al. 2021; per group: He et al.).

Each step, group k releases a noisy *centered* count of the samples of the logical batch whose norm is within its
threshold, and moves its threshold towards the target quantile ``q``:

    c_k = sum_i (1[||g_ik|| <= R_k] - 1/2) + N(0, sigma_b^2),     b_k = c_k / B_expected + 1/2,
    R_k <- R_k * exp(-eta (b_k - q)).

Adding or removing one sample changes every ``c_k`` by 1/2, so the M counts have L2 sensitivity ``sqrt(M)/2``:
they are a Gaussian query with noise multiplier ``z2 = 2 sigma_b / sqrt(M)``. The gradient's noise multiplier
``z1`` is chosen so that the pair composes to exactly one Gaussian mechanism of the stated multiplier ``sigma``
(``z1^-2 + z2^-2 = sigma^-2``), which is what the accountant records:

    z1 = (sigma^-2 - M / (4 sigma_b^2))^(-1/2).

Normalisation (``rescale="total"``): after the update the thresholds are scaled together so that
``sqrt(sum_k R_k^2)`` -- the sensitivity, hence the noise std -- keeps its initial value; the counts only
redistribute a fixed budget across groups (a group whose norms are small gives part of its threshold to the
others). ``rescale="none"`` lets every threshold float freely (all of them may shrink, and the step size with
them). The default ``"auto"`` is ``"total"`` with several groups and ``"none"`` with one (where keeping the total
would keep the threshold). Both are post-processing of the released counts: the privacy cost is the same.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .noise import GaussianNoise

RESCALE_MODES = ("auto", "total", "none")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Settings of adaptive thresholds.

    Attributes:
        target_quantile: fraction of samples per group whose norm should fall under the threshold (0.5).
        learning_rate: eta of the geometric update (0.2).
        count_noise_std: sigma_b, std of the noise on each group's centered count; ``None`` = ``B_expected / 20``.
        min_threshold: thresholds never go below this (keeps them positive).
        rescale: ``"total"`` keeps ``sqrt(sum_k R_k^2)`` at its initial value; ``"none"``: free-floating;
            ``"auto"`` (default): ``"total"`` with several groups, ``"none"`` with one.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None
    min_threshold: float = 1e-6
    rescale: str = "auto"

    def __post_init__(self) -> None:
        for name in ("target_quantile", "learning_rate", "count_noise_std", "min_threshold"):
            value = getattr(self, name)
            if value is None and name == "count_noise_std":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"Expected {name}={value!r} to be a finite number.")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"Expected target_quantile={self.target_quantile} in (0, 1).")
        if not self.learning_rate > 0:
            raise ValueError(f"Expected learning_rate={self.learning_rate} > 0.")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ValueError(f"Expected count_noise_std={self.count_noise_std} > 0 (or None for B_expected / 20).")
        if not self.min_threshold > 0:
            raise ValueError(f"Expected min_threshold={self.min_threshold} > 0.")
        if self.rescale not in RESCALE_MODES:
            raise ValueError(f"Expected rescale={self.rescale!r} in {RESCALE_MODES}.")


def gradient_noise_multiplier(noise_multiplier: float, num_groups: int, count_noise_std: float) -> float:
    """``z1 = (sigma^-2 - M / (4 sigma_b^2))^(-1/2)``: the gradient noise leaving room for the counts.

    Raises:
        ValueError: the counts alone would spend more than the whole budget (``M / (4 sigma_b^2) >= sigma^-2``).
    """
    if noise_multiplier <= 0:
        raise ValueError("Adaptive clipping needs a positive noise multiplier (it spends part of it on counts).")
    rest = noise_multiplier**-2 - num_groups / (4 * count_noise_std**2)
    if rest <= 0:
        needed = math.sqrt(num_groups) / 2 * noise_multiplier
        raise ValueError(
            f"Adaptive clipping of {num_groups} groups with count noise std {count_noise_std:g} would spend more "
            f"than the whole budget of noise multiplier {noise_multiplier:g}; use count_noise_std > {needed:.4g}, "
            "fewer groups, or a larger noise multiplier."
        )
    return rest**-0.5


class QuantileTracker:
    """Counts, over one logical batch, the samples within each group's threshold; then updates the thresholds.

    Counting stays on the norms' device (no synchronisation per backward pass).
    """

    def __init__(self, settings: AdaptiveClipping, groups: list[str]) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.centered: Tensor | None = None  # [M]: sum_i (1[norm <= R_k] - 1/2) so far
        self.initial_total: float | None = None

    def observe(self, within: Tensor) -> None:
        """Add one backward pass: ``within`` is ``[M, B]``, true where a sample's norm is within the threshold."""
        centered = within.sum(1, dtype=torch.float64) - within.shape[1] / 2
        self.centered = centered if self.centered is None else self.centered.add_(centered)

    def reset(self) -> None:
        self.centered = None

    def released_counts(self, noise: GaussianNoise, expected_batch_size: float) -> list[float]:
        """``c_k = centered count + N(0, sigma_b^2)``, the quantity the counts' sensitivity is charged for."""
        sigma_b = self.count_noise_std(expected_batch_size)
        counts = torch.zeros(len(self.groups), dtype=torch.float64)
        if self.centered is not None:
            counts += self.centered.cpu()
        noise.add_([counts], sigma_b)
        return counts.tolist()

    def update(
        self,
        thresholds: Mapping[str, float],
        expected_batch_size: float,
        noise: GaussianNoise,
        total: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """New thresholds and the noisy fractions ``b_k``; resets the counts.

        ``total`` (data parallel) sums the centered counts over ranks before the noise is drawn (on the caller).
        """
        if total is not None and self.centered is not None:
            self.centered = total(self.centered)
        if self.initial_total is None:
            self.initial_total = math.sqrt(sum(r * r for r in thresholds.values()))
        released = self.released_counts(noise, expected_batch_size)
        eta, q = self.settings.learning_rate, self.settings.target_quantile
        new, fractions = {}, {}
        for group, count in zip(self.groups, released, strict=True):
            b = count / expected_batch_size + 0.5
            fractions[group] = b
            new[group] = thresholds[group] * math.exp(-eta * (b - q))
        rescale = self.settings.rescale
        if rescale == "total" or (rescale == "auto" and len(new) > 1):
            scale = self.initial_total / math.sqrt(sum(r * r for r in new.values()))
            new = {g: r * scale for g, r in new.items()}
        new = {g: max(r, self.settings.min_threshold) for g, r in new.items()}
        self.reset()
        return new, fractions

    def count_noise_std(self, expected_batch_size: float) -> float:
        std = self.settings.count_noise_std
        return std if std is not None else expected_batch_size / 20

    def state_dict(self) -> dict:
        return {
            "centered": None if self.centered is None else self.centered.cpu().tolist(),
            "initial_total": self.initial_total,
        }

    def load_state_dict(self, state: Mapping) -> None:
        centered = state.get("centered")
        self.centered = None if centered is None else torch.tensor(centered, dtype=torch.float64)
        self.initial_total = state.get("initial_total")
