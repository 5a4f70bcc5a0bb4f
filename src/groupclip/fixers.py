"""One-call fixes for models that cannot be trained privately as they are."""

from __future__ import annotations

import math

from torch import nn


def _groups_for(channels: int, preferred: int) -> int:
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm layer by a GroupNorm over the same channels, in place; returns ``model``.

    BatchNorm in training mode normalises with statistics of the whole batch, so one sample's gradient depends
    on the others and per-sample clipping is undefined. GroupNorm normalises each sample on its own. The number
    of groups is the largest divisor of the channel count that is at most ``num_groups``; affine parameters are
    kept if the BatchNorm had them (initialised to 1 and 0).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> replace_batchnorm(net)[1]
        GroupNorm(16, 16, eps=1e-05, affine=True)
    """
    if not num_groups >= 1 or not math.isfinite(num_groups):
        raise ValueError(f"Expected num_groups={num_groups} >= 1.")
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            norm = nn.GroupNorm(_groups_for(channels, num_groups), channels, eps=child.eps, affine=child.affine)
            if child.weight is not None:
                norm.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(model, name, norm)
        else:
            replace_batchnorm(child, num_groups)
    return model
