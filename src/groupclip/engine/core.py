"""The clipping engine: exact group-wise per-sample clipping inside the one ordinary backward pass.

How it works (Book-Keeping):

* the root module's forward is traced: every tensor is tagged per-sample or not by data flow
  (:mod:`groupclip.dataflow`), never by its size;
* every module owning trainable parameters switches them to ``requires_grad=False`` while it runs, so autograd does
  no weight-gradient work, and its output passes through a tap that hands the engine ``dL/d output`` during the
  ordinary backward pass, with the module's input saved as autograd would save it;
* the layer's rule (:mod:`groupclip.norms`) turns these into per-sample norms and, once the group is complete, into
  the clipped sum ``sum_i C_ik G_ik`` -- one ordinary weight-gradient product with re-weighted output gradients;
* a group is clipped, and its kept tensors released, the moment the backward pass has finished every use of every
  parameter in it, in the order the pass actually runs;
* at the end of the backward pass the clipped sums become ``param.grad`` (accumulating like autograd does).

Loss convention: ``loss_reduction="mean"`` means the loss you call ``backward`` on is ``(1/B) * sum_i l_i``;
``"sum"`` means ``sum_i l_i``. Either way norms and clipped sums are those of the per-sample losses ``l_i``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    >>> with ClippingEngine(model, grouping="layer-wise", max_grad_norm=1.0) as engine:
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     norms = engine.last_report.per_sample_norms      # {"0": tensor[5], "2": tensor[5]}
    >>> model[0].weight.grad.shape                          # sum_i C_i g_i, not yet divided by B
    torch.Size([8, 4])
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..clipping import ClipFunction, get_clip_function, resolve_thresholds, sensitivity
from ..dataflow.mode import BatchTracker
from ..errors import AttachError, PassError, UnsupportedModuleError
from ..grouping import GroupingSpec, ResolvedGrouping, needs_execution_order, resolve_grouping
from .backward import BackwardState
from .entries import batchnorm_message, module_entries
from .lifecycle import Lifecycle
from .meetings import MeetingMixin
from .memory import MemoryLedger
from .plan import Plan
from .report import ClipReport
from .settings import EngineSettings, LossReduction, NormMode
from .trace import Trace

__all__ = ["ClippingEngine", "LossReduction", "NormMode", "attached"]


class ClippingEngine(Lifecycle, MeetingMixin):
    """Attach to a model; every backward pass then leaves clipped per-sample gradient sums in ``param.grad``.

    Args:
        model: any ``nn.Module``.
        grouping: how parameters are grouped for clipping (see :mod:`groupclip.grouping`).
        max_grad_norm: total threshold R (each of M groups gets ``R / sqrt(M)``), or ``{group: R_k}``.
        clip_fn: ``"abadi"``, ``"automatic"``, another registered name, or a
            :class:`~groupclip.clipping.ClipFunction`.
        clip_options: options of the clip function factory, e.g. ``{"gamma": 0.05}`` for ``"automatic"``.
        loss_reduction: ``"mean"`` if the loss is the mean of per-sample losses over the batch, ``"sum"`` if it
            is their sum.
        norm_mode: ``"auto"`` (per layer, ghost norm iff ``T (p + d) < p d``), ``"ghost"`` or ``"instantiate"``; or a
            mapping ``{module path glob: mode}`` overriding chosen layers.
        batch_args: which arguments of the model's forward carry the batch (their tensors have it as dim 0):
            positional indices and/or keyword names. Default: every tensor argument whose dim 0 equals the first
            tensor argument's.
        aligned_calls: allow one backward pass over several forward calls of the model (a siamese or two-view
            loss); row i of every call is then sample i, and its per-sample gradient is the sum over the calls.
        nonfinite: ``"raise"``: a pass with a non-finite per-sample norm writes nothing and raises
            :class:`~groupclip.errors.NonFiniteNormError`; ``"drop"``: that sample gets the factor 0 in that group
            (its contribution is dropped, the pass is written; ``ClipReport.dropped`` names it).

    Raises:
        UnsupportedModuleError: a module mixes samples (BatchNorm in training) or has no per-sample form.
        GroupingError: the grouping misses or duplicates parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grouping: GroupingSpec = "all-layer",
        max_grad_norm: float | Mapping[str, float] = 1.0,
        clip_fn: str | ClipFunction = "abadi",
        clip_options: Mapping[str, float] | None = None,
        loss_reduction: LossReduction = "mean",
        norm_mode: NormMode | Mapping[str, NormMode] = "auto",
        batch_args: Sequence[int | str] | None = None,
        aligned_calls: bool = False,
        nonfinite: Literal["raise", "drop"] = "raise",
    ) -> None:
        settings = EngineSettings.validate(loss_reduction, norm_mode, batch_args, nonfinite)
        self.model = model
        self.settings = settings
        self.grouping_spec = grouping
        self.max_grad_norm = max_grad_norm
        self.clip_fn = get_clip_function(clip_fn, **dict(clip_options or {}))
        self.loss_reduction = settings.loss_reduction
        self.norm_mode = settings.norm_mode
        self.nonfinite = settings.nonfinite
        self.aligned_calls = bool(aligned_calls)
        self.grouping: ResolvedGrouping | None = None
        self.plan: Plan | None = None
        self.thresholds: dict[str, float] = {}
        self.last_report: ClipReport | None = None
        self.peak_held_bytes = 0
        self.nonfinite_passes = 0  # passes refused for non-finite norms (nonfinite="raise"; nothing written)
        self._column: Tensor | None = None  # threshold_column(), cached per plan and thresholds
        self._column_key: tuple | None = None
        # True: a refused pass raises nothing (the caller checks nonfinite_passes; data-parallel training raises at
        # optimizer.step() on every rank together instead of in one rank's backward).
        self.defer_nonfinite_error = False
        # Parameter-swapping wrappers (FSDP2): parameter_alias(p) maps a tensor a wrapper put into a parameter's slot
        # to the parameter the slot held at attach; grad_sink, if set, receives every finished pass' clipped sums
        # [(attach-time parameter, full-shape sum)] -- or None for a refused pass -- instead of their being added to
        # .grad, and returns whether the pass started a new logical batch; before_generic_rerun(module) is called
        # before the generic fallback re-runs a module in the backward pass.
        self.parameter_alias: Callable[[nn.Parameter], nn.Parameter] | None = None
        self.grad_sink: Callable[[list[tuple[nn.Parameter, Tensor]] | None], bool] | None = None
        self.before_generic_rerun: Callable[[nn.Module], None] | None = None
        # Pipeline stages: defer_clipping keeps finished passes unclipped until clip_deferred() gets the per-sample
        # norms summed over the stages. (Several forward passes may always await their backward at once.)
        self.defer_clipping = False
        # Loss scaling (a GradScaler): grad_scale() is the factor the loss was multiplied by before backward, read
        # once per pass; per-sample norms are divided by it (clipping acts on the unscaled gradients) and the
        # clipped sums keep it, for the scaler's unscale_ to divide.
        self.grad_scale: Callable[[], float] | None = None
        self.concurrent_passes = True  # kept for compatibility: every engine allows it now
        self.deferred: list[BackwardState] = []
        self.ledger = MemoryLedger()
        self.tracker = BatchTracker()
        self.live: weakref.WeakSet[Trace] = weakref.WeakSet()
        self.pulling = 0
        self.suspended_count = 0
        self.anchor: Tensor | None = None
        self.trainable_ids: set[int] = set()
        self._report_hooks: OrderedDict[int, Callable[[ClipReport], None]] = OrderedDict()
        self._init_lifecycle()
        if not needs_execution_order(grouping):
            self._set_grouping(resolve_grouping(model, grouping))

    # ------------------------------------------------------------------ public queries
    @property
    def sensitivity(self) -> float:
        """Total sensitivity ``S = sqrt(sum_k R_k^2)`` of one sample's clipped gradient."""
        self._require_grouping()
        return sensitivity(self.thresholds)

    def set_thresholds(self, thresholds: Mapping[str, float]) -> None:
        """Replace the per-group thresholds (used by adaptive clipping); every group must be given."""
        self._require_grouping()
        self.thresholds = resolve_thresholds(list(self.grouping.groups), thresholds)

    def resolve_grouping(self, *args: Any, **kwargs: Any) -> ResolvedGrouping:
        """Resolve an execution-order grouping (``int`` M) by one recorded forward pass on example inputs."""
        if self.grouping is None:
            if not self.attached:
                raise AttachError("Attach the engine before resolving an execution-order grouping.")
            with torch.enable_grad():
                self.model(*args, **kwargs)
        return self.grouping

    def add_report_hook(self, fn: Callable[[ClipReport], None]) -> RemovableHandle:
        """Call ``fn(report)`` after every backward pass whose clipped sums were written; returns a handle."""
        handle = RemovableHandle(self._report_hooks)
        self._report_hooks[handle.id] = fn
        return handle

    def describe(self) -> str:
        """The resolved grouping with thresholds, and which rule handles each module."""
        if self.grouping is None:
            return f"grouping {self.grouping_spec!r}: resolved at the first forward pass (execution order)"
        lines = [self.grouping.describe(self.model, self.thresholds), f"sensitivity S = {self.sensitivity:.6g}"]
        lines.append("modules:")
        for entry in module_entries(self.model):
            kind = entry.rule.contributions.__name__ if entry.rule is not None else "generic torch.func fallback"
            lines.append(f"  {entry.describe()}: {kind}")
        return "\n".join(lines)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Record nothing while inside (e.g. a pipeline stage's shape-inference run of the module)."""
        self.suspended_count += 1
        try:
            yield
        finally:
            self.suspended_count -= 1

    # ------------------------------------------------------------------ deferred clipping (pipeline stages)
    @property
    def deferred_passes(self) -> int:
        """Finished passes waiting for :meth:`clip_deferred` (``defer_clipping=True``)."""
        return len(self.deferred)

    def deferred_squared_norms(self) -> Tensor:
        """Squared per-sample norms of the deferred passes, flat: pass by pass (in forward order), group by group
        (in grouping order), ``[B]`` each."""
        self.deferred.sort(key=lambda state: state.sequence)
        parts = [state.squared_norms().reshape(-1) for state in self.deferred]
        return torch.cat(parts) if parts else torch.zeros(0)

    def clip_deferred(self, combine: Callable[[Tensor], Tensor] | None = None) -> None:
        """Clip every deferred pass with ``combine(deferred_squared_norms())`` (e.g. summed over pipeline stages).

        Raises:
            NonFiniteNormError: (unless ``defer_nonfinite_error``) some pass had non-finite norms.
        """
        local = self.deferred_squared_norms()
        flat = combine(local) if combine is not None else local
        if flat.shape != local.shape:
            raise PassError(f"clip_deferred: combine gave shape {tuple(flat.shape)}, expected {tuple(local.shape)}.")
        states, self.deferred = self.deferred, []
        offset, error = 0, None
        for state in states:
            size = state.sq.numel()
            try:
                state.clip_with(flat[offset : offset + size].view(state.sq.shape))
            except Exception as err:  # a refused pass; the others are still written
                error = error or err
            offset += size
        if error is not None:
            raise error

    # ------------------------------------------------------------------ used by capture, taps and states
    def clip_factors(
        self, sq: Tensor, rows: slice | Tensor, out: Tensor | None = None, column: Tensor | None = None
    ) -> Tensor:
        """Factors ``[m, B]`` for squared norms ``sq`` of the groups ``rows`` (a slice, or row indices for a
        clip function with a proven bound), in units of each one's threshold (``column``: :meth:`threshold_column`
        if the caller has it)."""
        fn = self.clip_fn
        if fn.normalized is not None:
            if fn.needs_thresholds:
                column = (column if column is not None else self.threshold_column())[rows]
            factors = fn.normalized(sq, column, out)
            if not fn.bound_proven:  # a user's fast form is checked like any user function: C * ||g|| / R <= 1
                scaled = factors * sq.clamp_min(0).sqrt()
                if not bool((scaled <= 1 + 1e-5)[torch.isfinite(scaled)].all()):
                    names = self.plan.groups[rows]
                    raise ValueError(
                        f"Clip function {fn.name!r} broke its bound on group(s) {names}: C * ||g|| exceeds R; a clip "
                        "function must return factors with C * norm <= R."
                    )
            return factors
        factors = []
        for k, row in enumerate(range(rows.start, rows.stop)):
            threshold = self.thresholds[self.plan.groups[row]]
            norms = sq[k].clamp_min(0).sqrt() * threshold
            c = fn(norms, threshold)
            finite = torch.isfinite(norms)
            if not fn.bound_proven and not bool((c * norms <= threshold * (1 + 1e-5) + 1e-12)[finite].all()):
                raise ValueError(
                    f"Clip function broke its bound on group {self.plan.groups[row]!r}: C * ||g|| exceeds R = "
                    f"{threshold}; a clip function must return factors with C * norm <= R."
                )
            factors.append(c)
        stacked = torch.stack(factors).to(sq.dtype)
        if out is not None:
            out.copy_(stacked)
            return out
        return stacked

    def threshold_column(self) -> Tensor:
        """``[groups, 1]`` thresholds on the norm device, made once per set of thresholds."""
        key = (id(self.plan), tuple(self.thresholds.items()))
        if self._column_key != key:
            self._column = self.plan.threshold_column(self.thresholds)
            self._column_key = key
        return self._column

    def report(self, report: ClipReport) -> None:
        self.last_report = report
        for hook in list(self._report_hooks.values()):
            hook(report)

    def mode_for(self, path: str) -> NormMode:
        return self.settings.mode_for(path)

    def begin_compute(self) -> None:
        """Module hooks and the tracker are inert while the engine computes (the generic fallback re-runs modules),
        until the matching :meth:`end_compute` (call it in a ``finally``)."""
        self.suspended_count += 1
        self.tracker.paused += 1

    def end_compute(self) -> None:
        self.suspended_count -= 1
        self.tracker.paused -= 1

    def tracker_paused(self):
        """The engine's own tensor work in hooks and taps bypasses the tracker (no torch-function dispatch)."""
        return torch._C.DisableTorchFunction()

    def parameter_name(self, param: nn.Parameter) -> str:
        return self._names.get(id(param), "<parameter>")

    def check_before_forward(self) -> None:
        for path, bn in self._batchnorms:
            if bn.training:
                raise UnsupportedModuleError(batchnorm_message(path, bn))
        self._check_unchanged()

    def batch_inputs(self, args: tuple, kwargs: dict) -> tuple[int | None, list[Tensor]]:
        return self.settings.batch_inputs(args, kwargs)

    def _set_grouping(self, grouping: ResolvedGrouping) -> None:
        self.grouping = grouping
        self.thresholds = resolve_thresholds(list(grouping.groups), self.max_grad_norm)
        self.plan = Plan(grouping, self._trainable())
        self.plan.grad_scale = lambda: self.grad_scale() if self.grad_scale is not None else 1.0

    def _require_grouping(self) -> None:
        if self.grouping is None:
            raise AttachError(
                "The grouping is resolved at the first forward pass (int grouping); run one forward "
                "pass or engine.resolve_grouping(*example_inputs) first."
            )


@contextlib.contextmanager
def attached(engine: ClippingEngine) -> Iterator[ClippingEngine]:
    """``with attached(engine):`` -- attach, and detach in ``finally``."""
    engine.attach()
    try:
        yield engine
    finally:
        engine.detach()
