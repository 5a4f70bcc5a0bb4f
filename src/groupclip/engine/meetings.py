"""Backward-time entry points: taps hand gradients to the engine, which finds (or starts) the backward state.

Where a batch-free tensor met per-sample data, the gradient there is split by sample: along the broadcast batch
dim of an expanded operand, or by masking an op's per-sample result one sample at a time (in chunks). The
per-sample pieces are then pulled back through the graph to the batch-free uses they came from, all at once
(``torch.autograd.grad`` with ``is_grads_batched``), and stacked on those uses until their own taps run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..dataflow.layout import sample_ids, to_rows
from ..errors import PassError
from .backward import BackwardState, will_run
from .trace import Meeting, Trace, Use, promoted_source

# Upper bound on the bytes of per-sample masked gradients materialised at once at a masked meeting.
MEETING_BUDGET_BYTES = 256 * 2**20


class MeetingMixin:
    """Mixin of :class:`~groupclip.engine.ClippingEngine`: what taps call during the backward pass."""

    def state_for(self, trace: Trace) -> BackwardState:
        """The backward state of the running backward pass that reaches ``trace`` (made at its first tap)."""
        if trace.state is not None:
            if trace.state.finished:
                raise PassError(
                    "Backward ran twice through one forward pass (retain_graph=True?); groupclip clips once per "
                    "forward pass. Run a new forward pass before each backward."
                )
            return trace.state
        if not trace.forward_done:
            raise PassError("Backward started before the model's forward pass returned.")
        if not self.attached:
            raise PassError("Backward reached the model after the engine was detached; nothing was clipped.")
        taking = [trace]
        for other in self.live:
            if other is not trace and other.forward_done and other.state is None and not other.replay:
                if any(will_run(u) for u in other.uses):
                    taking.append(other)
        taking.sort(key=lambda t: t.number)
        if len(taking) > 1 and not self.aligned_calls:
            raise PassError(
                f"This backward pass goes through {len(taking)} forward calls of the model at once. groupclip cannot "
                "tell whether row i of each call is the same sample. If they are views of the same samples (a "
                "siamese or two-view loss), construct the engine with aligned_calls=True; if they hold different "
                "samples (gradient accumulation), call backward once per forward call."
            )
        if len({t.batch for t in taking}) > 1:
            raise PassError(
                f"aligned_calls: the forward calls this backward pass reaches have different batch sizes "
                f"{[t.batch for t in taking]}; row i of every call must be sample i."
            )
        state = BackwardState(self, taking)
        torch.autograd.Variable._execution_engine.queue_callback(state.finish)
        return state

    def on_use_grad(self, use: Use, grads: list[Tensor | None], saved: tuple[Tensor, ...]) -> None:
        self.state_for(use.trace).on_use(use, grads, saved)

    def on_meeting_grad(self, meeting: Meeting, grad: Tensor) -> None:
        trace = meeting.trace
        self.state_for(trace)
        batch = trace.batch
        dim, inner = meeting.layout
        if meeting.what == "expanded":
            per_sample = to_rows(grad, dim, inner, batch).sum(1)  # the broadcast dim, summed per sample
            stacked = per_sample.unsqueeze(dim + 1).reshape(batch, *meeting.shape)
            self._pull_back(meeting.operand, stacked, [trace.uses[s] for s in meeting.sources], 0)
            return
        shape = [1] * grad.dim()
        shape[dim] = grad.shape[dim]
        ids = sample_ids(grad.shape[dim], batch, inner, device=grad.device).view(shape)
        chunk = max(1, min(batch, MEETING_BUDGET_BYTES // max(grad.numel() * grad.element_size(), 1)))
        aliases = [(a, o) for a, o in meeting.aliases if promoted_source(trace, o) is None]
        if not aliases:
            return
        views = [alias for alias, _ in aliases]
        for start in range(0, batch, chunk):
            samples = torch.arange(start, min(start + chunk, batch), device=grad.device)
            masks = ids.unsqueeze(0) == samples.view(-1, *([1] * grad.dim()))
            with self.pulled():  # the op's own share of each operand's gradient, sample by sample
                shares = torch.autograd.grad(
                    meeting.operand,
                    views,
                    grad.unsqueeze(0) * masks,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            for (_, operand), share in zip(aliases, shares, strict=True):
                if share is not None:
                    tag = getattr(operand, "_groupclip_tag", None)
                    sources = [trace.uses[s] for s in (tag.sources if tag is not None else ())]
                    self._pull_back(operand, share, sources, start)

    def _pull_back(self, operand: Tensor, stacked: Tensor, sources: list[Use], offset: int) -> None:
        """Add ``d operand / d (each source's outputs)`` applied to ``stacked`` [n, *operand] to the sources."""
        direct = [u for u in sources if u.output is not None and u.output() is operand]
        if len(sources) == 1 and direct:
            _accumulate(direct[0], 0, stacked, offset)
            return
        edges, owners = [], []
        for use in sources:
            for k, edge in enumerate(use.edges()):
                edges.append(edge)
                owners.append((use, k))
        if not edges:
            return
        with self.pulled():
            grads = torch.autograd.grad(
                operand, edges, stacked, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        for (use, k), g in zip(owners, grads, strict=True):
            if g is not None:
                _accumulate(use, k, g, offset)

    @contextlib.contextmanager
    def pulled(self) -> Iterator[None]:
        self.pulling += 1
        try:
            yield
        finally:
            self.pulling -= 1


def _accumulate(use: Use, output: int, grads: Tensor, offset: int) -> None:
    batch = use.trace.batch
    if use.sample_grads is None:
        use.sample_grads = [None] * max(use.n_out, 1)
    current = use.sample_grads[output]
    if current is None:
        current = use.sample_grads[output] = torch.zeros(
            (batch, *grads.shape[1:]), dtype=grads.dtype, device=grads.device
        )
    current[offset : offset + grads.shape[0]] += grads
