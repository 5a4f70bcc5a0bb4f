"""Per-sample rules for normalization layers with affine parameters.

For ``y = xhat * weight + bias`` the per-sample gradients are formed exactly and cheaply: weight
``sum over positions of xhat * g``, bias ``sum of g`` (``docs/MATH.md``, section "Per-sample norms of a layer").
``xhat`` is recomputed from the saved input.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contributions import Contribution, Instantiated
from .registry import LayerCost, register_layer

# weight and bias per-sample gradients from one reduction, side by side in one tensor (see _affine)
AFFINE_COST = LayerCost("instantiated", stacked=True)


def _affine(xhat: Tensor, g: Tensor, param_dims: int, channel_dim: int | None, wanted) -> dict[str, Contribution]:
    """Per-sample affine gradients. ``param_dims`` trailing dims (layer/RMS norm) or one channel dim."""
    out: dict[str, Contribution] = {}
    if channel_dim is None:
        reduce = tuple(range(1, g.dim() - param_dims))
    else:
        reduce = tuple(d for d in range(1, g.dim()) if d != channel_dim)
    if "weight" in wanted and "bias" in wanted:
        # both from one reduction, side by side in one tensor: the engine gathers them without a copy
        stacked = torch.stack((xhat * g, g), dim=1)
        both = stacked.sum(tuple(d + 1 for d in reduce)) if reduce else stacked
        out["weight"], out["bias"] = Instantiated(both[:, 0]), Instantiated(both[:, 1])
    elif "weight" in wanted:
        out["weight"] = Instantiated((xhat * g).sum(reduce) if reduce else xhat * g)
    elif "bias" in wanted:
        out["bias"] = Instantiated(g.sum(reduce) if reduce else g)
    return out


@register_layer(nn.LayerNorm, trailing=lambda m: len(m.normalized_shape), cost=AFFINE_COST)
def layer_norm(module: nn.LayerNorm, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
    with torch.no_grad():
        xhat = F.layer_norm(activation, module.normalized_shape, None, None, module.eps)
    return _affine(xhat, grad_output, len(module.normalized_shape), None, wanted)


@register_layer(nn.RMSNorm, trailing=lambda m: len(m.normalized_shape), cost=AFFINE_COST)
def rms_norm(module: nn.RMSNorm, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
    with torch.no_grad():
        xhat = F.rms_norm(activation, module.normalized_shape, None, module.eps)
    return _affine(xhat, grad_output, len(module.normalized_shape), None, wanted)


@register_layer(nn.GroupNorm, rows="first", trailing=lambda m: 0, cost=AFFINE_COST)
def group_norm(module: nn.GroupNorm, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
    with torch.no_grad():
        xhat = F.group_norm(activation, module.num_groups, None, None, module.eps)
    return _affine(xhat, grad_output, 1, 1, wanted)


def instance_norm(module: nn.modules.instancenorm._InstanceNorm, activation: Tensor, grad_output: Tensor, wanted):
    use_input_stats = module.training or not module.track_running_stats
    with torch.no_grad():
        xhat = F.instance_norm(
            activation,
            None if use_input_stats else module.running_mean,
            None if use_input_stats else module.running_var,
            None,
            None,
            use_input_stats,
            0.0,
            module.eps,
        )
    return _affine(xhat, grad_output, 1, 1, wanted)


for _norm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_layer(_norm, rows="first", trailing=lambda m: 0, cost=AFFINE_COST)(instance_norm)
