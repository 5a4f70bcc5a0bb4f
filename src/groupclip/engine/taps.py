"""The engine's autograd nodes: where the ordinary backward pass hands it output gradients.

Every recorded use of a parameter-owning module gets its output(s) passed through :class:`UseTap`, an identity
whose backward gives the engine ``dL/d output`` together with the use's input. The input is kept by
``save_for_backward`` -- as autograd itself would keep it for the weight gradient -- so activation checkpointing
frees and recomputes it like any other saved tensor, and an in-place change to it is caught by autograd's version
check. Where a batch-free tensor meets per-sample data, :class:`MeetingTap` hands over the gradient there so it can
be split by sample. :class:`GuardTap` refuses a backward through a model output that mixes samples.

All taps return the gradient unchanged; while the engine pulls per-sample gradients back through the graph itself
(``engine.pulling``), they do nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class UseTap(torch.autograd.Function):
    """``apply(use, anchor, n_saved, *saved, *outputs)``: identity on ``outputs``; saves ``saved``."""

    @staticmethod
    def forward(ctx, use: Any, anchor: Tensor, n_saved: int, *tensors: Tensor):
        ctx.use = use
        ctx.n_saved = n_saved
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors[:n_saved])
        outputs = tuple(t.detach() for t in tensors[n_saved:])  # not views: the model may modify them in place
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx, *grads):
        use = ctx.use
        if use is not None and not use.engine.pulling:
            use.engine.on_use_grad(use, list(grads), _saved(ctx, use))
        return (None, None, None, *([None] * ctx.n_saved), *grads)


class UseTap1(torch.autograd.Function):
    """``apply(anchor, saved, output)``: the one-input, one-output case of :class:`UseTap` (a layer with a rule),
    with fewer arguments to pass; the use is attached to the node afterwards (``node.use``)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, saved: Tensor, output: Tensor):
        ctx.save_for_backward(saved)
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        use = ctx.use
        if use is not None and not use.engine.pulling:
            use.engine.on_use_grad(use, [grad], _saved(ctx, use))
        return None, None, grad


def _saved(ctx, use) -> tuple[Tensor, ...]:
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "inplace" not in str(err):
            raise
        from ..errors import PassError

        raise PassError(
            f"An input of {use.describe()} was modified in place after the module used it; its per-sample "
            "gradient would be wrong. Avoid the in-place operation (e.g. use x = x + y instead of x += y)."
        ) from err


class MeetingTap(torch.autograd.Function):
    """``apply(meeting, anchor, tensor)``: identity; hands ``dL/d tensor`` to ``meeting.on_grad``."""

    @staticmethod
    def forward(ctx, meeting: Any, anchor: Tensor, tensor: Tensor):
        ctx.meeting = meeting
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        meeting = ctx.meeting
        if grad is not None and not meeting.engine.pulling:
            meeting.on_grad(grad)
        return None, None, grad


class GuardTap(torch.autograd.Function):
    """``apply(message, anchor, tensor)``: identity whose backward raises ``PassError(message)``."""

    @staticmethod
    def forward(ctx, message: str, anchor: Tensor, tensor: Tensor):
        ctx.message = message
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        from ..errors import PassError

        raise PassError(ctx.message)
