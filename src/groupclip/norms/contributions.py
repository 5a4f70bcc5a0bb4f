"""Per-sample gradient contributions of one use of a parameter, and the algebra the engine needs on them.

A layer's per-sample weight gradient is rarely formed explicitly. It is kept in one of three shapes:

* :class:`Factored` -- ``G_i = sum_t left[i, t]^T right[i, t]`` per block (Linear, HF Conv1D, convolutions),
* :class:`Indexed` -- ``G_i = sum_t e_{index[i, t]}^T right[i, t]`` (embedding lookups),
* :class:`Instantiated` -- ``G_i`` itself, ``[B, *param_shape]`` (norm layers, the generic fallback).

The engine needs two things of them: the squared per-sample norm of a parameter's total gradient -- the SUM over all
uses of the parameter, cross terms between uses included (``||sum_u G^u||^2 = sum_{u,v} <G^u, G^v>``) -- added into
a row of its ``[groups, B]`` norm buffer (:meth:`sq_into`), and the clipped sum ``sum_i c_i G_i`` as a new gradient
tensor (:meth:`clipped`, Book-Keeping: one ordinary weight-gradient product with re-weighted output gradients).

Rules produce contributions whose dim 0 holds *rows* -- the layer's own batch dim, which may hold ``outer * B *
inner`` rows when the batch is folded into it (OPT's ``[B*T, d]``); :meth:`to_samples` regroups them by sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..dataflow.layout import to_rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and clipped sums are computed in: float32 for half types, else the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ghost_is_smaller(factored: bool, steps: int, rows: int, cols: int) -> bool:
    """The ``"auto"`` norm mode: whether a layer's ghost norm holds less memory than its per-sample gradient.

    A factored layer (linear, convolution; per block, ``rows`` outputs and ``cols`` inputs over ``steps`` positions)
    keeps both factors, ``T (rows + cols)`` per sample, until its group is clipped, and builds two ``T x T`` Grams;
    instantiating keeps ``rows * cols`` and lets the factors go. So instantiate when ``rows * cols <= T (rows +
    cols)``: then it also costs fewer FLOPs (its per-sample product replaces the weight-gradient product, while the
    Grams would add ``T^2 (rows + cols) >= T rows cols``). Any other layer (an embedding's ``[rows, cols]`` table):
    ghost while its two Grams, ``2 T^2``, are smaller than the table.
    """
    if factored:
        return steps * (rows + cols) < rows * cols
    return 2 * steps * steps < rows * cols


def _up(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype))


_ZEROS: dict[tuple, Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    """A 0-dim zero to start ``addmm(zero, ..., beta=0, alpha=s)``: a new result with the scale folded in, one op."""
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


_ONES: dict[tuple, Tensor] = {}


def _one(like: Tensor) -> Tensor:
    """A 0-dim one, expanded where a Gram needs ``+ 1`` everywhere (no op)."""
    key = (like.dtype, like.device, "one")
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return one


def _ones(n: int, like: Tensor) -> Tensor:
    """``n`` ones (a slice of one cached vector per dtype and device, grown as needed)."""
    key = (like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None or ones.shape[0] < n:
        ones = _ONES[key] = torch.ones(
            max(n, 2 * (0 if ones is None else ones.shape[0])), dtype=like.dtype, device=like.device
        )
    return ones[:n]


def _rows(t: Tensor, batch: int, inner: int) -> Tensor:
    """``[outer * B * inner, T, ...]`` -> ``[B, outer * inner * T, ...]``."""
    if t.shape[0] == batch:
        return t
    grouped = to_rows(t, 0, inner, batch)
    return grouped.reshape(batch, -1, *t.shape[2:])


@dataclass
class Factored:
    """``G_i[g] = left[i, :, g, :]^T @ right[i, :, g, :]`` for each of ``G`` diagonal blocks ``g``.

    Attributes:
        left: ``[B, T, G, r]``, the row factor (output gradients for nn.Linear).
        right: ``[B, T, G, c]``, the column factor (activations for nn.Linear).
        param_shape: shape of the parameter; ``G * r * c`` elements laid out as ``[G, r, c]``.
    """

    left: Tensor
    right: Tensor
    param_shape: torch.Size
    right_gram: Tensor | None = None  # ``R R^T`` [B, T, T] when shared with other layers reading the same input
    # "left" / "right": the use's bias gradient is that factor summed over positions (see :class:`FactorSum`)
    bias_side: str | None = None
    # (coefficients, the bias-side factor times them), left by :meth:`clipped` for the bias to reuse
    scaled: tuple[Tensor, Tensor] | None = None

    @property
    def steps(self) -> int:
        return self.left.shape[1]

    def to_samples(self, batch: int, inner: int) -> Factored:
        left, right = _rows(self.left, batch, inner), _rows(self.right, batch, inner)
        return Factored(left, right, self.param_shape, bias_side=self.bias_side)

    def gram_of_right(self) -> Tensor:
        """``R R^T`` per sample, ``[B, T, T]`` (single block only)."""
        right = _up(self.right).reshape(self.right.shape[0], self.steps, -1)
        return torch.bmm(right, right.transpose(1, 2))

    def _blocks(self) -> tuple[Tensor, Tensor]:
        # [B, T, G, k] -> [B*G, T, k]
        b, t, g, _ = self.left.shape
        left = _up(self.left).permute(0, 2, 1, 3).reshape(b * g, t, -1)
        right = _up(self.right).permute(0, 2, 1, 3).reshape(b * g, t, -1)
        return left, right

    def sq_into(self, row: Tensor, alpha: float, with_bias: bool = False) -> None:
        """``row += alpha * ||G_i||^2``: the ghost norm ``sum_{t,s} (L L^T)_{ts} (R R^T)_{ts}``, time ~ B T^2 (r+c).

        ``with_bias``: the norm of the weight and its bias together (:class:`FactorSum` of this use), one op
        more than the weight alone: the bias is the bias-side factor times a column of ones, so the other side's
        Gram gains ``1`` everywhere.
        """
        b = self.left.shape[0]
        left, right = self._blocks()
        if with_bias and self.bias_side == "right":
            gram_left = torch.baddbmm(_one(left).expand(left.shape[0], left.shape[1], left.shape[1]), left, left.mT)
        else:
            gram_left = torch.bmm(left, left.mT)
        gram_right = self.right_gram
        if gram_right is None:
            if with_bias and self.bias_side == "left":
                ones = _one(right).expand(right.shape[0], right.shape[1], right.shape[1])
                gram_right = torch.baddbmm(ones, right, right.mT)
            else:
                gram_right = torch.bmm(right, right.mT)
        elif with_bias and self.bias_side == "left":
            gram_right = gram_right + 1
        row.view(b, 1, 1).baddbmm_(gram_left.view(b, 1, -1), gram_right.reshape(b, -1, 1), alpha=alpha)

    def ghost_sq_norm(self) -> Tensor:
        sq = torch.zeros(self.left.shape[0], dtype=compute_dtype(self.left.dtype), device=self.left.device)
        self.sq_into(sq, 1.0)
        return sq

    def instantiate(self) -> Instantiated:
        b = self.left.shape[0]
        left, right = self._blocks()
        per_sample = torch.bmm(left.transpose(1, 2), right)  # [B*G, r, c]
        return Instantiated(per_sample.view(b, *self.param_shape))

    def instantiate_with_bias(self, bias_shape: torch.Size) -> tuple[Instantiated, Instantiated]:
        """The per-sample weight and bias gradients (one block, a ``bias_side``), written side by side into one
        ``[B, weight + bias]`` tensor by the two ops that form them: gathered for one norm and one clipped sum, they
        need no copy (``engine.backward``)."""
        b, t, _g, r = self.left.shape
        c = self.right.shape[-1]
        left, right = _up(self.left).reshape(b, t, r), _up(self.right).reshape(b, t, c)
        factor = left if self.bias_side == "left" else right
        both = torch.empty(b, r * c + factor.shape[2], dtype=left.dtype, device=left.device)
        torch.bmm(left.mT, right, out=both[:, : r * c].view(b, r, c))
        torch.sum(factor, 1, out=both[:, r * c :])
        weight = Instantiated(both[:, : r * c].view(b, *self.param_shape))
        return weight, Instantiated(both[:, r * c :].view(b, *bias_shape))

    def clipped(self, coef: Tensor, scale: float, into: Tensor | None = None) -> Tensor:
        """``scale * sum_i coef_i G_i`` (added into ``into`` if given): the coefficient on one factor (the bias side
        if there is a bias, so the bias reuses it; else the smaller), then one ordinary weight-gradient product."""
        b, t, g, r = self.left.shape
        c = self.right.shape[-1]
        left, right = _up(self.left), _up(self.right)
        weights = coef.to(left.dtype).view(b, 1, 1, 1)
        if self.bias_side == "left" or (self.bias_side is None and r <= c):
            left = left * weights
            if self.bias_side is not None:
                self.scaled = (coef, left)
        else:
            right = right * weights
            if self.bias_side is not None:
                self.scaled = (coef, right)
        if g == 1:
            lhs, rhs = left.reshape(b * t, r).t(), right.reshape(b * t, c)
            if into is not None:
                return into.view(r, c).addmm_(lhs, rhs, alpha=scale).view(self.param_shape)
            return torch.addmm(_zero(lhs), lhs, rhs, beta=0, alpha=scale).view(self.param_shape)
        lhs = left.permute(2, 3, 0, 1).reshape(g, r, b * t)
        rhs = right.permute(2, 0, 1, 3).reshape(g, b * t, c)
        if into is not None:
            return into.view(g, r, c).baddbmm_(lhs, rhs, alpha=scale).view(self.param_shape)
        return torch.baddbmm(_zero(lhs), lhs, rhs, beta=0, alpha=scale).view(self.param_shape)

    def cross(self, other: Factored) -> Tensor:
        """``<G_i^self, G_i^other>`` per sample by the ghost trick (both uses of one parameter)."""
        b, _, g, _ = self.left.shape
        l1, r1 = self._blocks()
        l2, r2 = other._blocks()
        prod = torch.bmm(l1, l2.transpose(1, 2)).mul_(torch.bmm(r1, r2.transpose(1, 2)))
        return prod.sum((1, 2)).view(b, g).sum(1)

    def without(self, samples: Tensor) -> Factored:
        keep = (~samples).view(-1, 1, 1, 1)
        return Factored(self.left.where(keep, 0), self.right.where(keep, 0), self.param_shape, bias_side=self.bias_side)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.left, self.right)


@dataclass
class Indexed:
    """``G_i = sum_t onehot(index[i, t])^T right[i, t]``: an embedding lookup into a ``[rows, c]`` table.

    Attributes:
        index: ``[B, T]`` integer rows looked up (positions whose gradient is zero already removed from
            ``right``, e.g. ``padding_idx``).
        right: ``[B, T, c]`` output gradients.
        param_shape: ``(rows, c)``.
    """

    index: Tensor
    right: Tensor
    param_shape: torch.Size

    @property
    def steps(self) -> int:
        return self.index.shape[1]

    def to_samples(self, batch: int, inner: int) -> Indexed:
        return Indexed(_rows(self.index, batch, inner), _rows(self.right, batch, inner), self.param_shape)

    def ghost_sq_norm(self) -> Tensor:
        right = _up(self.right)
        same = self.index.unsqueeze(2) == self.index.unsqueeze(1)  # [B, T, T]
        dots = torch.bmm(right, right.transpose(1, 2))
        return (dots * same).sum((1, 2))

    def sq_into(self, row: Tensor, alpha: float) -> None:
        row.add_(self.ghost_sq_norm(), alpha=alpha)

    def instantiate(self) -> Instantiated:
        b, t = self.index.shape
        rows, c = self.param_shape
        right = _up(self.right)
        flat = (self.index + torch.arange(b, device=self.index.device).unsqueeze(1) * rows).reshape(-1)
        out = torch.zeros(b * rows, c, dtype=right.dtype, device=right.device)
        out.index_add_(0, flat, right.reshape(b * t, c))
        return Instantiated(out.view(b, rows, c))

    def clipped(self, coef: Tensor, scale: float, into: Tensor | None = None) -> Tensor:
        right = _up(self.right)
        weighted = right * coef.to(right.dtype).view(-1, 1, 1)
        if into is None:
            into = torch.zeros(self.param_shape, dtype=right.dtype, device=right.device)
        return into.index_add_(0, self.index.reshape(-1), weighted.reshape(-1, self.param_shape[1]), alpha=scale)

    def cross(self, other: Indexed | Factored) -> Tensor:
        right = _up(self.right)
        if isinstance(other, Indexed):
            same = self.index.unsqueeze(2) == other.index.unsqueeze(1)
            return (torch.bmm(right, _up(other.right).transpose(1, 2)) * same).sum((1, 2))
        # Tied table: Factored use with rows on the left (nn.Linear sharing an embedding's weight).
        left = _up(other.left).squeeze(2)  # [B, T2, rows]
        b, t2, _ = left.shape
        picked = left.gather(2, self.index.unsqueeze(1).expand(b, t2, self.steps))  # [B, T2, T1]
        dots = torch.bmm(_up(other.right).squeeze(2), right.transpose(1, 2))  # [B, T2, T1]
        return (picked * dots).sum((1, 2))

    def without(self, samples: Tensor) -> Indexed:
        return Indexed(self.index, self.right.where((~samples).view(-1, 1, 1), 0), self.param_shape)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.index, self.right)


@dataclass
class Instantiated:
    """The per-sample gradients themselves, ``[B, *param_shape]``."""

    grad: Tensor

    def to_samples(self, batch: int, inner: int) -> Instantiated:
        if self.grad.shape[0] == batch:
            return self
        return Instantiated(to_rows(self.grad, 0, inner, batch).sum(1))

    def ghost_sq_norm(self) -> Tensor:
        flat = _up(self.grad).flatten(1)
        return (flat * flat).sum(1)

    def sq_into(self, row: Tensor, alpha: float) -> None:
        b = self.grad.shape[0]
        flat = _up(self.grad).reshape(b, 1, -1)
        row.view(b, 1, 1).baddbmm_(flat, flat.transpose(1, 2), alpha=alpha)

    def instantiate(self) -> Instantiated:
        return self

    def clipped(self, coef: Tensor, scale: float, into: Tensor | None = None) -> Tensor:
        grad = _up(self.grad)
        matrix, vector = grad.reshape(grad.shape[0], -1).t(), coef.to(grad.dtype)
        if into is not None:
            return into.view(-1).addmv_(matrix, vector, alpha=scale).view(grad.shape[1:])
        return torch.addmv(_zero(grad), matrix, vector, beta=0, alpha=scale).view(grad.shape[1:])

    def without(self, samples: Tensor) -> Instantiated:
        return Instantiated(self.grad.where((~samples).view(-1, *([1] * (self.grad.dim() - 1))), 0))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.grad,)


@dataclass
class FactorSum:
    """``b_i = sum_t factor[i, t]`` of a :class:`Factored` use: a linear or convolution layer's bias, formed only
    when needed. When the weight and the bias share a group, the engine adds their norm in one op
    (``Factored.sq_into(..., with_bias=True)``); their clipped sums share the weight's re-weighted factor.

    Attributes:
        source: the weight's contribution (its ``bias_side`` names the factor).
        param_shape: the bias' shape.
    """

    source: Factored
    param_shape: torch.Size
    _grad: Tensor | None = None

    @property
    def steps(self) -> int:
        return self.source.steps

    def _factor(self) -> Tensor:
        return self.source.left if self.source.bias_side == "left" else self.source.right

    def to_samples(self, batch: int, inner: int) -> FactorSum:
        return FactorSum(self.source.to_samples(batch, inner), self.param_shape)

    def instantiate(self) -> Instantiated:
        if self._grad is None:
            factor = _up(self._factor())
            self._grad = factor.sum(1).reshape(factor.shape[0], *self.param_shape)
        return Instantiated(self._grad)

    def ghost_sq_norm(self) -> Tensor:
        return self.instantiate().ghost_sq_norm()

    def sq_into(self, row: Tensor, alpha: float) -> None:
        self.instantiate().sq_into(row, alpha)

    def clipped(self, coef: Tensor, scale: float, into: Tensor | None = None) -> Tensor:
        memo, self.source.scaled = self.source.scaled, None
        if memo is None or memo[0] is not coef:  # the weight was not clipped with these coefficients just before
            return self.instantiate().clipped(coef, scale, into)
        scaled = memo[1]
        flat = scaled.reshape(-1, scaled.shape[2] * scaled.shape[3])  # [B*T, bias]: sum the rows, one op
        ones = _ones(flat.shape[0], flat)
        if into is not None:
            return into.view(-1).addmv_(flat.t(), ones, alpha=scale).view(self.param_shape)
        return torch.addmv(_zero(flat), flat.t(), ones, beta=0, alpha=scale).view(self.param_shape)

    def without(self, samples: Tensor) -> Instantiated:
        return self.instantiate().without(samples)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self._factor(),)


Contribution = Factored | Indexed | Instantiated | FactorSum


def _can_cross_ghost(u: Contribution, v: Contribution) -> bool:
    if isinstance(u, Factored) and isinstance(v, Factored):
        return u.left.shape[2:] == v.left.shape[2:] and u.right.shape[2:] == v.right.shape[2:]
    if isinstance(u, Indexed) and isinstance(v, Indexed):
        return True
    if isinstance(u, Indexed) and isinstance(v, Factored):
        return v.left.shape[2] == 1 and v.left.shape[3] == u.param_shape[0]
    return False


def combine_uses(uses: list[Contribution]) -> tuple[Tensor, list[Contribution]]:
    """Squared per-sample norm of ``sum_u G^u`` over a parameter's uses, cross terms included.

    Returns:
        ``(sq_norm [B], contributions to keep for the clipped sum)``. When some pair of uses has no ghost
        cross term, every use is instantiated and summed into one :class:`Instantiated`.
    """
    if len(uses) == 1:
        return uses[0].ghost_sq_norm(), uses
    pairs_ok = True
    for i, u in enumerate(uses):
        for v in uses[i + 1 :]:
            if not (_can_cross_ghost(u, v) or _can_cross_ghost(v, u)):
                pairs_ok = False
    if not pairs_ok:
        total = _up(uses[0].instantiate().grad)
        for u in uses[1:]:
            total = total + _up(u.instantiate().grad)
        merged = Instantiated(total)
        return merged.ghost_sq_norm(), [merged]
    sq = sum(u.ghost_sq_norm() for u in uses)
    for i, u in enumerate(uses):
        for v in uses[i + 1 :]:
            sq = sq + 2 * (u.cross(v) if _can_cross_ghost(u, v) else v.cross(u))
    return sq, uses
