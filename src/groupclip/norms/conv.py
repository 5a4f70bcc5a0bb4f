"""Per-sample rules for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

The input is padded as the layer pads it and unfolded into patches, after which a convolution is a linear
layer per group of channels with T = number of output positions (``docs/MATH.md``, section "Per-sample norms of a
layer"). Any stride, padding (numbers, ``"same"``/``"valid"``, every ``padding_mode``), dilation and ``groups`` is
supported.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch.nn.functional as F
from torch import Tensor, nn

from .contributions import Contribution, Factored, FactorSum, Instantiated
from .registry import FactorShape, LayerCost, register_layer


def unfold_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of ``x`` as the convolution sees them: ``[B, L, C_in * prod(kernel)]``.

    The last dimension is ordered ``(C_in, k_1, ..., k_n)`` like the flattened weight; L is the number of
    output positions in row-major order like the flattened output.
    """
    n = len(module.kernel_size)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode) if mode != "constant" else F.pad(x, pad)
    for dim in range(n):
        k, s, d = module.kernel_size[dim], module.stride[dim], module.dilation[dim]
        span = d * (k - 1) + 1
        x = x.unfold(2 + dim, span, s)  # appends a window dim of size span
        if d > 1:
            x = x[..., ::d]
    # x: [B, C, o_1..o_n, k_1..k_n]
    b, _c = x.shape[:2]
    outs = x.shape[2 : 2 + n]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    positions = 1
    for o in outs:
        positions *= o
    return x.permute(perm).reshape(b, positions, -1)


def conv_contributions(
    module: nn.modules.conv._ConvNd, activation: Tensor, grad_output: Tensor, wanted: Collection[str]
) -> dict[str, Contribution]:
    batch = activation.shape[0]
    groups = module.groups
    g = grad_output.reshape(batch, module.out_channels, -1).transpose(1, 2)  # [B, L, C_out]
    out: dict[str, Contribution] = {}
    if "weight" in wanted:
        patches = unfold_patches(module, activation)  # [B, L, C_in*K]
        positions = patches.shape[1]
        left = g.reshape(batch, positions, groups, module.out_channels // groups)
        right = patches.reshape(batch, positions, groups, -1)
        side = "left" if "bias" in wanted else None
        out["weight"] = Factored(left, right, module.weight.shape, bias_side=side)
        if side is not None:
            out["bias"] = FactorSum(out["weight"], (module.out_channels,))
    elif "bias" in wanted:
        out["bias"] = Instantiated(g.sum(1))
    return out


def conv_shape(module: nn.modules.conv._ConvNd, activation: Tensor, output: Tensor, batch: int) -> FactorShape:
    """``T`` = output positions, per group: ``p`` = input channels x kernel size, ``d`` = output channels."""
    groups = module.groups
    return FactorShape(
        steps=output[0, 0].numel() if output.dim() > 2 else 1,
        cols=module.in_channels // groups * math.prod(module.kernel_size),
        rows=module.out_channels // groups,
        blocks=groups,
    )


CONV_COST = LayerCost("factored", shape=conv_shape, operand="derived")  # the unfolded patches

for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, rows="first", trailing=lambda m: 0, cost=CONV_COST)(conv_contributions)
