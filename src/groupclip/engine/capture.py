"""Capture: the module hooks that record a forward pass into a :class:`~groupclip.engine.trace.Trace`.

* The root module's pre-hook starts a trace (batch size, batched inputs tagged) and enters the batch tracker; its
  hook closes the trace and guards outputs that mix samples.
* Each module owning trainable parameters switches them to ``requires_grad=False`` while it runs, so autograd does
  no weight-gradient work, and records a use: the module's tensors pass through a tap that will hand the engine
  their gradient. Rules see the module's own tensors; other modules go through the generic fallback.
* Activation checkpointing re-runs parts of the forward inside the backward pass. ``use_reentrant=False`` recomputes
  what was recorded: the hooks *replay* it (the same switches and taps, so the same tensors are saved; nothing is
  recorded). ``use_reentrant=True`` ran the region under ``no_grad`` at first: each such call is recorded as a
  *deferred call* (its layouts, read off the tags then), and its recomputation, in the same order, becomes the use.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..dataflow.tags import Kind, Tag, batched, free, read_tag, write_tag
from ..errors import BatchDimensionError, PassError, UnsupportedModuleError
from ..norms.generic import RandomState
from .taps import GuardTap, UseTap, UseTap1
from .trace import BATCHED, FREE, Trace, Use, input_identity

if TYPE_CHECKING:
    from .core import ClippingEngine


class Deferred(NamedTuple):
    """A call's layouts: ``kind`` (batched or batch-free), per tapped tensor its ``(dim, inner)`` (None: batch-free)
    and tag, and the batch-free uses its input derives from."""

    kind: str
    layouts: list
    tags: list
    sources: tuple


class Frame:
    """One active call of a hooked module (between its pre-hook and its hook)."""

    __slots__ = ("canonical", "deferred", "deferring", "disabled", "fired", "names", "out_tag", "random_state", "trace")

    def __init__(self, trace: Trace | None) -> None:
        self.trace = trace
        self.deferred: Deferred | None = None  # a reentrant recomputation: the call's layouts as first recorded
        self.deferring: list[nn.Parameter] = []  # a call under no_grad that a reentrant checkpoint may recompute
        self.disabled: list[nn.Parameter] = []
        # Only when a wrapper swapped tensors into the slots: id(tensor) -> the attach-time parameter / its name.
        self.canonical: dict[int, nn.Parameter] | None = None
        self.names: dict[int, str] | None = None
        self.fired: set[int] = set()
        self.random_state: RandomState | None = None
        self.out_tag: Tag | None = None  # set while the call runs untracked inside: its output's tag


def _saved_tensor_hooks_owner() -> str:
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return getattr(hooks[0], "__qualname__", "") if hooks is not None else ""


def in_recomputation() -> bool:
    """Inside a non-reentrant activation checkpoint's recomputation (its saved-tensor hooks are active)."""
    return _saved_tensor_hooks_owner().startswith("_recomputation_hook")


def in_checkpoint_region() -> bool:
    """Inside the first run of a non-reentrant activation checkpoint's region (which will be recomputed)."""
    return _saved_tensor_hooks_owner().startswith("_checkpoint_hook")


def inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Capture:
    """The hooks of one engine (see the module docstring). State lives in traces and frames, not here."""

    def __init__(self, engine: ClippingEngine) -> None:
        self.engine = engine
        self.handles: list[Any] = []
        self.frames: dict[int, list[Frame]] = {}
        self.popped: list[bool] = []  # per call running untracked inside: the tracker was popped off the mode stack
        self.active_generic: list[Frame] = []
        self.disabled_count: dict[int, int] = {}
        self.trace: Trace | None = None  # the trace being recorded
        self.depth = 0
        self.replay = Trace(engine, 0, 1.0, replay=True, number=0)  # non-reentrant recomputations: taps only

    # ------------------------------------------------------------------ installation
    def install(self, entries) -> None:
        model = self.engine.model
        self.handles.append(model.register_forward_pre_hook(self.root_pre, with_kwargs=True, prepend=True))
        for entry in entries:
            self.handles.append(entry.module.register_forward_pre_hook(self.make_pre(entry), with_kwargs=True))
            self.handles.append(
                entry.module.register_forward_hook(self.make_post(entry), with_kwargs=True, always_call=True)
            )
        self.handles.append(model.register_forward_hook(self.root_post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        for frames in self.frames.values():
            for frame in frames:
                self._enable(frame.disabled)
        self.frames.clear()
        self.active_generic.clear()
        if self.trace is not None and self.depth:
            self._leave(self.trace)
        self.trace, self.depth = None, 0

    # ------------------------------------------------------------------ the root
    def root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with self.engine.tracker_paused():
            self._root_pre(module, args, kwargs)

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        engine = self.engine
        if engine.suspended_count:
            return
        if self.trace is not None:  # a nested call of the root within its own forward
            self.depth += 1
            return
        if not torch.is_grad_enabled():
            return
        if inside_backward() and in_recomputation():  # a non-reentrant checkpoint of the whole model: the module
            return  # hooks replay its taps
        engine.check_before_forward()
        batch, inputs = engine.batch_inputs(args, kwargs)
        if batch is None:
            raise BatchDimensionError(
                f"{type(module).__name__} was called without a tensor argument, so the batch size is unknown; "
                "pass the batched inputs as tensors (or set batch_args)."
            )
        scale = float(batch) if (engine.loss_reduction == "mean" and batch) else 1.0
        trace = Trace(engine, batch, scale)
        tag = batched(trace.number, 0 if batch > 1 else None)
        for t in inputs:
            write_tag(t, tag)
        self._enter(trace)
        self.depth = 1

    def root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        with self.engine.tracker_paused():
            return self._root_post(module, args, kwargs, output)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        trace = self.trace
        if trace is None or self.engine.suspended_count:
            return None
        self.depth -= 1
        if self.depth > 0:
            return None
        self._leave(trace)
        if output is None:  # the forward raised (always_call)
            return None
        trace.forward_done = True
        self.engine.trace_closed(trace)
        return _guard_outputs(trace, output, self.engine.anchor)

    def _enter(self, trace: Trace) -> None:
        self.trace = trace
        tracker = self.engine.tracker
        tracker.trace = trace
        tracker.__enter__()

    def _leave(self, trace: Trace | None) -> None:
        tracker = self.engine.tracker
        tracker.trace = None
        tracker.__exit__(None, None, None)
        self.trace = None

    # ------------------------------------------------------------------ recomputation (activation checkpointing)
    def _trace_for_call(self, module: nn.Module) -> tuple[Trace | None, Deferred | None]:
        """The trace a call of a module owning parameters belongs to: the one being recorded; a replay of it (a
        non-reentrant checkpoint recomputing it); or, with its recorded layouts, a reentrant recomputation."""
        if self.trace is not None:
            return self.trace, None
        if not torch.is_grad_enabled() or not inside_backward():
            return None, None
        if in_recomputation():
            return self.replay, None
        return self.engine.deferred_call(id(module))

    # ------------------------------------------------------------------ modules with parameters
    def make_pre(self, entry):
        engine = self.engine

        def pre(module: nn.Module, args: tuple, kwargs: dict):
            if engine.suspended_count:
                return None
            with engine.tracker_paused():
                return _pre(module, args, kwargs)

        def _pre(module: nn.Module, args: tuple, kwargs: dict):
            trace, deferred = self._trace_for_call(module)
            if trace is None:
                return None
            replaced = None
            if torch.is_grad_enabled() and _any_raw(args, kwargs, trace):
                # A parameter passed raw into a module (DeBERTa's relative embeddings into a LayerNorm): the module
                # sees its batch-free alias, so its use is a batch-free use derived from the raw one.
                args, kwargs = tree_map(lambda t: trace.raw_alias(t) if _raw(t, trace) else t, (args, kwargs))
                replaced = (args, kwargs)
            if not torch.is_grad_enabled():  # a reentrant checkpoint may recompute this call in backward
                if trace.replay:
                    return None
                frame = Frame(trace)
                frame.deferring = entry.trainable_now()
                trace.defer(frame.deferring)
                self.frames.setdefault(id(module), []).append(frame)
                return None
            frame = Frame(trace)
            frame.deferred = deferred
            current = [d.get(name) for d, name in entry.fast_slots]
            if any(p is not c for p, c in zip(current, entry.canonical, strict=True)):
                # A wrapper swapped tensors into the slots (FSDP2): record them under the attach-time parameters.
                frame.names, frame.canonical = {}, {}
                for p, (_, _name, local, canonical) in zip(current, entry.slots, strict=True):
                    if p is not None:
                        frame.names.setdefault(id(p), local)
                        if p is not canonical:
                            frame.canonical[id(p)] = canonical
                current = [p for p in current if p is not None]
            frame.disabled = self._disable(current)
            if entry.untracked_inside and frame.disabled:
                self._untracked_inside(frame, entry, args, kwargs)
            if entry.rule is None:
                frame.random_state = RandomState.capture(_direct_tensors(args, kwargs))
                self.active_generic.append(frame)
            self.frames.setdefault(id(module), []).append(frame)
            return replaced

        return pre

    def make_post(self, entry):
        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            frames = self.frames.get(id(module))
            if not frames:
                return None
            with self.engine.tracker_paused():
                return _post(module, args, kwargs, output, frames.pop())

        def _post(module: nn.Module, args: tuple, kwargs: dict, output: Any, frame: Frame) -> Any:
            try:
                if entry.rule is None and frame in self.active_generic:
                    self.active_generic.remove(frame)
                for outer in self.active_generic:
                    outer.fired.add(id(module))
                if frame.deferring:
                    if output is not None:
                        frame.trace.deferred_calls.setdefault(id(module), deque()).append(
                            self._classify(entry, args, kwargs, output, frame.trace)
                        )
                    return None
                if output is None or frame.trace is None or not frame.disabled:
                    return None
                if frame.trace.state is not None and not frame.trace.replay:
                    frame.trace.fulfil(frame.disabled)
                if entry.rule is not None:
                    return self._record_rule(frame, entry, args, kwargs, output)
                return self._record_generic(frame, entry, args, kwargs, output)
            finally:
                self._enable(frame.disabled)
                if frame.out_tag is not None:
                    self._track_again()

        return post

    def _untracked_inside(self, frame: Frame, entry, args: tuple, kwargs: dict) -> None:
        """A rule layer whose samples lie outside the dims it acts on: its output has the input's layout (the rule's
        contract), so the ops inside need not be tracked."""
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(x, Tensor):
            return
        tag = read_tag(x, frame.trace.number)
        if tag is None or tag.kind != Kind.BATCHED:
            return
        rule = entry.rule
        if tag.dim is not None:
            limit = 1 if rule.rows == "first" else x.dim() - rule.trailing(entry.module)
            if tag.dim >= limit:
                return
        frame.out_tag = tag
        # Off the mode stack (ops inside pay nothing), or merely paused if another mode is above it.
        tracker = self.engine.tracker
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is tracker:
            torch._C._pop_torch_function_stack()
            self.popped.append(True)
        else:
            tracker.paused += 1
            self.popped.append(False)

    def _track_again(self) -> None:
        if self.popped.pop():
            torch._C._push_on_torch_function_stack(self.engine.tracker)
        else:
            self.engine.tracker.paused -= 1

    def _params_of(self, frame: Frame, entry, generic: bool) -> dict[str, nn.Parameter]:
        if frame.names is None and len(frame.disabled) == len(entry.canonical):
            params = entry.params  # the common case: the attach-time parameters, all switched off by this call
        elif frame.names is None:
            params = {entry.local_names[id(p)]: p for p in frame.disabled}
        else:
            params = {frame.names[id(p)]: frame.canonical.get(id(p), p) for p in frame.disabled}
        if not generic:
            return params
        covered = {name for name, m in entry.module.named_modules() if id(m) in frame.fired and name}
        return {
            n: p
            for n, p in params.items()
            if not any(n.rpartition(".")[0] == c or n.rpartition(".")[0].startswith(c + ".") for c in covered)
        }

    def _classify(self, entry, args: tuple, kwargs: dict, output: Any, trace: Trace, out_tag=None) -> Deferred:
        """How a call's samples are laid out, read off the tags: ``(kind, layouts, output tags)``."""
        if entry.rule is not None:
            x, output = _rule_tensors(entry, args, kwargs, output)
            xtag = read_tag(x, trace.number)
            otag = out_tag if out_tag is not None else read_tag(output, trace.number)
            kind, layout, sources = self._use_kind(entry, xtag, otag, "input")
            if kind == BATCHED and (otag is None or (otag.dim, otag.inner) != layout):
                raise BatchDimensionError(
                    f"{entry.describe()}: its output is {otag.describe() if otag else 'batch-free'} while its input "
                    f"is {xtag.describe()}; groupclip cannot match its rows to samples."
                )
            return Deferred(kind, [layout], [otag], sources)
        leaves = tree_flatten(output)[0]
        floating = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.is_floating_point()]
        tags = [read_tag(leaf, trace.number) for leaf in floating]
        bad = [t for t in tags if t is not None and t.kind not in (Kind.BATCHED, Kind.FREE)]
        if bad:
            worst = max(bad, key=lambda t: t.kind)
            raise BatchDimensionError(
                f"{entry.describe()}: an output is {worst.describe()}; per-sample gradients of its parameters need "
                "per-sample outputs."
            )
        # Outputs without samples (batch-free: they depend on the parameters alone) get per-sample gradients where
        # they meet per-sample data, like any batch-free use's.
        layouts = [(t.dim, t.inner) if t is not None and t.kind == Kind.BATCHED else None for t in tags]
        inputs = tree_flatten((args, kwargs))[0]
        sources = tuple(s for t in _tags_of(inputs, trace.number) if t.kind == Kind.FREE for s in t.sources)
        kind = BATCHED if any(layout is not None for layout in layouts) else FREE
        return Deferred(kind, layouts, tags, sources)

    def _recorded(self, frame: Frame, entry, args, kwargs, output) -> Deferred:
        """The call's layouts: read off the tags now, or recorded when a reentrant checkpoint first ran it."""
        if frame.deferred is None:
            return self._classify(entry, args, kwargs, output, frame.trace, frame.out_tag)
        if frame.deferred.kind != BATCHED:
            raise BatchDimensionError(
                f"{entry.describe()} is a batch-free use inside a region of a reentrant activation checkpoint, whose "
                "recomputation groupclip cannot follow; use torch.utils.checkpoint with use_reentrant=False."
            )
        return frame.deferred

    def _record_rule(self, frame: Frame, entry, args: tuple, kwargs: dict, output: Any) -> Any:
        trace = frame.trace
        x, output = _rule_tensors(entry, args, kwargs, output)
        kind, (layout,), (otag,), sources = self._recorded(frame, entry, args, kwargs, output)
        if trace.replay:
            out = trace.tap(None, [x.detach()], [output])[0]
            write_tag(out, otag if kind == BATCHED else free(trace.number, ()))
            return out
        use = Use(trace, entry.path, entry.module, entry.rule, self._params_of(frame, entry, False), kind)
        use.layouts = [layout]
        use.upstream = sources
        if entry.rule.right_is_input:
            use.gram_key = input_identity(x)
        out = trace.tap(use, [x.detach()], [output])[0]
        write_tag(out, otag if kind == BATCHED else free(trace.number, (*sources, use.index)))
        return out

    def _use_kind(self, entry, tag, out_tag, what: str):
        if tag is not None and tag.kind == Kind.BATCHED:
            if entry.rule is not None and entry.rule.rows == "first" and tag.dim not in (0, None):
                raise BatchDimensionError(
                    f"{entry.describe()} gets its samples along dim {tag.dim} of its {what}, but it mixes every "
                    "dim but the first; move the batch to dim 0 before it."
                )
            return BATCHED, (tag.dim, tag.inner), ()
        if tag is None or tag.kind == Kind.FREE:
            return FREE, None, tag.sources if tag is not None else ()
        raise BatchDimensionError(
            f"{entry.describe()}: its {what} is {tag.describe()}, so per-sample gradients of its parameters are not "
            "defined. Keep the samples apart before this layer."
        )

    def _record_generic(self, frame: Frame, entry, args: tuple, kwargs: dict, output: Any) -> Any:
        trace = frame.trace
        leaves, spec = tree_flatten(output)
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
        if not positions:
            raise UnsupportedModuleError(
                f"{entry.describe()} owns trainable parameters but returned no floating-point tensor, so no gradient "
                "can reach them."
            )
        outputs = [leaves[i] for i in positions]
        kind, layouts, tags, sources = self._recorded(frame, entry, args, kwargs, output)
        inputs, in_spec = tree_flatten((args, kwargs))
        tensor_slots = [i for i, v in enumerate(inputs) if isinstance(v, Tensor)]
        saved = [inputs[i].detach() for i in tensor_slots]
        if trace.replay:
            tapped = trace.tap(None, saved, outputs)
        else:
            use = Use(trace, entry.path, entry.module, None, self._params_of(frame, entry, True), kind)
            use.layouts = layouts
            use.upstream = sources
            shapes = [(t.shape, t.dtype, t.device) for t in outputs]
            use.extra = _GenericInputs(in_spec, inputs, tensor_slots, frame.random_state, positions, shapes)
            tapped = trace.tap(use, saved, outputs)
            sources = (*sources, use.index)
        for t, layout, tag in zip(tapped, layouts, tags, strict=True):
            write_tag(t, tag if layout is not None else free(trace.number, sources if not trace.replay else ()))
        for i, t in zip(positions, tapped, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    # ------------------------------------------------------------------ requires_grad switching
    def _disable(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        switched = []
        for p in params:
            count = self.disabled_count.get(id(p), 0)
            if count == 0:
                if not p.requires_grad:
                    continue
                p.requires_grad = False
            self.disabled_count[id(p)] = count + 1
            switched.append(p)
        return switched

    def _enable(self, params: list[nn.Parameter]) -> None:
        for p in params:
            count = self.disabled_count.get(id(p), 0) - 1
            if count <= 0:
                self.disabled_count.pop(id(p), None)
                p.requires_grad = True
            else:
                self.disabled_count[id(p)] = count


class _GenericInputs:
    """How to rebuild a generic use's call from its tap's saved tensors (see :func:`rebuild`)."""

    __slots__ = ("leaves", "positions", "random_state", "shapes", "slots", "spec")

    def __init__(self, spec, leaves, slots, random_state, positions, shapes) -> None:
        self.spec = spec
        self.leaves = [None if i in set(slots) else v for i, v in enumerate(leaves)]
        self.slots, self.random_state, self.positions, self.shapes = slots, random_state, positions, shapes

    def rebuild(self, saved: tuple[Tensor, ...]) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
        for i, t in zip(self.slots, saved, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


def _raw(t: Any, trace: Trace) -> bool:
    return isinstance(t, nn.Parameter) and t.requires_grad and trace.trainable(t)


def _any_raw(args: tuple, kwargs: dict, trace: Trace) -> bool:
    """A trainable parameter among a call's arguments (direct, or in a list, tuple or dict)."""
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, Tensor):
            if value.requires_grad and trace.trainable(value):
                return True
        elif isinstance(value, list | tuple | dict) and any(_raw(t, trace) for t in _tensor_leaves(value)):
            return True
    return False


def _rule_tensors(entry, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor]:
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if not isinstance(x, Tensor) or not isinstance(output, Tensor):
        raise UnsupportedModuleError(
            f"{entry.describe()} was called without a tensor input or returned a non-tensor; its rule needs input "
            "and output tensors."
        )
    return x, output


def _direct_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _tags_of(leaves, number: int):
    for v in leaves:
        if isinstance(v, Tensor):
            tag = read_tag(v, number)
            if tag is not None:
                yield tag


def _guard_outputs(trace: Trace, output: Any, anchor: Tensor) -> Any:
    """Model outputs that mix samples (or lost their layout) refuse a backward through them.

    An output straight from a tap gets a view on top: a backward pass may start at a model output
    (``output.backward(gradient)``, pipeline stages), and autograd cannot tell in advance that a root node will run.
    """
    leaves, spec = tree_flatten(output)
    changed = False
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or not leaf.requires_grad:
            continue
        tag = read_tag(leaf, trace.number)
        if isinstance(leaf.grad_fn, UseTap._backward_cls | UseTap1._backward_cls):
            leaves[i] = leaf.view_as(leaf)
            write_tag(leaves[i], tag)
            changed = True
        if tag is None or tag.kind not in (Kind.MIXED, Kind.UNKNOWN):
            continue
        message = (
            f"A backward pass reached model output #{i}, which is {tag.describe()}: per-sample gradients are not "
            "defined through it (or groupclip cannot tell which sample each element belongs to). "
            + (
                "Register a layout rule for the op (groupclip.dataflow.register_layout_rule)."
                if tag.kind == Kind.UNKNOWN
                else "A DP loss must be a sum (or mean) of per-sample losses."
            )
        )
        leaves[i] = GuardTap.apply(message, anchor, leaf)
        write_tag(leaves[i], tag)
        changed = True
    if not changed:
        return None
    try:
        return tree_unflatten(leaves, spec)
    except Exception as exc:  # an output type pytree cannot rebuild
        raise PassError(f"Could not guard the model's outputs ({exc}).") from exc
