"""Loss scaling (``torch.amp.GradScaler``) and torch.compile around the engine.

A GradScaler multiplies the loss by its scale ``s`` before backward, so every per-sample gradient the engine sees
is ``s`` times the gradient of the per-sample loss. :func:`use_grad_scaler` tells the engine ``s`` (read once per
backward pass): the per-sample norms are divided by it, so clipping acts on the unscaled gradients, and the
clipped sums keep it (``.grad`` holds ``s * sum_i C_i g_i``), which ``scaler.unscale_`` -- inside
``scaler.step(optimizer)``, before the optimizer's step pre-hooks run -- divides away as for any model.

The engine records every forward call with module hooks, a torch-function mode and autograd taps, which Dynamo
cannot trace (measured on torch 2.13: graph breaks at every hook, a new graph per batch size, and the recompile
limit hit within five steps). :func:`run_eagerly_under_compile` makes the call of the engine's root module opaque
to Dynamo, so ``torch.compile(model)`` runs it eagerly: exact, and nothing is recompiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["LossScaleOverflowWarning", "check_grad_scaler", "run_eagerly_under_compile", "uncompiled", "unscale_bumps"]


def check_grad_scaler(scaler: Any) -> None:
    """``scaler`` is a ``torch.amp.GradScaler`` (or the older ``torch.cuda.amp.GradScaler``)."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"Expected grad_scaler to be a torch.amp.GradScaler (the one whose scale(loss) the loop calls "
            f"backward on); got {type(scaler).__name__}."
        )


def unscale_bumps(device: torch.device) -> int:
    """How many times ``GradScaler.unscale_`` bumps a gradient's version counter on ``device`` (0 on CPU)."""
    probe = torch.ones(1, device=device)
    before = probe._version
    found = torch.zeros(1, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_([probe], found, torch.ones(1, device=device))
    return probe._version - before


class LossScaleOverflowWarning(UserWarning):
    """Samples whose scaled per-sample gradient overflowed were dropped from a step (the loss scale is too large)."""


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its parameter names are the user's, without ``_orig_mod.``)."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def run_eagerly_under_compile(model: nn.Module) -> Callable[[], None]:
    """Make calls of ``model`` run eagerly even inside a compiled region; returns the undo."""
    if "_call_impl" in model.__dict__:  # already done (another engine) or the user's own: leave it
        return lambda: None
    # A partial of the model, not a bound method: copy.deepcopy(model) then calls the copy, not this model.
    model._call_impl = functools.partial(_eager_call_impl(), model)

    def undo() -> None:
        model.__dict__.pop("_call_impl", None)

    return undo


@functools.cache
def _eager_call_impl() -> Callable[..., Any]:
    return torch.compiler.disable(nn.Module._call_impl)
