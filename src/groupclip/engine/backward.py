"""One backward pass: which uses it will run, when parameters and groups are complete, clipping, and the write.

A :class:`BackwardState` is made when the first tap of a backward pass fires. It takes every recorded forward
trace that this backward reaches (a loss over several forward calls reaches several) and counts, per parameter,
the uses whose taps will run. As taps fire:

* a use's per-sample contributions are added to its parameters' pending lists;
* a parameter whose last use has run is *complete*: the squared norm of its total per-sample gradient (cross terms
  between uses included) goes into its group's row of the ``[groups, B]`` buffer, in units of the threshold;
* a group whose last parameter is complete is *ready*; the groups a use makes ready are clipped together in one
  *event* -- one finiteness check and one clip-factor computation for all of them -- and their clipped sums are
  written straight into gradient buffers. Groups of per-sample vectors only (biases, norm scales) wait for the
  end of the pass, where all of them are clipped together (:mod:`groupclip.engine.vectors`) -- unless their
  per-sample vectors grow past 1/16 of the previous pass' peak of everything else held: then the complete ones are
  clipped with the next event, so that waiting raises the peak of held bytes by at most about that share;
* at the end of the backward pass the rest is clipped and the buffers become the parameters' ``.grad``
  (:mod:`groupclip.engine.gradient_write`).

A non-finite per-sample norm gives that sample the factor 0 in that group (its contribution is dropped, the others
are kept); with ``nonfinite="raise"`` the pass then writes nothing and raises instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import PassError
from ..norms.contributions import Factored, FactorSum, Instantiated, combine_uses, compute_dtype
from .compute import instantiates, shaped_for_norm, use_contributions
from .gradient_write import commit
from .memory import MemoryLedger
from .plan import is_finite_sum, spans
from .trace import Trace, Use
from .vectors import VECTOR_ELEMENTS, PassVectors

# Vector-only rows clipped early once their vectors exceed this share of the previous pass' peak of other holdings:
# a few ops per early event against at most this much more memory held.
PILE_SHARE = 1 / 16

if TYPE_CHECKING:
    from .core import ClippingEngine
    from .settings import NormMode


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
        self.column = engine.threshold_column()
        self.sq = torch.zeros(rows, self.batch, dtype=plan.norm_dtype, device=plan.norm_device)
        self.factors = torch.empty(rows, self.batch, dtype=plan.norm_dtype, device=plan.norm_device)
        self.checks_events = engine.nonfinite == "drop" or engine.clip_fn.normalized is None
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
        self.vectors_ready: list[int] = []  # complete vector-only rows, not yet clipped
        self.others_peak = 0  # the most bytes held so far beyond the vectors of vector-only rows
        # Vector-only rows wait for the end of the pass while their vectors stay under a share of the last pass'
        # peak of the rest (per sample, times this batch); unknown in the first pass: they wait for the end.
        per_sample = plan.others_peak_per_sample
        self.pile_limit = math.inf if per_sample is None else per_sample * self.batch * PILE_SHARE
        self.buffers: dict[int, Tensor] = {}  # parameter key -> its clipped sum (compute dtype)
        self.dropped: dict[int, Tensor] = {}
        self.grams: dict[tuple, Tensor] = {}
        self.ledger = MemoryLedger(parent=engine.ledger)
        self.vectors = PassVectors(plan, self.ledger)
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
        engine.begin_compute()  # not a context manager: this runs once per use, and a generator costs microseconds
        try:
            found = use_contributions(use, grads, saved, self.batch)
        finally:
            engine.end_compute()
        found = self._shaped(use, found, engine.mode_for(use.path))
        if use.gram_key is not None:
            self._share_gram(use.gram_key, found)
        self.use_done(use, found)

    def _shaped(self, use: Use, found: Mapping, mode: NormMode) -> dict:
        """The norm mode applied; a small instantiated weight and its bias, in one group, formed side by side."""
        shaped = {}
        for name, c in found.items():
            if type(c) is FactorSum and instantiates(c.source, mode):
                weight = next((w for w, f in found.items() if f is c.source), None)
                if weight is not None and self._gathered_together(use, c.source, weight, name):
                    shaped[weight], shaped[name] = c.source.instantiate_with_bias(c.param_shape)
        for name, c in found.items():
            if name not in shaped:
                shaped[name] = shaped_for_norm(c, mode)
        return shaped

    def _gathered_together(self, use: Use, weight: Factored, weight_name: str, bias_name: str) -> bool:
        """A one-block weight that will be gathered (see ``_is_vector``), in its bias' group."""
        kw, kb = id(use.params[weight_name]), id(use.params[bias_name])
        return (
            weight.left.shape[2] == 1
            and self.plan.group_of[kw] == self.plan.group_of[kb]
            and self._gatherable(kw, weight.left)
        )

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
        joint = self._joint_bias(use, found)
        for name, p in use.params.items():
            key = id(p)
            c = found.get(name)
            if type(c) is FactorSum and (joint is None or name not in joint):
                c = c.instantiate()  # a small [B, bias] now: the weight's factors are not kept for it
            if c is not None:
                self.uses_of.setdefault(key, []).append(c)
                self.ledger.hold(c)
            self.pending[key] -= 1
            if self.pending[key] == 0:
                self._complete(key, norm_added=joint is not None and name in joint)
        self._maybe_clip()

    def _joint_bias(self, use: Use, found: Mapping) -> tuple[str, str] | None:
        """A weight and its bias (:class:`FactorSum`) in one group, each used once: add their norm in one op."""
        for bias, c in found.items():
            if type(c) is not FactorSum:
                continue
            for weight, w in found.items():
                if w is not c.source:
                    continue
                kw, kb = id(use.params[weight]), id(use.params[bias])
                group_of, pending = self.plan.group_of, self.pending
                if (
                    group_of[kw] == group_of[kb]
                    and pending[kw] == 1
                    and pending[kb] == 1
                    and kw not in self.uses_of
                    and kb not in self.uses_of
                ):
                    row = group_of[kw]
                    target = self.sq[row]
                    if w.left.device == target.device and compute_dtype(w.left.dtype) == target.dtype:
                        w.sq_into(target, self.scales[row], with_bias=True)
                        return weight, bias
        return None

    def _complete(self, key: int, norm_added: bool = False) -> None:
        row = self.plan.group_of[key]
        uses = self.uses_of.pop(key, [])
        if uses and norm_added:
            self.kept[key] = uses
        elif len(uses) == 1 and self._is_vector(uses[0], key):
            self.vectors.add(row, key, uses[0])
        elif uses:
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
            (self.vectors_ready if self.plan.vectors[row] else self.ready).append(row)

    def _is_vector(self, c, key: int) -> bool:
        """Per-sample gradients small enough to gather: their norms and clipped sums are one op per group."""
        if type(c) is FactorSum:
            c = c.instantiate()
        return type(c) is Instantiated and self._gatherable(key, c.grad)

    def _gatherable(self, key: int, per_sample: Tensor) -> bool:
        """A parameter small enough to gather, its per-sample values on the norms' device, in their dtype."""
        return (
            self.plan.params[key].numel() <= VECTOR_ELEMENTS
            and per_sample.device == self.sq.device
            and compute_dtype(per_sample.dtype) == self.sq.dtype
        )

    def _maybe_clip(self) -> None:
        """Clip the ready groups now -- except groups of per-sample vectors only (biases, norm scales): they wait
        for the end of the pass, where all of them are clipped together (a few ops for all of them, not a few
        each; their per-sample gradients are small) -- unless they have grown past ``pile_limit``: then the ready
        ones are clipped with this event."""
        if self.engine.defer_clipping:
            return
        held = self.ledger.held_bytes
        self.others_peak = max(self.others_peak, held - self.vectors.pile.held_bytes)
        if self.vectors_ready and self.vectors.pile.held_bytes > self.pile_limit:
            self.ready += self.vectors_ready
            self.vectors_ready = []
        if not self.ready:
            return
        rows, self.ready = self.ready, []
        self.clip(rows)

    # ------------------------------------------------------------------ clipping
    def clip(self, rows: list[int]) -> None:
        """One event: factors for every row (group) in ``rows``, then their clipped sums."""
        rows = sorted(r for r in rows if not self.clipped[r])
        if not rows:
            return
        self.vectors.gather(rows, self.sq, self.scales)
        coefs = self._factors(rows)
        self.buffers.update(self.vectors.clip(set(rows), self.factors, coefs, self.dropped, self.loss_scale))
        scale = self.loss_scale
        for row in rows:
            coef = coefs[row]
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

    def _factors(self, rows: list[int]) -> dict[int, Tensor]:
        """Clip factors of ``rows`` into ``self.factors``: one computation for all of them.

        Consecutive rows are read as a slice, scattered ones gathered by index. Only when non-finite norms must be
        dropped sample by sample (``nonfinite="drop"``) or the clip function is the user's (its bound is checked)
        does an event look at the values, one sum each; otherwise the pass is checked once, when it commits.
        """
        engine = self.engine
        check = self.checks_events
        runs = spans(rows)
        if len(runs) > 1 and engine.clip_fn.normalized is not None and engine.clip_fn.bound_proven:
            index = self.plan.row_index(rows)
            sq = self.sq.index_select(0, index)
            if not check or is_finite_sum(sq):
                factors = engine.clip_factors(sq, index, column=self.column)
                self.factors.index_copy_(0, index, factors)
                return dict(zip(rows, factors, strict=True))
        coefs: dict[int, Tensor] = {}
        for span in runs:
            sq = self.sq[span]
            if check and not is_finite_sum(sq):
                finite = torch.isfinite(sq)
                factors = engine.clip_factors(sq.where(finite, 0), span, column=self.column).where(finite, 0)
                self.factors[span] = factors
                for k in range(span.stop - span.start):
                    if not bool(finite[k].all()):
                        self.dropped[span.start + k] = ~finite[k]
            else:
                factors = engine.clip_factors(sq, span, self.factors[span], self.column)
            for k in range(span.stop - span.start):
                coefs[span.start + k] = factors[k]
        return coefs

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
        # every norm complete before a deferred pass reports its norms
        self.vectors.gather(sorted(self.vectors.waiting), self.sq, self.scales)
        if self.batch > 0:
            self.plan.others_peak_per_sample = self.others_peak / self.batch
        engine = self.engine
        if engine.defer_clipping:
            engine.deferred.append(self)
            return
        self.clip(list(range(len(self.plan.groups))))
        commit(self)

    # ------------------------------------------------------------------ deferred clipping (pipeline stages)
    def squared_norms(self) -> Tensor:
        """``[groups, B]`` squared per-sample norms (of the per-sample losses) of a finished, unclipped pass."""
        return self.sq * self.engine.threshold_column().square()

    def clip_with(self, squared_norms: Tensor) -> None:
        """Clip every group with given ``[groups, B]`` squared norms (summed over pipeline stages), then commit."""
        column = self.engine.threshold_column().square()
        self.sq = (squared_norms.to(self.sq) / column).contiguous()
        self.clip(list(range(len(self.plan.groups))))
        commit(self)
