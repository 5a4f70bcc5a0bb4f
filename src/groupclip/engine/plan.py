"""The plan, made once per grouping: group rows and parameter membership.

Per backward pass the engine then needs no dicts of names: every parameter is an integer key (its ``id``) into
``group_of`` (its row in the ``[groups, B]`` norm buffer) and ``members`` (the parameters of each row).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..grouping import ResolvedGrouping
from ..norms.contributions import compute_dtype


class Plan:
    """Rows and members of a resolved grouping over the attach-time parameters."""

    def __init__(self, grouping: ResolvedGrouping, params: Mapping[str, nn.Parameter]) -> None:
        self.grouping = grouping
        self.groups = list(grouping.groups)
        self.params: dict[int, nn.Parameter] = {}
        self.names: dict[int, str] = {}
        self.group_of: dict[int, int] = {}
        self.members: list[list[int]] = []
        for row, group in enumerate(self.groups):
            members = []
            for name in grouping.groups[group]:
                p = params[name]
                key = id(p)
                self.params[key], self.names[key], self.group_of[key] = p, name, row
                members.append(key)
            self.members.append(members)
        # Rows whose parameters are all vectors: their per-sample gradients are small enough to wait for the next
        # clip event rather than cost one of their own.
        self.vectors = [all(self.params[k].dim() <= 1 for k in members) for members in self.members]
        dtypes = {compute_dtype(p.dtype) for p in self.params.values()}
        self.norm_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        first = next(iter(self.params.values()))
        self.norm_device = first.device
        # The factor the loss was multiplied by before backward (a GradScaler's scale), read once per pass: norms are
        # divided by it, the clipped sums keep it (the scaler's unscale_ divides them). None: 1.
        self.grad_scale: Callable[[], float] | None = None

    def scales(self, thresholds: Mapping[str, float], loss_scale: float) -> list[float]:
        """Per row: ``(loss_scale / grad_scale)^2 / R_k^2``, so the buffer holds squared norms (of the per-sample
        losses, unscaled) in units of the threshold."""
        if self.grad_scale is not None:
            loss_scale = loss_scale / self.grad_scale()
        return [loss_scale**2 / thresholds[g] ** 2 for g in self.groups]

    def threshold_column(self, thresholds: Mapping[str, float]) -> Tensor:
        return torch.tensor([[thresholds[g]] for g in self.groups], dtype=self.norm_dtype, device=self.norm_device)

    def describe_rows(self) -> str:
        return ", ".join(f"{g} ({len(m)} tensors)" for g, m in zip(self.groups, self.members, strict=True))


def spans(rows: list[int]) -> list[slice]:
    """Sorted ``rows`` as maximal runs of consecutive rows."""
    out, start = [], rows[0]
    for previous, row in itertools.pairwise(rows):
        if row != previous + 1:
            out.append(slice(start, previous + 1))
            start = row
    out.append(slice(start, rows[-1] + 1))
    return out


def is_finite_sum(values: Tensor) -> bool:
    return math.isfinite(float(values.sum()))
