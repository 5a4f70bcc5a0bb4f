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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from .bookkeeping import ClipReport, PassState, Use
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

    __slots__ = ("disabled", "fired", "random_state")

    def __init__(self) -> None:
        self.disabled: list[nn.Parameter] = []
        self.fired: set[int] = set()
        self.random_state: RandomState | None = None


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
        self._params_by_id = {id(p): p for p in trainable_parameters(self.model).values()}
        _ENGINES[self.model] = self
        return self

    def _snapshot(self) -> tuple:
        """Identity of the model's structure as the hooks saw it: modules and trainable parameters."""
        return (
            tuple(id(m) for m in self.model.modules()),
            tuple((name, id(p)) for name, p in trainable_parameters(self.model).items()),
        )

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
        params = trainable_parameters(self.model)
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
        self._pass = PassState(batch, scale)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._pass
        if self._suspended or state is None or state.forward_done:
            return
        if output is None:  # the forward raised; always_call=True brought us here
            self._pass = None
            return
        if self.grouping is None:
            names = {id(p): n for n, p in trainable_parameters(self.model).items()}
            self._set_grouping(
                resolve_grouping(self.model, self.grouping_spec, [names[i] for i in state.order if i in names])
            )
        state.close_forward(self._group_of, self._group_members)

    def _make_pre(self, module: nn.Module, rule):
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        if rule is None:
            own += [p for child in _uncalled_children(module) for p in child.parameters() if p.requires_grad]
        subtree = own

        def pre(mod: nn.Module, args: tuple) -> None:
            if not self._recording():
                if self._pass is not None and not self._suspended and torch._C._current_graph_task_id() != -1:
                    raise PassError(
                        f"{mod.__class__.__name__} ran forward inside the backward pass (activation checkpointing); "
                        "groupclip does not support it yet. Disable gradient checkpointing."
                    )
                return
            frame = _Frame()
            frame.disabled = self._disable(subtree)
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
        params = {_local_name(mod, p): p for p in frame.disabled}
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
        disabled = {id(p) for p in frame.disabled}
        params = {}
        for name, p in mod.named_parameters():
            owner = name.rpartition(".")[0]
            if id(p) in disabled and not any(owner == c or owner.startswith(c + ".") for c in covered):
                params[name] = p
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
        if state is not self._pass:
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

    def _finish(self, state: PassState) -> None:
        if state is not self._pass:
            return
        self._pass = None
        state.finished = True
        for use in state.uses:
            use.compute, use.saved_versions = None, []
            if not use.done:
                state.use_done(use, {})
        for group in state.pending_groups():
            state.clip_group(group, self.thresholds[group], self.clip_fn)
        self.peak_held_bytes = max(self.peak_held_bytes, state.ledger.peak_held_bytes)
        if self._anchor is not None:
            self._anchor.grad = None
        if state.non_finite:
            self.nonfinite_passes += 1
            detail = "; ".join(f"group {g!r}: samples {idx}" for g, idx in state.non_finite.items())
            raise NonFiniteNormError(
                f"Non-finite per-sample gradient norms ({detail}); no gradient was written. "
                "Check the loss and inputs of those samples (NaN/inf) or lower the lr."
            )
        params = self._params_by_id  # the model is checked unchanged at every forward while attached
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


def _local_name(module: nn.Module, param: nn.Parameter) -> str:
    for name, p in module._parameters.items():
        if p is param:
            return name
    raise KeyError("parameter not owned by module")


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
