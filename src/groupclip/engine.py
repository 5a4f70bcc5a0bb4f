"""The clipping engine: exact group-wise per-sample clipping inside the one ordinary backward pass.

How it works (Book-Keeping, MATH.md §3):

* every module that owns trainable parameters gets a forward pre-hook and a forward hook. While the module runs,
  its trainable parameters are switched to ``requires_grad=False``, so autograd builds no weight-gradient work at
  all; the module's input is kept (autograd would have kept it for the weight gradient anyway);
* a gradient hook on the module's output receives ``dL/d output`` during the ordinary backward pass; the layer's
  rule (:mod:`groupclip.norms`) turns it into per-sample norms and, once the group is complete, into the clipped
  sum ``sum_i C_ik G_ik`` -- one ordinary weight-gradient product with re-weighted output gradients;
* a group is clipped, and its kept tensors released, the moment the backward pass has finished every use of every
  parameter in it, in the order the pass actually runs;
* at the end of the backward pass the clipped sums are added to ``param.grad`` (accumulating like autograd does),
  unless some per-sample norm was not finite, in which case nothing is written and
  :class:`~groupclip.errors.NonFiniteNormError` is raised.

Loss convention: ``loss_reduction="mean"`` means the loss you call ``backward`` on is
``(1/B) * sum_i l_i``; ``"sum"`` means ``sum_i l_i``. Either way norms and clipped sums are those of the
per-sample losses ``l_i`` (a mean-reduced loss' gradients are multiplied by B).

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
import fnmatch
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from .bookkeeping import ClipReport, MemoryLedger, PassState, Use
from .clipping import ClipFunction, get_clip_function, resolve_thresholds, sensitivity
from .errors import (
    AttachError,
    BatchDimensionError,
    NonFiniteNormError,
    PassError,
    UnattributedGradientError,
    UnsupportedModuleError,
)
from .grouping import (
    GroupingSpec,
    ResolvedGrouping,
    needs_execution_order,
    resolve_grouping,
    trainable_parameters,
)
from .norms import Factored, Instantiated, find_rule, generic_contributions, register_transformers_layers
from .norms.generic import RandomState

NormMode = Literal["auto", "ghost", "instantiate"]
LossReduction = Literal["mean", "sum"]

_ENGINES: weakref.WeakKeyDictionary[nn.Module, ClippingEngine] = weakref.WeakKeyDictionary()

_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm,)
_SEQUENCE_FIRST = (nn.MultiheadAttention, nn.RNNBase)


class _Frame:
    """One active call of a hooked module (between its pre-hook and its hook)."""

    __slots__ = ("canonical", "disabled", "fired", "names", "random_state")

    def __init__(self) -> None:
        self.disabled: list[nn.Parameter] = []
        self.canonical: dict[int, nn.Parameter] = {}  # id(swapped-in tensor) -> the attach-time parameter
        self.names: dict[int, str] = {}  # id(tensor in a slot at the pre-hook) -> its name relative to the module
        self.fired: set[int] = set()
        self.random_state: RandomState | None = None

    def canon(self, p: nn.Parameter) -> nn.Parameter:
        return self.canonical.get(id(p), p)


class ClippingEngine:
    """Attach to a model; every backward pass then leaves clipped per-sample gradient sums in ``param.grad``.

    Args:
        model: any ``nn.Module`` whose inputs and outputs have the batch as leading dimension.
        grouping: how parameters are grouped for clipping (see :mod:`groupclip.grouping`).
        max_grad_norm: total threshold R (each of M groups gets ``R / sqrt(M)``), or ``{group: R_k}``.
        clip_fn: ``"abadi"``, ``"automatic"``, another registered name, or a
            :class:`~groupclip.clipping.ClipFunction`.
        clip_options: options of the clip function factory, e.g. ``{"gamma": 0.05}`` for ``"automatic"``.
        loss_reduction: ``"mean"`` if the loss is the mean of per-sample losses over the batch, ``"sum"`` if it
            is their sum.
        norm_mode: ``"auto"`` (per layer, ghost norm iff ``2 T^2 < p d``), ``"ghost"`` or ``"instantiate"``; or a
            mapping ``{module path glob: mode}`` overriding chosen layers (others stay ``"auto"``), e.g.
            ``{"lm_head": "ghost", "*.conv*": "instantiate"}``.

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
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Expected loss_reduction={loss_reduction!r} in ('mean', 'sum').")
        modes = norm_mode.values() if isinstance(norm_mode, Mapping) else [norm_mode]
        for mode in modes:
            if mode not in ("auto", "ghost", "instantiate"):
                raise ValueError(f"Expected norm_mode={mode!r} in ('auto', 'ghost', 'instantiate').")
        self.model = model
        self.grouping_spec = grouping
        self.max_grad_norm = max_grad_norm
        self.clip_fn = get_clip_function(clip_fn, **dict(clip_options or {}))
        self.loss_reduction = loss_reduction
        self.norm_mode = norm_mode
        self.grouping: ResolvedGrouping | None = None
        self.thresholds: dict[str, float] = {}
        self.last_report: ClipReport | None = None
        self.peak_held_bytes = 0
        self.nonfinite_passes = 0  # backward passes refused for non-finite norms (nothing written)
        # True: such a pass writes nothing and raises nothing (the caller checks nonfinite_passes; data parallel
        # training raises at optimizer.step() on every rank together instead of in one rank's backward).
        self.defer_nonfinite_error = False
        # Parameter swapping wrappers (FSDP2, groupclip.distributed.sharded). parameter_alias(p) maps a tensor a
        # wrapper put into a parameter's slot (FSDP2's unsharded parameter) to the parameter the slot held at
        # attach (the sharded one), which keys groups and clipped sums. grad_sink, if set, receives every finished
        # pass' clipped sums [(attach-time parameter, full-shape sum)] -- or None for a pass refused for
        # non-finite norms -- instead of their being added to .grad; it returns whether the pass started a new
        # logical batch (ClipReport.started_fresh).
        self.parameter_alias: Callable[[nn.Parameter], nn.Parameter] | None = None
        self.grad_sink: Callable[[list[tuple[nn.Parameter, Tensor]] | None], bool] | None = None
        # Called with the module before the generic fallback re-runs it in the backward pass (which reads the
        # module's parameters): FSDP2 all-gathers them again if it resharded them (groupclip.distributed.sharded).
        self.before_generic_rerun: Callable[[nn.Module], None] | None = None
        # Pipeline parallelism (groupclip.distributed.pipeline). concurrent_passes: several forward passes
        # (microbatches) may await their backward at once, each backward finishing its own pass. defer_clipping: a
        # finished pass is kept, not clipped, until clip_deferred() gets the per-sample norms summed over processes
        # (a group spanning pipeline stages). _ledger sums the bytes held by all such passes together.
        self.concurrent_passes = False
        self.defer_clipping = False
        self._live: weakref.WeakSet[PassState] = weakref.WeakSet()
        self._deferred: list[PassState] = []
        self._ledger = MemoryLedger()
        self._passes_started = 0
        self._report_hooks: OrderedDict[int, Callable[[ClipReport], None]] = OrderedDict()
        self._handles: list[Any] = []
        self._pass: PassState | None = None
        self._frames: dict[int, list[_Frame]] = {}
        self._active_generic: list[_Frame] = []
        self._disabled_count: dict[int, int] = {}
        self._suspended = 0
        self._anchor: Tensor | None = None
        self._attached = False
        if not needs_execution_order(grouping):
            self._set_grouping(resolve_grouping(model, grouping))

    # ------------------------------------------------------------------ lifetime
    def attach(self) -> ClippingEngine:
        """Install the hooks. All checks run first, so a refused attach changes nothing."""
        if self._attached:
            raise AttachError("This ClippingEngine is already attached; call detach() before attaching again.")
        for owner, engine in list(_ENGINES.items()):
            overlaps = any(m is owner for m in self.model.modules()) or any(m is self.model for m in owner.modules())
            if engine is not self and overlaps:
                raise AttachError(
                    f"{type(owner).__name__} already has a ClippingEngine attached; detach it first "
                    "(two engines on one model would each clip the same gradients)."
                )
        register_transformers_layers()
        sharded = _dtensor_names(trainable_parameters(self.model))
        if sharded and self.grad_sink is None:
            raise AttachError(
                f"Parameters {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are DTensors (FSDP2 fully_shard or "
                "tensor parallel): a ClippingEngine alone would write full-shape clipped sums into sharded gradients. "
                "For a fully_shard-ed model use groupclip.distributed.sharded.make_private_sharded."
            )
        if not needs_execution_order(self.grouping_spec):
            current = resolve_grouping(self.model, self.grouping_spec)  # the trainable set as of now
            if self.grouping is None or current.groups != self.grouping.groups:
                self._set_grouping(current)  # changed since construction: thresholds from max_grad_norm again
        elif self.grouping is not None and self._snapshot() != self._attached_snapshot:
            self.grouping = None
        plan = self._plan_modules()  # raises before any hook exists
        self._anchor = torch.zeros((), requires_grad=True)
        try:
            self._install(plan)
        except BaseException:
            self._remove_hooks()
            raise
        self._attached = True
        self._attached_snapshot = self._snapshot()
        self._params_by_id = {id(p): p for p in self._trainable().values()}
        _ENGINES[self.model] = self
        return self

    def _snapshot(self) -> tuple:
        """Identity of the model's structure as the hooks saw it: modules and trainable parameters."""
        return (
            tuple(id(m) for m in self.model.modules()),
            tuple((name, id(p)) for name, p in self._trainable().items()),
        )

    def _trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by canonical name, each as the attach-time parameter (see ``parameter_alias``)."""
        params = trainable_parameters(self.model)
        if self.parameter_alias is None:
            return params
        return {name: self.parameter_alias(p) for name, p in params.items()}

    def _check_unchanged(self) -> None:
        if self._snapshot() != self._attached_snapshot:
            raise AttachError(
                "The model changed while the engine was attached (a parameter was frozen/unfrozen or replaced, or a "
                "module was replaced); the hooks and groups no longer match it. Call engine.detach() and "
                "engine.attach() after changing the model."
            )

    def detach(self) -> None:
        """Remove every hook and all per-pass state; the model is exactly as before :meth:`attach`."""
        try:
            self._remove_hooks()
        finally:
            for frames in self._frames.values():
                for frame in frames:
                    self._enable(frame.disabled)
            self._frames.clear()
            self._active_generic.clear()
            self._pass = None
            self._live.clear()
            self._deferred.clear()
            self._ledger = MemoryLedger()
            self._attached = False
            if _ENGINES.get(self.model) is self:
                del _ENGINES[self.model]

    def __enter__(self) -> ClippingEngine:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._attached

    def add_report_hook(self, fn: Callable[[ClipReport], None]) -> RemovableHandle:
        """Call ``fn(report)`` after every backward pass whose clipped sums were written; returns a handle."""
        handle = RemovableHandle(self._report_hooks)
        self._report_hooks[handle.id] = fn
        return handle

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Record nothing while inside (e.g. a pipeline stage's shape-inference run of the module).

        The module then runs as without the engine; its parameters must get no gradient from such a run.
        """
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    # ------------------------------------------------------------------ deferred clipping (pipeline stages)
    @property
    def deferred_passes(self) -> int:
        """Finished passes waiting for :meth:`clip_deferred` (``defer_clipping=True``)."""
        return len(self._deferred)

    def deferred_squared_norms(self) -> Tensor:
        """This process' squared per-sample norms of the deferred passes, flat: pass by pass (in forward order),
        group by group (in grouping order), ``[B]`` each."""
        self._deferred.sort(key=lambda state: state.sequence)
        parts = [state.squared_norms(g) for state in self._deferred for g in self.thresholds]
        if not parts:
            return torch.zeros(0)
        dtype = parts[0].dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        return torch.cat([part.to(dtype) for part in parts])

    def clip_deferred(self, combine: Callable[[Tensor], Tensor] | None = None) -> None:
        """Clip every deferred pass: write its clipped sums and emit its report, as at the end of a backward.

        Args:
            combine: maps :meth:`deferred_squared_norms` to the squared norms to clip with -- e.g. an all-reduce
                (SUM) over the pipeline stages, each holding a part of every group. ``None``: this process' own.

        Raises:
            NonFiniteNormError: (unless ``defer_nonfinite_error``) some pass had non-finite norms; the finite passes
                were written.
        """
        local = self.deferred_squared_norms()
        flat = combine(local) if combine is not None else local
        if flat.shape != local.shape:
            raise PassError(f"clip_deferred: combine gave shape {tuple(flat.shape)}, expected {tuple(local.shape)}.")
        passes, self._deferred = self._deferred, []
        offset, error = 0, None
        for state in passes:
            norms = {}
            for g in self.thresholds:
                n = state.batch_size or 0
                norms[g], offset = flat[offset : offset + n], offset + n
            try:
                self._finish(state, norms)
            except NonFiniteNormError as err:
                error = error or err
        if error is not None:
            raise error

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
            if not self._attached:
                raise AttachError("Attach the engine before resolving an execution-order grouping.")
            with torch.enable_grad():
                self.model(*args, **kwargs)
            self._pass = None
        return self.grouping

    def describe(self) -> str:
        """The resolved grouping with thresholds, and which rule handles each module."""
        if self.grouping is None:
            return f"grouping {self.grouping_spec!r}: resolved at the first forward pass (execution order)"
        lines = [self.grouping.describe(self.model, self.thresholds), f"sensitivity S = {self.sensitivity:.6g}"]
        lines.append("modules:")
        for path, module, rule in self._plan_modules():
            kind = rule.contributions.__name__ if rule is not None else "generic torch.func fallback"
            lines.append(f"  {path or '<root>'} ({type(module).__name__}): {kind}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ setup helpers
    def _set_grouping(self, grouping: ResolvedGrouping) -> None:
        params = self._trainable()
        self.grouping = grouping
        self.thresholds = resolve_thresholds(list(grouping.groups), self.max_grad_norm)
        self._group_of = {id(params[n]): g for g, names in grouping.groups.items() for n in names}
        self._group_members = {g: [id(params[n]) for n in names] for g, names in grouping.groups.items()}

    def _require_grouping(self) -> None:
        if self.grouping is None:
            raise AttachError(
                "The grouping is resolved at the first forward pass (int grouping); run one forward "
                "pass or engine.resolve_grouping(*example_inputs) first."
            )

    def _plan_modules(self):
        plan = []
        for path, module in self.model.named_modules():
            if isinstance(module, _BATCH_MIXING) and module.training:
                raise UnsupportedModuleError(_batchnorm_message(path, module))
            own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
            if not own:
                continue
            rule = find_rule(module)
            if rule is not None and rule.check is not None:
                rule.check(module, path)
            if rule is None and isinstance(module, _SEQUENCE_FIRST) and not getattr(module, "batch_first", False):
                raise UnsupportedModuleError(
                    f"{path} ({type(module).__name__}) takes sequence-first inputs (batch_first=False), so dim 0 "
                    "is not the batch. Construct it with batch_first=True."
                )
            plan.append((path, module, rule))
        return plan

    def _install(self, plan) -> None:
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True))
        for path, module, rule in plan:
            self._handles.append(module.register_forward_pre_hook(self._make_pre(module, rule)))
            self._handles.append(
                module.register_forward_hook(self._make_post(path, module, rule), with_kwargs=True, always_call=True)
            )
        self._handles.append(root.register_forward_hook(self._root_post, with_kwargs=True, always_call=True))
        owners: dict[int, list[str]] = {}
        for path, module, _ in plan:
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    owners.setdefault(id(p), []).append(f"{path}.{name}" if path else name)
        for name, p in trainable_parameters(self.model).items():
            self._handles.append(p.register_hook(self._make_leak_check(name, owners.get(id(p), []))))
        self._batchnorms = [(path, m) for path, m in self.model.named_modules() if isinstance(m, _BATCH_MIXING)]

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # ------------------------------------------------------------------ requires_grad switching
    def _disable(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        switched = []
        for p in params:
            count = self._disabled_count.get(id(p), 0)
            if count == 0:
                if not p.requires_grad:
                    continue
                p.requires_grad_(False)
            self._disabled_count[id(p)] = count + 1
            switched.append(p)
        return switched

    def _enable(self, params: list[nn.Parameter]) -> None:
        for p in params:
            count = self._disabled_count.get(id(p), 0) - 1
            if count <= 0:
                self._disabled_count.pop(id(p), None)
                p.requires_grad_(True)
            else:
                self._disabled_count[id(p)] = count

    # ------------------------------------------------------------------ hooks
    def _recording(self) -> bool:
        return (
            self._pass is not None and not self._pass.forward_done and not self._suspended and torch.is_grad_enabled()
        )

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._suspended:
            return
        if not torch.is_grad_enabled():
            return  # records nothing, and leaves a pending pass for its backward
        if torch._C._current_graph_task_id() != -1:
            raise PassError(
                "The model's forward ran inside a backward pass (activation checkpointing re-runs forward during "
                "backward); groupclip does not support it yet. Disable gradient checkpointing."
            )
        for path, bn in self._batchnorms:
            if bn.training:
                raise UnsupportedModuleError(_batchnorm_message(path, bn))
        self._check_unchanged()
        batch = _batch_size(args, kwargs)
        scale = float(batch) if (self.loss_reduction == "mean" and batch) else 1.0
        several = self.concurrent_passes or self.defer_clipping
        self._pass = PassState(batch, scale, self._ledger if several else None)
        self._pass.sequence = self._passes_started = self._passes_started + 1
        if self.concurrent_passes:
            self._live.add(self._pass)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._pass
        if self._suspended or state is None or state.forward_done:
            return
        if output is None:  # the forward raised; always_call=True brought us here
            self._live.discard(state)
            self._pass = None
            return
        if self.grouping is None:
            names = {id(p): n for n, p in self._trainable().items()}
            self._set_grouping(
                resolve_grouping(self.model, self.grouping_spec, [names[i] for i in state.order if i in names])
            )
        state.close_forward(self._group_of, self._group_members)

    def _make_pre(self, module: nn.Module, rule):
        # Slots (owner, name), read at each call: a wrapper may swap the tensor in a slot (FSDP2 puts its unsharded
        # parameter there while the module runs); what the slot holds is switched off and recorded under the
        # attach-time parameter.
        owners = [module]
        if rule is None:
            owners += [m for child in _uncalled_children(module) for m in child.modules()]
        prefix = {id(m): f"{path}." if path else "" for path, m in module.named_modules()}
        slots = [
            (owner, name, prefix[id(owner)] + name, p)
            for owner in owners
            for name, p in owner._parameters.items()
            if p is not None and p.requires_grad
        ]

        def pre(mod: nn.Module, args: tuple) -> None:
            if not self._recording():
                if self._pass is not None and not self._suspended and torch._C._current_graph_task_id() != -1:
                    raise PassError(
                        f"{mod.__class__.__name__} ran forward inside the backward pass (activation checkpointing); "
                        "groupclip does not support it yet. Disable gradient checkpointing."
                    )
                return
            frame = _Frame()
            current = []
            for owner, name, local_name, canonical in slots:
                p = owner._parameters.get(name)
                if p is not None:
                    current.append(p)
                    frame.names.setdefault(id(p), local_name)
                    if p is not canonical:
                        frame.canonical[id(p)] = canonical
            frame.disabled = self._disable(current)
            if rule is None:
                frame.random_state = RandomState.capture(_tensor_leaves((args,)))
                self._active_generic.append(frame)
            self._frames.setdefault(id(mod), []).append(frame)

        return pre

    def _make_post(self, path: str, module: nn.Module, rule):
        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            frames = self._frames.get(id(mod))
            if not frames or self._suspended:
                return None
            frame = frames.pop()
            try:
                if rule is None:
                    self._active_generic.remove(frame)
                for outer in self._active_generic:
                    outer.fired.add(id(mod))
                state = self._pass
                if output is None or state is None:
                    return None
                if state.batch_size is None:
                    raise BatchDimensionError(
                        f"{path} ({type(mod).__name__}) ran, but the batch size could not be "
                        "read from the model's inputs (no tensor argument)."
                    )
                # Outputs are made grad-ready while the parameters are still switched off, so an output that is
                # (a view of) an own parameter is tapped rather than mistaken for a graph leaf.
                if rule is not None:
                    return self._record_rule_use(state, path, mod, rule, frame, args, kwargs, output)
                return self._record_generic_use(state, path, mod, frame, args, kwargs, output)
            finally:
                self._enable(frame.disabled)

        return post

    def _record_rule_use(self, state, path, mod, rule, frame, args, kwargs, output):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"{path} ({type(mod).__name__}) was called without a tensor input or "
                "returned a non-tensor; its rule needs input and output tensors."
            )
        batch = state.batch_size
        broadcast = _check_lead(path, mod, x, batch, "input") and _check_lead(path, mod, output, batch, "output")
        # Keep only detached views (they share the version counter): holding graph-attached tensors would close a
        # reference cycle through autograd's C++ graph (tensor -> grad_fn -> our output hook -> pass state).
        x = x.detach()
        activation = x.expand(batch, *x.shape[1:]) if broadcast else x
        state.ledger.add_activation(x)
        # Names as of the pre-hook: a wrapper may already have swapped the slots back (FSDP2 reshards in its own
        # forward hook).
        params = {frame.names[id(p)]: frame.canon(p) for p in frame.disabled}
        wanted = frozenset(params)
        use = Use(len(state.uses), path, mod, params, saved_versions=[(x, x._version)])
        use.compute = lambda grads: rule.contributions(mod, activation, grads[0], wanted)
        if rule.right_is_input:
            use.shared_input = id(x)
            state.input_readers[id(x)] = state.input_readers.get(id(x), 0) + 1
        state.record_use(use)
        out = self._grad_ready(output, batch, broadcast)
        self._tap(state, use, [out])
        return out if out is not output else None

    def _record_generic_use(self, state, path, mod, frame, args, kwargs, output):
        batch = state.batch_size
        leaves, spec = tree_flatten(output)
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
        batch_dims = _output_batch_dims(mod, len(positions))
        broadcast, tapped = [], []
        for i, dim in zip(positions, batch_dims, strict=True):
            leaf = leaves[i]
            if dim == 0:
                was_broadcast = _check_lead(path, mod, leaf, batch, f"output #{i}")
            elif leaf.dim() > dim and leaf.shape[dim] == batch:
                was_broadcast = False
            else:
                raise BatchDimensionError(
                    f"{path} ({type(mod).__name__}): output #{i} has shape {tuple(leaf.shape)}, expected the batch "
                    f"size {batch} on dim {dim}."
                )
            leaves[i] = self._grad_ready(leaf, batch, was_broadcast)
            broadcast.append(was_broadcast)
            tapped.append(leaves[i])
        if not tapped:
            raise UnsupportedModuleError(
                f"{path} ({type(mod).__name__}) owns trainable parameters but returned no "
                "floating-point tensor, so no gradient can reach them."
            )
        covered = _fired_prefixes(mod, frame.fired)
        params = {}
        for p in frame.disabled:  # named as at the pre-hook (see _record_rule_use)
            name = frame.names[id(p)]
            owner = name.rpartition(".")[0]
            if name not in params and not any(owner == c or owner.startswith(c + ".") for c in covered):
                params[name] = frame.canon(p)
        args, kwargs = _detached((args, kwargs))  # see _record_rule_use: no references into the autograd graph
        for t in _tensor_leaves((args, kwargs)):
            state.ledger.add_activation(t)
        use = Use(
            len(state.uses), path, mod, params, saved_versions=[(t, t._version) for t in _tensor_leaves((args, kwargs))]
        )
        shapes = [(t.shape, t.dtype, t.device) for t in tapped]
        random_state, names = frame.random_state, frozenset(params)

        def compute(grads: list[Tensor | None]) -> dict:
            grads = [
                g if g is not None else torch.zeros(s, dtype=d, device=dev)
                for g, (s, d, dev) in zip(grads, shapes, strict=True)
            ]
            if self.before_generic_rerun is not None:
                self.before_generic_rerun(mod)
            return generic_contributions(
                mod, args, kwargs, random_state, positions, grads, broadcast, names, batch, batch_dims
            )

        use.compute = compute
        state.record_use(use)
        self._tap(state, use, tapped)
        return (
            tree_unflatten(leaves, spec)
            if any(a is not b for a, b in zip(leaves, tree_flatten(output)[0], strict=True))
            else None
        )

    def _grad_ready(self, output: Tensor, batch: int, broadcast: bool) -> Tensor:
        """The output to hand on: expanded to the batch if it was broadcast, and requiring grad."""
        if broadcast:
            return output.expand(batch, *output.shape[1:]) + self._anchor
        if not output.requires_grad:
            return output + self._anchor
        return output

    def _tap(self, state: PassState, use: Use, tensors: list[Tensor]) -> None:
        if len(tensors) == 1:
            tensors[0].register_hook(lambda g: self._on_grad(state, use, [g]))
        else:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda grads: self._on_grad(state, use, list(grads)), mode="all"
            )

    def _on_grad(self, state: PassState, use: Use, grads: list[Tensor | None]) -> None:
        if state.finished:
            raise PassError(
                f"Backward ran twice through {use.path} for one forward pass (retain_graph=True?); groupclip "
                "clips once per forward pass. Run a new forward pass before each backward."
            )
        if not self._attached:
            raise PassError(f"Backward reached {use.path} after the engine was detached; nothing was clipped.")
        if state is not self._pass and state not in self._live:
            raise PassError(
                f"Backward reached {use.path} from a forward pass that a later forward pass "
                "superseded; call backward on the loss of the latest forward pass."
            )
        if use.done:
            raise PassError(
                f"Backward ran twice through {use.path} for one forward pass (retain_graph=True?); "
                "groupclip clips once per forward pass."
            )
        if not state.forward_done:
            raise PassError("Backward started before the model's forward pass returned.")
        if not state.backward_started:
            state.backward_started = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._finish(state))
        for tensor, version in use.saved_versions:
            if tensor._version != version:
                raise PassError(
                    f"An input of {use.path} ({type(use.module).__name__}) was modified in place after "
                    "the module used it; its per-sample gradient would be wrong. Avoid the in-place "
                    "operation (e.g. use x = x + y instead of x += y)."
                )
        self._suspended += 1
        try:
            contributions = use.compute(grads) if state.batch_size else {}
        finally:
            self._suspended -= 1
        use.compute = None
        use.saved_versions = []
        mode = self._mode_for(use.path)
        contributions = {name: self._shape_for_norm(c, mode) for name, c in contributions.items()}
        if use.shared_input is not None:
            factored = [c for c in contributions.values() if isinstance(c, Factored) and c.left.shape[2] == 1]
            if factored and factored[0].steps > 1:
                state.shared_gram(use.shared_input, factored[0])
        for group in state.use_done(use, contributions):
            if not self.defer_clipping:
                state.clip_group(group, self.thresholds[group], self.clip_fn)

    def _mode_for(self, path: str) -> NormMode:
        if not isinstance(self.norm_mode, Mapping):
            return self.norm_mode
        for pattern, mode in self.norm_mode.items():
            if fnmatch.fnmatchcase(path, pattern):
                return mode
        return "auto"

    @staticmethod
    def _shape_for_norm(contribution, mode: NormMode):
        """Apply the norm mode: keep factors for the ghost norm, or instantiate per-sample gradients now."""
        if isinstance(contribution, Instantiated) or mode == "ghost":
            return contribution
        if mode == "instantiate":
            return contribution.instantiate()
        steps = contribution.steps
        if isinstance(contribution, Factored):
            rows, cols = contribution.left.shape[-1], contribution.right.shape[-1]
        else:
            rows, cols = contribution.param_shape
        return contribution if 2 * steps * steps < rows * cols else contribution.instantiate()

    def _finish(self, state: PassState, squared_norms: Mapping[str, Tensor] | None = None) -> None:
        """End of a pass' backward (queued callback); or, with ``squared_norms``, clipping of a deferred pass."""
        if squared_norms is None:
            if state is not self._pass and state not in self._live:
                return
            if state is self._pass:
                self._pass = None
            self._live.discard(state)
            state.finished = True
            for use in state.uses:
                use.compute, use.saved_versions = None, []
                if not use.done:
                    state.use_done(use, {})
            if self.defer_clipping:  # clip_deferred() clips it with the norms summed over the stages
                self._deferred.append(state)
                self.peak_held_bytes = max(self.peak_held_bytes, self._ledger.peak_held_bytes)
                if self._anchor is not None:
                    self._anchor.grad = None
                return
        for group in state.pending_groups():
            norms = squared_norms.get(group) if squared_norms is not None else None
            state.clip_group(group, self.thresholds[group], self.clip_fn, norms)
        self.peak_held_bytes = max(self.peak_held_bytes, state.ledger.peak_held_bytes, self._ledger.peak_held_bytes)
        if self._anchor is not None:
            self._anchor.grad = None
        if state.non_finite:
            self.nonfinite_passes += 1
            if self.grad_sink is not None:  # a collective sink must hear of every pass, refused ones too
                self.grad_sink(None)
            if self.defer_nonfinite_error:  # data parallel: every rank refuses the step together at step()
                return
            detail = "; ".join(f"group {g!r}: samples {idx}" for g, idx in state.non_finite.items())
            raise NonFiniteNormError(
                f"Non-finite per-sample gradient norms ({detail}); no gradient was written. "
                "Check the loss and inputs of those samples (NaN/inf) or lower the lr."
            )
        params = self._params_by_id  # the model is checked unchanged at every forward while attached
        if self.grad_sink is not None:
            started_fresh = self.grad_sink([(params[key], clipped) for key, clipped in state.staged.items()])
        else:
            started_fresh = all(p.grad is None for p in params.values())
            for key, clipped in state.staged.items():
                p = params[key]
                clipped = clipped.to(p.dtype)
                if p.grad is None:
                    p.grad = clipped
                else:
                    p.grad.add_(clipped)
        self.last_report = state.report(self.thresholds, started_fresh)
        for hook in list(self._report_hooks.values()):
            hook(self.last_report)

    def _make_leak_check(self, name: str, owners: list[str]):
        def check(grad: Tensor) -> None:
            if self._suspended:
                return
            where = ", ".join(owners) if owners else "no module"
            raise UnattributedGradientError(
                f"Parameter {name!r} received an ordinary, batch-summed gradient, so its per-sample gradients are "
                f"unknown. It was used outside a recorded forward call of the module(s) that own it ({where}): "
                "either a submodule was called directly rather than through the model the engine is attached to, "
                "or another module or a loss term used the parameter. Call the model itself, use the parameter "
                "through a call of its module (share the module, e.g. an nn.Linear tied to an embedding), and move "
                "penalty terms on parameters (weight decay) into the optimizer."
            )

        return check


# ---------------------------------------------------------------------- small helpers
def _batchnorm_message(path: str, module: nn.Module) -> str:
    return (
        f"{path or '<root>'} ({type(module).__name__}) is in training mode: batch statistics mix samples, so "
        "per-sample gradients are not defined. Replace it with GroupNorm "
        "(groupclip.replace_batchnorm(model)), or freeze it and call .eval() on it."
    )


def _dtensor_names(params: Mapping[str, nn.Parameter]) -> list[str]:
    """Names of the parameters that are DTensors (none unless torch.distributed.tensor was imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return [name for name, p in params.items() if dtensor is not None and isinstance(p, dtensor)]


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _detached(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t.detach() if isinstance(t, Tensor) else t for t in leaves], spec)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for t in _tensor_leaves((args, kwargs)):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _check_lead(path: str, module: nn.Module, t: Tensor, batch: int, what: str) -> bool:
    """Validate the leading (batch) dim; returns True if it is a broadcast dim of size 1."""
    lead = t.shape[0] if t.dim() else None
    if lead == batch:
        return False
    if lead == 1:
        return True
    raise BatchDimensionError(
        f"{path} ({type(module).__name__}): its {what} has shape {tuple(t.shape)}, whose leading dimension is not "
        f"the batch size {batch} (nor 1, a broadcast). groupclip needs the batch as dim 0 of every layer's input "
        "and output: avoid reshaping the batch into other dims (e.g. [B*T, d]) before a layer with parameters."
    )


def _uncalled_children(module: nn.Module) -> list[nn.Module]:
    """Children whose parameters a known module uses without calling the child (so the parent accounts for them)."""
    if isinstance(module, nn.MultiheadAttention):
        return [module.out_proj]
    return []


def _output_batch_dims(module: nn.Module, count: int) -> list[int]:
    """Batch dim of each floating output leaf: RNN states ``h_n``/``c_n`` are ``[layers*dirs, B, H]``."""
    if isinstance(module, nn.RNNBase):
        return [0 if module.batch_first else 1] + [1] * (count - 1)
    return [0] * count


def _fired_prefixes(module: nn.Module, fired: set[int]) -> set[str]:
    """Paths of submodules whose own hooks ran (their parameters are accounted for by those calls)."""
    return {name for name, m in module.named_modules() if id(m) in fired and name}


@contextlib.contextmanager
def attached(engine: ClippingEngine) -> Iterator[ClippingEngine]:
    """``with attached(engine):`` -- attach, and detach in ``finally``."""
    engine.attach()
    try:
        yield engine
    finally:
        engine.detach()
