"""The end of a clipped backward pass: refuse it on non-finite norms, or write its clipped sums into the
parameters' ``.grad`` (or hand them to the engine's grad sink), then report it as a :class:`ClipReport`.

Called once per pass by :class:`~groupclip.engine.backward.BackwardState` when every group is clipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import NonFiniteNormError
from .plan import is_finite_sum
from .report import ClipReport

if TYPE_CHECKING:
    from .backward import BackwardState


def commit(state: BackwardState) -> None:
    """Write the clipped sums into ``.grad`` (or the grad sink), then report; or refuse on non-finite norms."""
    engine = state.engine
    engine.peak_held_bytes = max(engine.peak_held_bytes, state.ledger.peak_held_bytes, engine.ledger.peak_held_bytes)
    if not state.checks_events and not is_finite_sum(state.sq):
        finite = torch.isfinite(state.sq)
        state.dropped = {r: ~finite[r] for r in range(len(state.plan.groups)) if not bool(finite[r].all())}
    if state.dropped and engine.nonfinite == "raise":
        refuse_nonfinite(state)
        return
    plan = state.plan
    written = [(plan.params[key], buffer) for key, buffer in state.buffers.items()]
    if engine.grad_sink is not None:
        started = engine.grad_sink(written)
    else:
        started = all(p.grad is None for p in plan.params.values())
        add_into_grads(written)
    state.buffers = {}
    engine.report(clip_report(state, started))


def refuse_nonfinite(state: BackwardState) -> None:
    """A pass with non-finite norms under ``nonfinite="raise"``: write nothing, count it, and raise (unless the
    engine defers the error to its caller)."""
    engine = state.engine
    engine.nonfinite_passes += 1
    if engine.grad_sink is not None:
        engine.grad_sink(None)
    if engine.defer_nonfinite_error:
        return
    detail = "; ".join(
        f"group {state.plan.groups[r]!r}: samples {torch.nonzero(m).flatten().tolist()}"
        for r, m in state.dropped.items()
    )
    raise NonFiniteNormError(
        f"Non-finite per-sample gradient norms ({detail}); no gradient was written. "
        "Check the loss and inputs of those samples (NaN/inf) or lower the lr."
    )


def add_into_grads(written: list[tuple[nn.Parameter, Tensor]]) -> None:
    """Each clipped sum becomes its parameter's ``.grad``, or is added to the one there (in the parameter's dtype)."""
    adds, into = [], []
    for p, view in written:
        if view.dtype != p.dtype:
            view = view.to(p.dtype)
        if p.grad is None:
            p.grad = view
        else:
            into.append(p.grad)
            adds.append(view)
    if into:
        torch._foreach_add_(into, adds)


def clip_report(state: BackwardState, started_fresh: bool) -> ClipReport:
    """What the pass did: its groups, thresholds, normalized squared norms, factors and memory."""
    return ClipReport(
        batch_size=state.batch,
        groups=state.plan.groups,
        thresholds=dict(state.engine.thresholds),
        threshold_column=state.column,
        normalized_squares=state.sq,
        factors=state.factors,
        peak_held_bytes=state.ledger.peak_held_bytes,
        activation_bytes=sum(t.activation_bytes for t in state.traces),
        started_fresh=started_fresh,
    )
