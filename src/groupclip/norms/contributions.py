"""Per-sample gradient contributions of one use of a parameter, and the algebra groupclip needs on them.

A layer's per-sample weight gradient is rarely formed explicitly. It is kept in one of three shapes:

* :class:`Factored` -- ``G_i = sum_t left[i, t]^T right[i, t]`` per block (Linear, HF Conv1D, convolutions),
* :class:`Indexed` -- ``G_i = sum_t e_{index[i, t]}^T right[i, t]`` (embedding lookups),
* :class:`Instantiated` -- ``G_i`` itself, ``[B, *param_shape]`` (norm layers, the generic fallback).

The engine needs three things of them: the squared per-sample norm of a parameter's total gradient (the SUM
over all uses of the parameter -- cross terms between uses included, MATH.md §2), and the clipped sum
``sum_i c_i G_i`` for per-sample coefficients ``c`` (Book-Keeping, MATH.md §3). Norms are computed in at least
float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and clipped sums are computed in: float32 for half types, else the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _up(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype))


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

    @property
    def steps(self) -> int:
        return self.left.shape[1]

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

    def ghost_sq_norm(self) -> Tensor:
        """``sum_{t,s} (L L^T)_{ts} (R R^T)_{ts}`` per sample; time ~ B T^2 (r + c)."""
        b, _, g, _ = self.left.shape
        if self.steps == 1:
            sq = _up(self.left).pow(2).sum(-1) * _up(self.right).pow(2).sum(-1)  # [B, 1, G]
            return sq.sum((1, 2))
        left, right = self._blocks()
        gram = torch.bmm(left, left.transpose(1, 2))
        gram.mul_(self.right_gram if self.right_gram is not None else torch.bmm(right, right.transpose(1, 2)))
        return gram.sum((1, 2)).view(b, g).sum(1)

    def instantiate(self) -> Instantiated:
        b, _, _g, _ = self.left.shape
        left, right = self._blocks()
        per_sample = torch.bmm(left.transpose(1, 2), right)  # [B*G, r, c]
        return Instantiated(per_sample.view(b, *self.param_shape))

    def clipped_sum(self, coef: Tensor) -> Tensor:
        b, t, g, r = self.left.shape
        c = self.right.shape[-1]
        left, right = _up(self.left), _up(self.right)
        coef = coef.to(left.dtype).view(b, 1, 1, 1)
        # Scale the smaller factor; one ordinary weight-gradient product per block.
        if r <= c:
            left = left * coef
        else:
            right = right * coef
        if g == 1:
            out = left.reshape(b * t, r).transpose(0, 1) @ right.reshape(b * t, c)
        else:
            left = left.permute(2, 3, 0, 1).reshape(g, r, b * t)
            right = right.permute(2, 0, 1, 3).reshape(g, b * t, c)
            out = torch.bmm(left, right)
        return out.reshape(self.param_shape)

    def cross(self, other: Factored) -> Tensor:
        """``<G_i^self, G_i^other>`` per sample by the ghost trick (both uses of one parameter)."""
        b, _, g, _ = self.left.shape
        l1, r1 = self._blocks()
        l2, r2 = other._blocks()
        prod = torch.bmm(l1, l2.transpose(1, 2)).mul_(torch.bmm(r1, r2.transpose(1, 2)))
        return prod.sum((1, 2)).view(b, g).sum(1)


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

    def ghost_sq_norm(self) -> Tensor:
        right = _up(self.right)
        same = self.index.unsqueeze(2) == self.index.unsqueeze(1)  # [B, T, T]
        dots = torch.bmm(right, right.transpose(1, 2))
        return (dots * same).sum((1, 2))

    def instantiate(self) -> Instantiated:
        b, t = self.index.shape
        rows, c = self.param_shape
        right = _up(self.right)
        flat = (self.index + torch.arange(b, device=self.index.device).unsqueeze(1) * rows).reshape(-1)
        out = torch.zeros(b * rows, c, dtype=right.dtype, device=right.device)
        out.index_add_(0, flat, right.reshape(b * t, c))
        return Instantiated(out.view(b, rows, c))

    def clipped_sum(self, coef: Tensor) -> Tensor:
        right = _up(self.right)
        weighted = right * coef.to(right.dtype).view(-1, 1, 1)
        out = torch.zeros(self.param_shape, dtype=right.dtype, device=right.device)
        out.index_add_(0, self.index.reshape(-1), weighted.reshape(-1, self.param_shape[1]))
        return out

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


@dataclass
class Instantiated:
    """The per-sample gradients themselves, ``[B, *param_shape]``."""

    grad: Tensor

    def ghost_sq_norm(self) -> Tensor:
        flat = _up(self.grad).flatten(1)
        return (flat * flat).sum(1)

    def instantiate(self) -> Instantiated:
        return self

    def clipped_sum(self, coef: Tensor) -> Tensor:
        grad = _up(self.grad)
        return torch.tensordot(coef.to(grad.dtype), grad, dims=([0], [0]))


Contribution = Factored | Indexed | Instantiated


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


def contribution_bytes(contribution: Contribution) -> dict[int, int]:
    """Bytes of the distinct storages a contribution keeps alive, keyed by storage pointer."""
    if isinstance(contribution, Factored):
        tensors = (contribution.left, contribution.right)
    elif isinstance(contribution, Indexed):
        tensors = (contribution.index, contribution.right)
    else:
        tensors = (contribution.grad,)
    out: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out
