"""Per-sample contributions of one use, from what its tap's backward received.

* A module with a rule sees its own tensors with its batch dim first (moved there if the samples are along
  another leading dim); the contributions are regrouped by sample afterwards when several rows belong to one
  sample (``[B*T, d]``).
* A batch-free use (its input does not derive from the batch) gets per-sample output gradients stacked
  ``[B, *output]`` from the meetings downstream; its input is the same for every sample.
* Modules without a rule go through the generic fallback, which masks each output's gradient by sample.
* A parameter used raw has the stacked per-sample gradients of its alias as its per-sample gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import BatchDimensionError
from ..norms import Factored, Instantiated, generic_contributions
from ..norms.contributions import Contribution, FactorSum, ghost_is_smaller
from .trace import BATCHED, RAW, Use

if TYPE_CHECKING:
    from .core import NormMode


def use_contributions(use: Use, grads: list[Tensor | None], saved: tuple[Tensor, ...], batch: int):
    """``{parameter name: Contribution with B samples}`` for one use (see the module docstring)."""
    if batch == 0 or (all(g is None for g in grads) and not use.sample_grads):
        return {}
    wanted = frozenset(use.params)
    if use.kind == RAW:
        (name,) = use.params
        (stacked,) = _stacked(use, grads, [0])
        return {name: Instantiated(stacked)} if stacked is not None else {}
    if use.rule is None:
        return _generic(use, grads, saved, batch, wanted)
    if use.kind == BATCHED or use.promoted is not None:
        return _rule(use, grads, saved, batch, wanted)
    return _rule_batch_free(use, grads, saved, batch, wanted)


def _stacked(use: Use, grads: list[Tensor | None], outputs: list[int]) -> list[Tensor | None]:
    """Per-sample gradients ``[B, *output]`` of a use's batch-free outputs, checked against the summed gradient."""
    batch = use.trace.batch
    if batch <= 1:  # one sample (or none): all of the gradient is its
        return [grads[k].unsqueeze(0)[:batch] if grads[k] is not None else None for k in outputs]
    stacked = use.sample_grads or [None] * len(grads)
    found = []
    for k in outputs:
        summed, per_sample = grads[k], stacked[k]
        if summed is not None:
            if per_sample is None:
                per_sample = torch.zeros((batch, *summed.shape), dtype=summed.dtype, device=summed.device)
            _check_attributed(use, k, summed, per_sample)
        found.append(per_sample)
    return found


def _check_attributed(use: Use, output: int, summed: Tensor, per_sample: Tensor) -> None:
    """Every bit of gradient reaching a batch-free tensor must have come through per-sample data."""
    if not summed.numel():
        return
    total = per_sample.sum(0).to(summed.dtype)
    scale = float(summed.abs().max())
    relative = 1e-9 if summed.dtype == torch.float64 else 1e-3
    if float((total - summed).abs().max()) > relative * scale + 1e-30:
        raise BatchDimensionError(
            f"Part of the gradient of {use.describe()}'s batch-free output #{output} did not come through per-sample "
            "data: something batch-free reached the loss directly (e.g. a penalty on a parameter's output added to "
            "the loss), or crossed a reentrant activation checkpoint (use_reentrant=False). Its per-sample "
            "gradients would be wrong, so nothing was clipped."
        )


def _generic(use: Use, grads, saved, batch: int, wanted) -> dict[str, Contribution]:
    extra = use.extra
    args, kwargs = extra.rebuild(saved)
    layouts = [use.promoted] if use.promoted is not None else use.layouts
    free_outputs = [k for k, layout in enumerate(layouts) if layout is None]
    stacked = dict(zip(free_outputs, _stacked(use, grads, free_outputs), strict=True))
    filled, masks = [], []
    for k, (g, layout, (shape, dtype, device)) in enumerate(zip(grads, layouts, extra.shapes, strict=True)):
        if layout is None:
            s = stacked[k]
            filled.append(s if s is not None else torch.zeros((batch, *shape), dtype=dtype, device=device))
            masks.append(None)
        else:
            filled.append(g if g is not None else torch.zeros(shape, dtype=dtype, device=device))
            masks.append((0, max(shape[0], 1)) if layout[0] is None else layout)
    if use.engine.before_generic_rerun is not None:
        use.engine.before_generic_rerun(use.module)
    return generic_contributions(
        use.module, args, kwargs, extra.random_state, extra.positions, filled, masks, wanted, batch
    )


def _rule(use: Use, grads, saved, batch: int, wanted) -> dict[str, Contribution]:
    (x,) = saved
    (g,) = grads
    if g is None:
        return {}
    dim, inner = use.promoted if use.promoted is not None else use.layouts[0]
    if dim is None:  # one sample: every row is its
        if x.dim() == 0:
            x, g = x.reshape(1), g.reshape(1, *g.shape)
        dim, inner = 0, max(x.shape[0], 1)
    if dim != 0:
        x, g = x.movedim(dim, 0), g.movedim(dim, 0)
    found = use.rule.contributions(use.module, x, g, wanted)
    if x.shape[0] == batch:
        return found
    return {name: c.to_samples(batch, inner) for name, c in found.items()}


def _rule_batch_free(use: Use, grads, saved, batch: int, wanted) -> dict[str, Contribution]:
    (x,) = saved
    (g,) = _stacked(use, grads, [0])
    if g is None:
        return {}
    if use.rule.rows == "leading":
        return use.rule.contributions(use.module, x.unsqueeze(0).expand(batch, *x.shape), g, wanted)
    rows = x.shape[0]
    x_rows = x.unsqueeze(0).expand(batch, *x.shape).reshape(batch * rows, *x.shape[1:])
    found = use.rule.contributions(use.module, x_rows, g.reshape(batch * rows, *g.shape[2:]), wanted)
    return {name: c.to_samples(batch, rows) for name, c in found.items()}


def instantiates(contribution: Contribution, mode: NormMode) -> bool:
    """Whether the norm mode instantiates this contribution's per-sample gradients (rather than keep factors)."""
    if isinstance(contribution, Instantiated) or mode == "ghost":
        return False
    if mode == "instantiate":
        return True
    if isinstance(contribution, FactorSum):  # a bias: cheap either way; joins its weight's norm when it can
        return False
    factored = isinstance(contribution, Factored)
    if factored:
        rows, cols = contribution.left.shape[-1], contribution.right.shape[-1]
    else:
        rows, cols = contribution.param_shape
    return not ghost_is_smaller(factored, contribution.steps, rows, cols)


def shaped_for_norm(contribution: Contribution, mode: NormMode) -> Contribution:
    """Apply the norm mode: keep factors for the ghost norm, or instantiate per-sample gradients now."""
    return contribution.instantiate() if instantiates(contribution, mode) else contribution
