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

What a finished call records (its layouts, taps and :class:`~groupclip.engine.trace.Use`) is
:mod:`groupclip.engine.use_recording`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..dataflow.tags import Kind, Tag, batched, read_tag, write_tag
from ..errors import BatchDimensionError, PassError
from ..norms.generic import RandomState
from .taps import GuardTap, UseTap, UseTap1
from .trace import Trace
from .use_recording import Deferred, classify, record_generic, record_rule

if TYPE_CHECKING:
    from .core import ClippingEngine


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
                            classify(entry, args, kwargs, output, frame.trace)
                        )
                    return None
                if output is None or frame.trace is None or not frame.disabled:
                    return None
                if frame.trace.state is not None and not frame.trace.replay:
                    frame.trace.fulfil(frame.disabled)
                if entry.rule is not None:
                    return record_rule(frame, entry, args, kwargs, output)
                return record_generic(frame, entry, args, kwargs, output)
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


def _direct_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


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
