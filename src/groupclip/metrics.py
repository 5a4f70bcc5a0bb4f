"""Per-step training metrics of a DP run, accumulated on the norms' device: no synchronisation per backward pass.

Per backward pass, a handful of ops add the pass' clip counts, factor sums and dropped samples (per group) into
small device tensors; the step closes them (one sum over ranks, if any); they are read from the device only when
someone reads ``last_metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .engine import ClipReport
    from .topology import Topology


class StepStatistics:
    """Statistics of the logical batch being accumulated, and those of the last closed step."""

    def __init__(self, groups: list[str] | None) -> None:
        self.groups = groups
        self.noise_std = 0.0
        self.extra: dict[str, Any] = {}
        self._last: dict[str, Any] = {}
        self._closed: tuple | None = None
        self.new_batch()

    def new_batch(self) -> None:
        self.samples = 0
        self.table: Tensor | None = None  # [3, M]: clipped count, factor sum, dropped count
        self.loss: Tensor | None = None

    def observe(self, report: ClipReport) -> None:
        if self.groups is None:
            self.groups = list(report.groups)
        self.samples += report.batch_size
        counts = report.statistics()
        self.table = counts if self.table is None else self.table.add_(counts)

    def add_loss(self, per_sample_total: Tensor) -> None:
        total = per_sample_total.detach().to(torch.float64)
        self.loss = total if self.loss is None else self.loss + total

    def close_step(self, step: int, thresholds: dict[str, float], topology: Topology) -> None:
        """End of a step: totals over ranks, kept on the device until read."""
        groups = self.groups or list(thresholds)
        table = self.table if self.table is not None else torch.zeros(3, len(groups), dtype=torch.float64)
        head = torch.stack(
            [
                torch.tensor(float(self.samples), dtype=torch.float64, device=table.device),
                (self.loss if self.loss is not None else torch.tensor(float("nan"), dtype=torch.float64)).to(
                    table.device
                ),
            ]
        )
        packed = topology.total(torch.cat([head, table.to(torch.float64).reshape(-1)]))
        self._closed = (step, groups, thresholds, self.noise_std, dict(self.extra), packed)
        self._last = {}
        self.extra = {}
        self.new_batch()

    def last(self) -> dict[str, Any]:
        if self._last or self._closed is None:
            return self._last
        step, groups, thresholds, noise_std, extra, packed = self._closed
        values = packed.tolist()
        samples, loss = int(values[0]), values[1]
        m = len(groups)
        clipped, factor_sum, dropped = values[2 : 2 + m], values[2 + m : 2 + 2 * m], values[2 + 2 * m :]
        per = (lambda xs: {g: x / samples for g, x in zip(groups, xs, strict=True)}) if samples else (lambda xs: {})
        self._last = {
            "step": step,
            "samples": samples,
            "noise_std": noise_std,
            "thresholds": thresholds,
            "fraction_clipped": per(clipped),
            "mean_clip_factor": per(factor_sum),
            "dropped_samples": {g: int(x) for g, x in zip(groups, dropped, strict=True) if x},
            "loss": loss / samples if samples and loss == loss else None,
            **extra,
        }
        return self._last
