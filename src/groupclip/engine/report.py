"""What one backward pass computed, per group -- computed from the pass' ``[groups, B]`` tables when first read.

A report is made after every backward pass; most are never read, or read for one number. So it holds the pass'
tables as they are (squared norms in units of each group's threshold, clip factors) and derives norms, dicts and
the dropped samples on first access: no ops and no device synchronisation on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property

import torch
from torch import Tensor


class Rows(Mapping):
    """``group -> [B]`` rows of a ``[groups, B]`` tensor, sliced on access."""

    def __init__(self, table: Tensor, groups: list[str]) -> None:
        self._table, self._index = table, {g: k for k, g in enumerate(groups)}

    def __getitem__(self, group: str) -> Tensor:
        return self._table[self._index[group]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class ClipReport:
    """What one backward pass computed, per group.

    Attributes:
        batch_size: B of the pass.
        thresholds: group -> ``R_k`` used.
        peak_held_bytes: peak of :class:`~groupclip.engine.memory.MemoryLedger` ``held_bytes`` during the pass.
        activation_bytes: bytes of layer inputs the taps saved in the forward pass.
        started_fresh: every ``.grad`` was None before this pass wrote (zeroed with set_to_none): a new logical batch.
        factors: ``[groups, B]`` clip factors ``C_ik``, rows in grouping order (0 where a norm was not finite and
            the engine drops such samples).

    Derived on first access: ``squared_norms`` (``[groups, B]``), ``per_sample_norms`` and ``clip_factors``
    (group -> ``[B]``), ``dropped`` (group -> indices of samples whose norm in it was not finite).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        groups: list[str],
        thresholds: dict[str, float],
        threshold_column: Tensor,
        normalized_squares: Tensor,
        factors: Tensor,
        peak_held_bytes: int,
        activation_bytes: int,
        started_fresh: bool = True,
    ) -> None:
        self.batch_size = batch_size
        self.groups = groups
        self.thresholds = thresholds
        self.factors = factors
        self.peak_held_bytes = peak_held_bytes
        self.activation_bytes = activation_bytes
        self.started_fresh = started_fresh
        self._column = threshold_column
        self._normalized = normalized_squares

    @cached_property
    def squared_norms(self) -> Tensor:
        """``[groups, B]`` squared per-sample norms (of the per-sample losses)."""
        return self._normalized.clamp_min(0) * self._column.square()

    @cached_property
    def per_sample_norms(self) -> Mapping[str, Tensor]:
        return Rows(self.squared_norms.sqrt(), self.groups)

    @cached_property
    def clip_factors(self) -> Mapping[str, Tensor]:
        return Rows(self.factors, self.groups)

    def within_thresholds(self) -> Tensor:
        """``[groups, B]``: true where a sample's norm is within its group's threshold (false if not finite)."""
        return self._normalized <= 1

    def statistics(self) -> Tensor:
        """``[3, groups]`` float64 on the norms' device: samples clipped (factor < 1), the sum of factors, and
        samples dropped for a non-finite norm -- a few ops, no synchronisation."""
        clipped = (self.factors < 1).sum(1, dtype=torch.float64)
        dropped = (~torch.isfinite(self._normalized)).sum(1, dtype=torch.float64)
        return torch.stack([clipped, self.factors.sum(1, dtype=torch.float64), dropped])

    @cached_property
    def dropped(self) -> dict[str, list[int]]:
        bad = ~torch.isfinite(self._normalized)
        return {g: torch.nonzero(bad[k]).flatten().tolist() for k, g in enumerate(self.groups) if bool(bad[k].any())}
