"""Layout algebra: where the samples are in a tensor, and how reshapes and permutations move them.

A per-sample tensor has its samples along one dimension ``dim`` of size ``outer * B * inner``; index ``k`` of that
dimension belongs to sample ``(k // inner) % B`` (see :mod:`groupclip.dataflow.tags`). In the row-major flat index
``L`` of the whole tensor this is ``sample(L) = (L // P) % B`` with ``P = inner * prod(shape[dim + 1:])``, which is
what lets a reshape map a layout exactly, or say it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def period(shape: Sequence[int], dim: int, inner: int) -> int:
    """``P``: the number of consecutive flat elements that belong to one sample before the next one starts."""
    return inner * math.prod(shape[dim + 1 :])


def after_reshape(
    in_shape: Sequence[int], out_shape: Sequence[int], dim: int, inner: int, batch: int
) -> tuple[int, int] | None:
    """The layout ``(dim, inner)`` of a row-major reshape of a tensor with layout ``(dim, inner)``, or None.

    None means the samples end up spread over several dimensions of the result (no single dimension tells a
    sample), which only odd reshapes do.

    Example:
        >>> after_reshape((4, 5, 8), (20, 8), 0, 1, 4)    # OPT: [B, T, d] -> [B*T, d]
        (0, 5)
        >>> after_reshape((20, 8), (4, 5, 8), 0, 5, 4)    # and back
        (0, 1)
    """
    p = period(in_shape, dim, inner)
    tail = 1
    best = None
    for j in range(len(out_shape) - 1, -1, -1):
        size = out_shape[j]
        if p % tail == 0:
            m = p // tail
            # m * B | size also makes higher dims advance the sample by multiples of B (so not at all).
            if size > 0 and size % (m * batch) == 0:
                if size > 1:
                    return (j, m)
                best = best or (j, m)
        tail *= size
    return best


def sample_ids(size: int, batch: int, inner: int, device: torch.device | str = "cpu") -> Tensor:
    """``[size]`` long: the sample each index of a batch dimension with this layout belongs to."""
    return torch.div(torch.arange(size, device=device), inner, rounding_mode="floor").remainder_(batch)


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def normalize_dims(dims, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(normalize_dim(int(d), ndim) for d in dims)


def to_rows(tensor: Tensor, dim: int, inner: int, batch: int) -> Tensor:
    """``tensor`` with its samples first: ``[B, outer * inner, *rest]`` for a layout ``(dim, inner)``.

    Rows of one sample are kept in order (outer major, inner minor). A view when ``outer == 1`` and ``dim == 0``.
    """
    t = tensor.movedim(dim, 0) if dim != 0 else tensor
    size = t.shape[0]
    outer = size // (batch * inner)
    t = t.reshape(outer, batch, inner, *t.shape[1:])
    return t.transpose(0, 1).reshape(batch, outer * inner, *t.shape[3:])
