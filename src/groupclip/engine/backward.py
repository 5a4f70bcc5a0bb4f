"""One backward pass: which uses it will run, when parameters and groups are complete, clipping, and the write.

A :class:`BackwardState` is made when the first tap of a backward pass fires. It takes every recorded forward
trace that this backward reaches (a loss over several forward calls reaches several) and counts, per parameter,
the uses whose taps will run. As taps fire:

* a use's per-sample contributions are added to its parameters' pending lists;
* a parameter whose last use has run is *complete*: the squared norm of its total per-sample gradient (cross terms
  between uses included) goes into its group's row of the ``[groups, B]`` buffer, in units of the threshold;
* a group whose last parameter is complete is *ready*; the groups a use makes ready are clipped together in one
  *event* -- one finiteness check and one clip-factor computation for all of them -- and their clipped sums are
  written straight into gradient buffers;
* at the end of the backward pass the rest is clipped and the buffers become the parameters' ``.grad``.

A non-finite per-sample norm gives that sample the factor 0 in that group (its contribution is dropped, the others
are kept); with ``nonfinite="raise"`` the pass then writes nothing and raises instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import NonFiniteNormError, PassError
from ..norms.contributions import Factored, combine_uses, compute_dtype
from .compute import shaped_for_norm, use_contributions
from .memory import MemoryLedger
from .plan import is_finite_sum, row_span
from .report import ClipReport
from .trace import Trace, Use

if TYPE_CHECKING:
    from .core import ClippingEngine


def will_run(use: Use) -> bool:
    node = use.node() if use.node is not None else None
    return node is not None and torch._C._will_engine_execute_node(node)


class BackwardState:
    """Bookkeeping of one backward pass (see the module docstring)."""

    def __init__(self, engine: ClippingEngine, traces: list[Trace]) -> None:
        plan = engine.plan
        self.engine, self.plan, self.traces = engine, plan, traces
        self.batch = traces[0].batch
        self.loss_scale = traces[0].loss_scale
        self.sequence = traces[0].number
        rows = len(plan.groups)
        self.scales = plan.scales(engine.thresholds, self.loss_scale)
        self.sq = torch.zeros(rows, self.batch, dtype=plan.norm_dtype, device=plan.norm_device)
        self.factors = torch.ones(rows, self.batch, dtype=plan.norm_dtype, device=plan.norm_device)
        self.pending: dict[int, int] = {}
        self.readers: dict[tuple, int] = {}
        for trace in traces:
            trace.state = self
            for use in trace.uses:
                if use.done:
                    continue
                if not will_run(use):
                    use.done = True
                    continue
                for p in use.params.values():
                    self.pending[id(p)] = self.pending.get(id(p), 0) + 1
                if use.gram_key is not None:
                    self.readers[use.gram_key] = self.readers.get(use.gram_key, 0) + 1
            for key, count in trace.deferred.items():
                self.pending[key] = self.pending.get(key, 0) + count
        self.group_left = [sum(1 for k in members if self.pending.get(k, 0) > 0) for members in plan.members]
        self.clipped = [left == 0 for left in self.group_left]
        self.uses_of: dict[int, list] = {}
        self.kept: dict[int, list] = {}
        self.ready: list[int] = []
        self.buffers: dict[int, Tensor] = {}  # parameter key -> its clipped sum (compute dtype)
        self.dropped: dict[int, Tensor] = {}
        self.grams: dict[tuple, Tensor] = {}
        self.ledger = MemoryLedger(parent=engine.ledger)
        self.finished = False

    # ------------------------------------------------------------------ taps
    def on_use(self, use: Use, grads: list[Tensor | None], saved: tuple[Tensor, ...]) -> None:
        if self.finished or use.done:
            raise PassError(
                f"Backward ran twice through {use.describe()} for one forward pass (retain_graph=True?); groupclip "
                "clips once per forward pass. Run a new forward pass before each backward."
            )
        use.done = True
        engine = self.engine
        with engine.computing():
            found = use_contributions(use, grads, saved, self.batch)
        mode = engine.mode_for(use.path)
        found = {name: shaped_for_norm(c, mode) for name, c in found.items()}
        if use.gram_key is not None:
            self._share_gram(use.gram_key, found)
        self.use_done(use, found)

    def _share_gram(self, key: tuple, found: Mapping) -> None:
        """Give a Factored contribution the Gram of its input, computed once for all uses reading that input."""
        if key not in self.readers:  # recorded during this backward (a recomputation): no sharing
            return
        readers = self.readers[key]
        factored = [c for c in found.values() if isinstance(c, Factored) and c.left.shape[2] == 1 and c.steps > 1]
        if factored and (readers > 1 or key in self.grams):
            gram = self.grams.get(key)
            if gram is None:
                gram = self.grams[key] = factored[0].gram_of_right()
            factored[0].right_gram = gram
        self.readers[key] = readers - 1
        if readers <= 1:
            self.grams.pop(key, None)

    def use_done(self, use: Use, found: Mapping) -> None:
        for name, p in use.params.items():
            key = id(p)
            c = found.get(name)
            if c is not None:
                self.uses_of.setdefault(key, []).append(c)
                self.ledger.hold(c)
            self.pending[key] -= 1
            if self.pending[key] == 0:
                self._complete(key)
        self._maybe_clip()

    def _complete(self, key: int) -> None:
        row = self.plan.group_of[key]
        uses = self.uses_of.pop(key, [])
        if uses:
            target = self.sq[row]
            if len(uses) == 1:
                kept = uses
                values = uses[0].tensors()[-1]
                if values.device == target.device and compute_dtype(values.dtype) == target.dtype:
                    uses[0].sq_into(target, self.scales[row])
                else:
                    target.add_(uses[0].ghost_sq_norm().to(target), alpha=self.scales[row])
            else:
                sq, kept = combine_uses(uses)
                target.add_(sq.to(target), alpha=self.scales[row])
                for c in uses:
                    self.ledger.release(c)
                for c in kept:
                    self.ledger.hold(c)
            self.kept[key] = kept
        self.group_left[row] -= 1
        if self.group_left[row] == 0:
            self.ready.append(row)

    def _maybe_clip(self) -> None:
        """Clip the ready groups now -- unless they all hold only per-sample vectors (biases, norm scales), which
        wait for the next event: a few bytes more held, one event (a check and a factor computation) fewer."""
        if not self.ready or self.engine.defer_clipping:
            return
        if all(self.plan.vectors[row] for row in self.ready):
            return
        ready, self.ready = self.ready, []
        self.clip(ready)

    # ------------------------------------------------------------------ clipping
    def clip(self, rows: list[int]) -> None:
        """One event: factors for every row (group) in ``rows``, then their clipped sums."""
        rows = sorted(r for r in rows if not self.clipped[r])
        if not rows:
            return
        span = row_span(rows)
        index = None if span is not None else torch.tensor(rows, device=self.sq.device)
        sq = self.sq[span] if span is not None else self.sq.index_select(0, index)
        bad = not is_finite_sum(sq)
        factors = self.engine.clip_factors(sq, rows, self.factors[span] if span is not None and not bad else None)
        if bad:
            finite = torch.isfinite(sq)
            factors = factors.where(finite, 0)
            for k, row in enumerate(rows):
                if not bool(finite[k].all()):
                    self.dropped[row] = ~finite[k]
        if span is None or bad:
            if span is not None:
                self.factors[span] = factors
            else:
                self.factors.index_copy_(0, index, factors)
        scale = self.loss_scale
        for k, row in enumerate(rows):
            coef = factors[k]
            drop = self.dropped.get(row)
            for key in self.plan.members[row]:
                kept = self.kept.pop(key, None)
                if not kept:
                    continue
                out = None
                for c in kept:
                    out = (c if drop is None else c.without(drop)).clipped(coef, scale, out)
                    self.ledger.release(c)
                self.buffers[key] = out
            self.clipped[row] = True

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """End of the backward pass (queued callback): complete what never ran, clip the rest, write, report."""
        if self.finished:
            return
        self.finished = True
        for trace in self.traces:
            for use in trace.uses:
                if not use.done:
                    use.done = True
                    self.use_done(use, {})
            for key, count in trace.deferred.items():
                if count:
                    self.pending[key] -= count
                    if self.pending[key] == 0:
                        self._complete(key)
            trace.deferred.clear()
        engine = self.engine
        if engine.defer_clipping:
            engine.deferred.append(self)
            return
        self.clip(list(range(len(self.plan.groups))))
        self.commit()

    def commit(self) -> None:
        """Write the clipped sums into ``.grad`` (or the grad sink), then report; or refuse on non-finite norms."""
        engine = self.engine
        engine.peak_held_bytes = max(engine.peak_held_bytes, self.ledger.peak_held_bytes, engine.ledger.peak_held_bytes)
        if self.dropped and engine.nonfinite == "raise":
            engine.nonfinite_passes += 1
            if engine.grad_sink is not None:
                engine.grad_sink(None)
            if engine.defer_nonfinite_error:
                return
            detail = "; ".join(
                f"group {self.plan.groups[r]!r}: samples {torch.nonzero(m).flatten().tolist()}"
                for r, m in self.dropped.items()
            )
            raise NonFiniteNormError(
                f"Non-finite per-sample gradient norms ({detail}); no gradient was written. "
                "Check the loss and inputs of those samples (NaN/inf) or lower the lr."
            )
        plan = self.plan
        written = [(plan.params[key], buffer) for key, buffer in self.buffers.items()]
        if engine.grad_sink is not None:
            started = engine.grad_sink(written)
        else:
            started = all(p.grad is None for p in plan.params.values())
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
        self.buffers = {}
        engine.report(self.report(started))

    def report(self, started_fresh: bool) -> ClipReport:
        plan = self.plan
        thresholds = dict(self.engine.thresholds)
        column = plan.threshold_column(thresholds)
        norms = self.sq.clamp_min(0).sqrt_().mul_(column)
        return ClipReport(
            batch_size=self.batch,
            per_sample_norms=Rows(norms, plan.groups),
            clip_factors=Rows(self.factors, plan.groups),
            thresholds=thresholds,
            peak_held_bytes=self.ledger.peak_held_bytes,
            activation_bytes=sum(t.activation_bytes for t in self.traces),
            started_fresh=started_fresh,
            dropped={plan.groups[r]: torch.nonzero(m).flatten().tolist() for r, m in self.dropped.items()},
            squared_norms=norms.square(),
            factors=self.factors,
        )

    # ------------------------------------------------------------------ deferred clipping (pipeline stages)
    def squared_norms(self) -> Tensor:
        """``[groups, B]`` squared per-sample norms (of the per-sample losses) of a finished, unclipped pass."""
        return self.sq * self.plan.threshold_column(self.engine.thresholds).square()

    def clip_with(self, squared_norms: Tensor) -> None:
        """Clip every group with given ``[groups, B]`` squared norms (summed over pipeline stages), then commit."""
        column = self.plan.threshold_column(self.engine.thresholds).square()
        self.sq = (squared_norms.to(self.sq) / column).contiguous()
        self.clip(list(range(len(self.plan.groups))))
        self.commit()


class Rows(Mapping):
    """``group -> [B]`` rows of a ``[groups, B]`` tensor, sliced on access."""

    def __init__(self, table: Tensor, groups: list[str]) -> None:
        self._table, self._index = table, {g: k for k, g in enumerate(groups)}

    def __getitem__(self, group: str) -> Tensor:
        return self._table[self._index[group]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)
