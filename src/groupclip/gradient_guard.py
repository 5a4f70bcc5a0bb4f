"""Refuse an ``optimizer.step()`` on gradients changed after the engine wrote them (``clip_grad_norm_``).

Under DP training ``.grad`` holds the SUM of the clipped per-sample gradients until the step pre-hook adds the noise
and divides by the expected batch size. ``torch.nn.utils.clip_grad_norm_`` (and friends) rescale that sum in place:
the signal shrinks, the noise does not, and nothing says so. :class:`GradientGuard` records each gradient tensor and
its version counter after every pass and checks them at the step: one integer comparison per parameter, no device
work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .engine.loss_scale import unscale_bumps
from .errors import GroupClipError

__all__ = ["GradientChangedError", "GradientGuard"]


class GradientChangedError(GroupClipError, RuntimeError):
    """``.grad`` was changed between backward and ``optimizer.step()`` (``torch.nn.utils.clip_grad_norm_``)."""


class GradientGuard:
    """What the engine left in ``.grad`` after the last pass, checked before the noise is added.

    ``scaled()`` says whether a GradScaler's ``unscale_`` (which may bump version counters, once per tensor on some
    devices) runs between the pass and the step: those bumps are allowed, measured once per device.
    """

    def __init__(self, params: Sequence[nn.Parameter], name_of: Callable[[nn.Parameter], str]) -> None:
        self.params = params
        self.name_of = name_of
        self.scaled: Callable[[], bool] = lambda: False
        self._written: dict[int, tuple[Tensor, int]] = {}  # id(param) -> (its .grad, version) after the last pass
        self._unscale_bumps: dict[torch.device, int] = {}

    def record(self) -> None:
        self._written = {id(p): (p.grad, p.grad._version) for p in self.params if p.grad is not None}

    def clear(self) -> None:
        self._written = {}

    def check(self) -> None:
        """Raise :class:`GradientChangedError` naming the first changed parameters; nothing else happens."""
        scaled = self.scaled()
        changed = []
        for p in self.params:
            grad, version = self._written.get(id(p), (None, 0))
            if grad is None:
                continue
            allowed = self._allowed_bumps(grad.device) if scaled else 0
            if p.grad is not grad or p.grad._version - version > allowed:
                changed.append(self.name_of(p))
        if changed:
            raise GradientChangedError(
                f"The gradients of {changed[:3]}{' ...' if len(changed) > 3 else ''} were changed between backward "
                "and optimizer.step() -- by torch.nn.utils.clip_grad_norm_ (or clip_grad_value_, "
                "accelerator.clip_grad_norm_, an in-place edit of .grad)? Under make_private, .grad holds the SUM of "
                "the clipped per-sample gradients before the noise: clipping it shrinks the signal but not the "
                "noise. Every sample's gradient is already clipped to make_private(max_grad_norm=...): remove the "
                "clip_grad_norm_ call and set the threshold there. Nothing was stepped."
            )

    def _allowed_bumps(self, device: torch.device) -> int:
        if device not in self._unscale_bumps:
            self._unscale_bumps[device] = unscale_bumps(device)
        return self._unscale_bumps[device]
