"""Adaptive per-group clipping thresholds by private quantile tracking (Andrew et al. 2021; per group: He et al.).

Each group k tracks a target quantile ``q`` of its per-sample norm distribution (MATH.md §5):

    b_k = (sum_i 1[||g_ik|| <= R_k] + N(0, sigma_b^2)) / B_expected,     R_k <- R_k * exp(-eta (b_k - q)).

The M noisy counts are a second Gaussian query on the same samples (centered counts have L2 sensitivity
``sqrt(M)/2``, so their noise multiplier is ``z2 = 2 sigma_b / sqrt(M)``). The gradient's noise multiplier ``z1`` is
chosen so that the pair composes to exactly one Gaussian mechanism of the stated multiplier ``sigma``:

    z1 = (sigma^-2 - M / (4 sigma_b^2))^(-1/2)

so the accountant records ``sigma`` and the run spends exactly the stated budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .noise import GaussianNoise


@dataclass(frozen=True)
class AdaptiveClipping:
    """Settings of adaptive thresholds.

    Attributes:
        target_quantile: fraction of samples per group whose norm should fall under the threshold (0.5).
        learning_rate: eta of the geometric update (0.2).
        count_noise_std: sigma_b, std of the noise on each group's count; ``None`` = ``B_expected / 20``.
        min_threshold: thresholds never go below this (keeps them positive).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None
    min_threshold: float = 1e-6

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"Expected target_quantile={self.target_quantile} in (0, 1).")
        if not self.learning_rate > 0:
            raise ValueError(f"Expected learning_rate={self.learning_rate} > 0.")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ValueError(f"Expected count_noise_std={self.count_noise_std} > 0 (or None for B_expected / 20).")


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


@dataclass
class QuantileTracker:
    """Counts, over one logical batch, the samples under each group's threshold; then updates the thresholds."""

    settings: AdaptiveClipping
    counts: dict[str, float] = field(default_factory=dict)

    def observe(self, per_sample_norms: Mapping[str, Tensor], thresholds: Mapping[str, float]) -> None:
        """Add one backward pass's counts (call once per physical batch)."""
        for group, norms in per_sample_norms.items():
            self.counts[group] = self.counts.get(group, 0.0) + float((norms <= thresholds[group]).sum())

    def update(
        self, thresholds: Mapping[str, float], expected_batch_size: float, noise: GaussianNoise
    ) -> tuple[dict[str, float], dict[str, float]]:
        """New thresholds and the noisy fractions ``b_k``; resets the counts."""
        sigma_b = self.count_noise_std(expected_batch_size)
        new, fractions = {}, {}
        for group, threshold in thresholds.items():
            noisy = self.counts.get(group, 0.0) + float(noise.sample((1,), sigma_b, dtype=torch.float64, device="cpu"))
            b = noisy / expected_batch_size
            fractions[group] = b
            updated = threshold * math.exp(-self.settings.learning_rate * (b - self.settings.target_quantile))
            new[group] = max(updated, self.settings.min_threshold)
        self.counts = {}
        return new, fractions

    def count_noise_std(self, expected_batch_size: float) -> float:
        std = self.settings.count_noise_std
        return std if std is not None else expected_batch_size / 20
