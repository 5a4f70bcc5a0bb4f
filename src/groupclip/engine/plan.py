"""The plan, made once per grouping: group rows and parameter membership.

Per backward pass the engine then needs no dicts of names: every parameter is an integer key (its ``id``) into
``group_of`` (its row in the ``[groups, B]`` norm buffer) and ``members`` (the parameters of each row).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
        # Rows whose parameters are all vectors: their per-sample gradients are small enough to wait for the end of
        # the pass, where they are clipped together rather than a few ops each.
        self.vectors = [all(self.params[k].dim() <= 1 for k in members) for members in self.members]
        # The most bytes per sample the last pass held beyond those rows' vectors (None before the first pass).
        self.others_peak_per_sample: float | None = None
        dtypes = {compute_dtype(p.dtype) for p in self.params.values()}
        self.norm_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        first = next(iter(self.params.values()))
        self.norm_device = first.device
        # The factor the loss was multiplied by before backward (a GradScaler's scale), read once per pass: norms are
        # divided by it, the clipped sums keep it (the scaler's unscale_ divides them). None: 1.
        self.grad_scale: Callable[[], float] | None = None
        self._row_indices: dict[tuple[int, ...], Tensor] = {}
        self._vector_layouts: dict[tuple, VectorLayout] = {}

    def row_index(self, rows: Sequence[int]) -> Tensor:
        """``rows`` as a long tensor on the norm device, made once per set of rows (the same sets recur every pass)."""
        key = tuple(rows)
        index = self._row_indices.get(key)
        if index is None:
            index = self._row_indices[key] = torch.tensor(key, dtype=torch.long, device=self.norm_device)
        return index

    def vector_layout(self, rows: Sequence[int], widths: Sequence[int]) -> VectorLayout:
        """The layout of the per-sample vectors of ``rows`` gathered side by side, ``widths[k]`` columns for
        ``rows[k]``; made once per layout."""
        key = (tuple(rows), tuple(widths))
        layout = self._vector_layouts.get(key)
        if layout is None:
            device = self.norm_device
            widths_t = torch.tensor(widths, dtype=torch.long, device=device)
            row_of_column = torch.repeat_interleave(self.row_index(rows), widths_t)
            layout = self._vector_layouts[key] = VectorLayout(self.row_index(rows), widths_t, row_of_column)
        return layout

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


@dataclass(frozen=True)
class VectorLayout:
    """Per-sample vectors of several rows gathered side by side into one ``[B, columns]`` tensor.

    Attributes:
        rows: the rows, ``[k]`` (long, norm device).
        widths: columns of each row, ``[k]``.
        row_of_column: the row of each column, ``[columns]``.
    """

    rows: Tensor
    widths: Tensor
    row_of_column: Tensor


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
