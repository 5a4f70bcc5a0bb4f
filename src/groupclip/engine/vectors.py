"""Per-sample vectors (biases, norm scales) of one backward pass: gathered, their norms added, clipped together.

A parameter of at most :data:`VECTOR_ELEMENTS` elements has a small per-sample gradient ``[B, n]``. Rather than a
norm op and a clipped-sum op per parameter, the vectors of the groups clipped in one event are laid side by side in
one ``[B, total]`` tensor (without a copy when they already are, see :func:`side_by_side`):

* one group: one ``baddbmm_`` adds the squared norms, one ``addmv`` forms the clipped sums;
* several groups: one ``segment_reduce`` gives each group's squared sums and one ``index_add_`` adds them to the
  ``[groups, B]`` buffer; the clipped sums weight every column by its group's factors (one gather of the factors,
  one product, one sum) -- a few ops however many groups there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..norms.contributions import FactorSum, Instantiated
from .memory import MemoryLedger
from .plan import Plan, VectorLayout

# Parameters of at most this many elements (biases, norm scales) are gathered per group: their per-sample gradients
# are small, and one norm and one clipped sum for all of a group's beats one of each per parameter.
VECTOR_ELEMENTS = 1 << 16


def side_by_side(grads: list[Tensor]) -> Tensor | None:
    """``[B, total]`` without a copy when the per-sample gradients are consecutive row-major pieces of each row of
    one contiguous ``[B, ...]`` tensor, in order (a norm layer's weight and bias, see ``norms.normalization``; a
    small linear layer's, see ``Factored.instantiate_with_bias``)."""
    base = grads[0]._base
    if base is None or not base.is_contiguous() or base.dim() < 2 or base.shape[0] == 0:
        return None
    batch, offset = base.shape[0], 0
    for g in grads:
        if g._base is not base or g.shape[0] != batch or g.data_ptr() != base.data_ptr() + offset * g.element_size():
            return None
        if g.stride(0) != base.stride(0) or g[0].stride() != g[0].contiguous().stride():
            return None
        offset += g[0].numel()
    return base.reshape(batch, -1) if offset == base.stride(0) else None


@dataclass(eq=False)
class GatheredVectors:
    """Per-sample vectors of one or more rows, side by side in ``flat`` ``[B, sum(sizes)]``, their norms added."""

    rows: list[int]
    keys: list[int]
    sizes: list[int]
    flat: Tensor
    layout: VectorLayout | None  # None: one row


class PassVectors:
    """The per-sample vectors of one backward pass, from their parameter's completion until clipped.

    ``pile`` counts the bytes of the vectors of vector-only rows (also counted in ``ledger``): what waiting for the
    end of the pass holds beyond clipping each group when it completes.
    """

    def __init__(self, plan: Plan, ledger: MemoryLedger) -> None:
        self.plan, self.ledger = plan, ledger
        self.pile = MemoryLedger()
        self.waiting: dict[int, list] = {}  # row -> [(parameter key, small Instantiated or FactorSum)]
        self.gathered: list[GatheredVectors] = []  # norms added, not yet clipped
        self._scales: Tensor | None = None

    def add(self, row: int, key: int, contribution) -> None:
        self.waiting.setdefault(row, []).append((key, contribution))
        if self.plan.vectors[row]:
            self.pile.hold(contribution)

    def gather(self, rows: list[int], sq: Tensor, scales: list[float]) -> None:
        """Gather the waiting vectors of ``rows`` into one ``[B, total]`` tensor, kept to clip, and add their squared
        norms (times each row's ``scales``) into ``sq`` ``[groups, B]``."""
        rows = [row for row in rows if row in self.waiting]
        if not rows:
            return
        b = sq.shape[1]
        items = [(row, key, c) for row in rows for key, c in self.waiting.pop(row)]
        grads = [(c.instantiate() if type(c) is FactorSum else c).grad for _, _, c in items]
        flat = side_by_side(grads)
        if flat is None:
            flats = [g.reshape(b, -1) for g in grads]
            flat = flats[0] if len(flats) == 1 else torch.cat(flats, 1)
        flat = flat.to(sq.dtype)  # half-precision models: norms and sums in float32
        sizes = [math.prod(g.shape[1:]) for g in grads]
        layout = None
        if len(rows) == 1:
            sq[rows[0]].view(b, 1, 1).baddbmm_(flat.view(b, 1, -1), flat.view(b, -1, 1), alpha=scales[rows[0]])
        else:
            width_of = dict.fromkeys(rows, 0)
            for (row, _, _), n in zip(items, sizes, strict=True):
                width_of[row] += n
            widths = [width_of[row] for row in rows]
            layout = self.plan.vector_layout(rows, widths)
            parts = torch.segment_reduce((flat * flat).t(), "sum", lengths=layout.widths, axis=0)  # [rows, B]
            distinct = {scales[row] for row in rows}
            if len(distinct) == 1:
                sq.index_add_(0, layout.rows, parts, alpha=distinct.pop())
            else:
                sq.index_add_(0, layout.rows, parts.mul_(self._scale_column(scales, sq).index_select(0, layout.rows)))
        self.gathered.append(GatheredVectors(rows, [key for _, key, _ in items], sizes, flat, layout))
        for row, _, c in items:
            self.ledger.release(c)
            if self.plan.vectors[row]:
                self.pile.release(c)
        self.ledger.hold(Instantiated(flat))
        if self._piled(rows):
            self.pile.hold(Instantiated(flat))

    def _piled(self, rows: list[int]) -> bool:
        """Gathered vectors counted in the pile: those of vector-only rows only."""
        return all(self.plan.vectors[row] for row in rows)

    def _scale_column(self, scales: list[float], sq: Tensor) -> Tensor:
        """``[groups, 1]`` norm scales (unequal thresholds), made at most once per pass."""
        if self._scales is None:
            self._scales = torch.tensor(scales, dtype=sq.dtype, device=sq.device).unsqueeze(1)
        return self._scales

    def clip(
        self, rows: set[int], factors: Tensor, coefs: dict[int, Tensor], dropped: dict[int, Tensor], scale: float
    ) -> dict[int, Tensor]:
        """The clipped sums (parameter key -> tensor of the parameter's shape) of the gathered vectors of ``rows``
        with the ``[groups, B]`` ``factors`` (``coefs``: the rows' own), samples in ``dropped`` left out."""
        out: dict[int, Tensor] = {}
        for gathered in [g for g in self.gathered if g.rows[0] in rows]:
            self.gathered.remove(gathered)
            self.ledger.release(Instantiated(gathered.flat))
            if self._piled(gathered.rows):
                self.pile.release(Instantiated(gathered.flat))
            sums = self._clipped_sums(gathered, factors, coefs, dropped, scale)
            for key, part in zip(gathered.keys, sums.split(gathered.sizes), strict=True):
                out[key] = part.view(self.plan.params[key].shape)
        return out

    @staticmethod
    def _clipped_sums(
        gathered: GatheredVectors, factors: Tensor, coefs: dict[int, Tensor], dropped: dict[int, Tensor], scale: float
    ) -> Tensor:
        drops = {row: dropped[row] for row in gathered.rows if row in dropped}
        if gathered.layout is None:
            row = gathered.rows[0]
            whole = Instantiated(gathered.flat)
            return (whole if not drops else whole.without(drops[row])).clipped(coefs[row], scale)
        values = gathered.flat
        columns = gathered.layout.row_of_column
        if drops:  # a dropped sample's vectors may be non-finite: zero them (0 * inf is not 0)
            mask = torch.zeros_like(factors, dtype=torch.bool)
            for row, samples in drops.items():
                mask[row] = samples
            values = values.where(~mask.index_select(0, columns).t(), 0)
        sums = (values * factors.index_select(0, columns).t()).sum(0)
        return sums.mul_(scale) if scale != 1 else sums
