"""Capture: the module hooks that record a forward pass into a :class:`~groupclip.engine.trace.Trace`.

* The root module's pre-hook starts a trace (batch size, batched inputs tagged) and enters the batch tracker; its
  hook closes the trace and guards outputs that mix samples.
* Each module owning trainable parameters switches them to ``requires_grad=False`` while it runs, so autograd does
  no weight-gradient work, and records a use: the module's tensors pass through a tap that will hand the engine
  their gradient. Rules see the module's own tensors; other modules go through the generic fallback.
* Every module also watches for forward passes inside a backward pass -- activation checkpointing -- to keep the
  tracker on while a checkpointed region is recomputed: ``use_reentrant=False`` recomputes what was recorded, so the
  hooks replay it (the same taps, nothing recorded); ``use_reentrant=True`` ran the region under ``no_grad`` at
  first, so the recomputation is recorded then, into the trace that ran it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..dataflow.tags import Kind, batched, free, read_tag, write_tag
from ..errors import BatchDimensionError, PassError, UnsupportedModuleError
from ..norms.generic import RandomState
from .taps import GuardTap, UseTap
from .trace import BATCHED, FREE, Trace, Use, view_key

if TYPE_CHECKING:
    from .core import ClippingEngine


class Frame:
    """One active call of a hooked module (between its pre-hook and its hook)."""

    __slots__ = ("canonical", "disabled", "fired", "mode", "names", "random_state", "trace")

    def __init__(self, trace: Trace | None) -> None:
        self.trace = trace
        self.disabled: list[nn.Parameter] = []
        self.canonical: dict[int, nn.Parameter] = {}  # id(swapped-in tensor) -> the attach-time parameter
        self.names: dict[int, str] = {}  # id(tensor in a slot at the pre-hook) -> its name relative to the module
        self.fired: set[int] = set()
        self.random_state: RandomState | None = None
        self.mode = False  # this call entered the tracker (a recomputation inside backward)


def in_recomputation() -> bool:
    """Inside a non-reentrant activation checkpoint's recomputation (its saved-tensor hooks are active)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook")


def inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Capture:
    """The hooks of one engine (see the module docstring). State lives in traces and frames, not here."""

    def __init__(self, engine: ClippingEngine) -> None:
        self.engine = engine
        self.handles: list[Any] = []
        self.frames: dict[int, list[Frame]] = {}
        self.active_generic: list[Frame] = []
        self.disabled_count: dict[int, int] = {}
        self.trace: Trace | None = None  # the trace being recorded (or replayed)
        self.depth = 0

    # ------------------------------------------------------------------ installation
    def install(self, entries) -> None:
        model = self.engine.model
        self.handles.append(model.register_forward_pre_hook(self.root_pre, with_kwargs=True, prepend=True))
        hooked = set()
        for entry in entries:
            hooked.add(id(entry.module))
            self.handles.append(entry.module.register_forward_pre_hook(self.make_pre(entry), with_kwargs=True))
            self.handles.append(
                entry.module.register_forward_hook(self.make_post(entry), with_kwargs=True, always_call=True)
            )
        for module in model.modules():
            if id(module) not in hooked and module is not model:
                self.handles.append(module.register_forward_pre_hook(self.plain_pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self.plain_post, with_kwargs=True, always_call=True))
        self.handles.append(model.register_forward_hook(self.root_post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        for frames in self.frames.values():
            for frame in frames:
                self._enable(frame.disabled)
                if frame.mode:
                    self._leave(frame.trace)
        self.frames.clear()
        self.active_generic.clear()
        if self.trace is not None and self.depth:
            self.engine.tracker.trace = None
            self.engine.tracker.__exit__(None, None, None)
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
        replay = inside_backward() and in_recomputation()
        engine.check_before_forward()
        batch, inputs = engine.batch_inputs(args, kwargs)
        if batch is None:
            raise BatchDimensionError(
                f"{type(module).__name__} was called without a tensor argument, so the batch size is unknown; "
                "pass the batched inputs as tensors (or set batch_args)."
            )
        scale = float(batch) if (engine.loss_reduction == "mean" and batch) else 1.0
        if replay:
            trace = engine.trace_of_inputs(inputs) or Trace(engine, batch, scale, replay=True)
            trace = Trace(engine, batch, scale, replay=True, number=trace.number)
        else:
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
        if output is None or trace.replay:  # the forward raised (always_call), or a recomputation
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

    # ------------------------------------------------------------------ modules without parameters
    def plain_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        trace = self.trace
        if trace is not None:  # inside a recorded forward: only a no_grad region (maybe checkpointed) matters
            if not torch.is_grad_enabled() and not trace.replay:
                with self.engine.tracker_paused():
                    trace.remember_inputs(_tensor_leaves((args, kwargs)))
            return
        if not torch.is_grad_enabled() or not inside_backward() or self.engine.suspended_count:
            return
        with self.engine.tracker_paused():
            frame = self._recomputation_frame(module, args, kwargs)
        if frame is not None:
            self.frames.setdefault(id(module), []).append(frame)

    def plain_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        frames = self.frames.get(id(module))
        if frames:
            frame = frames.pop()
            if frame.mode:
                self._leave(frame.trace)

    def _recomputation_frame(self, module: nn.Module, args: tuple, kwargs: dict) -> Frame | None:
        """A forward inside backward (activation checkpointing): enter the tracker with the trace it belongs to."""
        engine = self.engine
        if self.trace is not None or engine.suspended_count or not torch.is_grad_enabled() or not inside_backward():
            return None
        tensors = _tensor_leaves((args, kwargs))
        if in_recomputation():
            original = engine.trace_of_inputs(tensors)
            if original is None:
                return None
            trace = Trace(engine, original.batch, original.loss_scale, replay=True, number=original.number)
        else:
            trace = engine.trace_of_recomputed(tensors)
            if trace is None:
                return None
        frame = Frame(trace)
        frame.mode = True
        self._enter(trace)
        return frame

    # ------------------------------------------------------------------ modules with parameters
    def make_pre(self, entry):
        engine = self.engine

        def pre(module: nn.Module, args: tuple, kwargs: dict):
            if engine.suspended_count:
                return None
            with engine.tracker_paused():
                return _pre(module, args, kwargs)

        def _pre(module: nn.Module, args: tuple, kwargs: dict):
            outer = self._recomputation_frame(module, args, kwargs)
            trace = self.trace
            if trace is None:
                return None
            replaced = None
            if torch.is_grad_enabled() and any(_raw(t, trace) for t in _tensor_leaves((args, kwargs))):
                # A parameter passed raw into a module (DeBERTa's relative embeddings into a LayerNorm): the module
                # sees its batch-free alias, so its use is a batch-free use derived from the raw one.
                args, kwargs = tree_map(lambda t: trace.raw_alias(t) if _raw(t, trace) else t, (args, kwargs))
                replaced = (args, kwargs)
            if not torch.is_grad_enabled():  # a reentrant checkpoint may recompute this call in backward
                if not trace.replay:
                    trace.defer(entry.trainable_now())
                    trace.remember_inputs(_tensor_leaves((args, kwargs)))
                if outer is not None:
                    self.frames.setdefault(id(module), []).append(outer)
                return None
            frame = outer or Frame(trace)
            current = []
            for owner, name, local, canonical in entry.slots:
                p = owner._parameters.get(name)
                if p is not None:
                    current.append(p)
                    frame.names.setdefault(id(p), local)
                    if p is not canonical:
                        frame.canonical[id(p)] = canonical
            frame.disabled = self._disable(current)
            if entry.rule is None:
                frame.random_state = RandomState.capture(_tensor_leaves((args, kwargs)))
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
                if output is None or frame.trace is None or not frame.disabled:
                    return None
                if frame.trace.state is not None and not frame.trace.replay:
                    frame.trace.fulfil(frame.disabled)
                if entry.rule is not None:
                    return self._record_rule(frame, entry, args, kwargs, output)
                return self._record_generic(frame, entry, args, kwargs, output)
            finally:
                self._enable(frame.disabled)
                if frame.mode:
                    self._leave(frame.trace)

        return post

    def _params_of(self, frame: Frame, entry, generic: bool) -> dict[str, nn.Parameter]:
        params = {frame.names[id(p)]: frame.canonical.get(id(p), p) for p in frame.disabled}
        if not generic:
            return params
        covered = {name for name, m in entry.module.named_modules() if id(m) in frame.fired and name}
        return {
            n: p
            for n, p in params.items()
            if not any(n.rpartition(".")[0] == c or n.rpartition(".")[0].startswith(c + ".") for c in covered)
        }

    def _record_rule(self, frame: Frame, entry, args: tuple, kwargs: dict, output: Any) -> Any:
        trace = frame.trace
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"{entry.describe()} was called without a tensor input or returned a non-tensor; its rule needs "
                "input and output tensors."
            )
        xtag, otag = read_tag(x, trace.number), read_tag(output, trace.number)
        kind, layout, sources = self._use_kind(entry, xtag, otag, "input")
        if kind == BATCHED and (otag is None or (otag.dim, otag.inner) != layout):
            raise BatchDimensionError(
                f"{entry.describe()}: its output is {otag.describe() if otag else 'batch-free'} while its input is "
                f"{xtag.describe()}; groupclip cannot match its rows to samples."
            )
        if trace.replay:
            out = trace.tap(None, [x.detach()], [output])[0]
            write_tag(out, otag if kind == BATCHED else free(trace.number, ()))
            return out
        use = Use(trace, entry.path, entry.module, entry.rule, self._params_of(frame, entry, False), kind)
        use.layouts = [layout]
        use.upstream = sources
        if entry.rule.right_is_input:
            use.gram_key = view_key(x)
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
        tags = [read_tag(leaves[i], trace.number) for i in positions]
        outputs = [leaves[i] for i in positions]
        bad = [t for t in tags if t is not None and t.kind not in (Kind.BATCHED, Kind.FREE)]
        if bad:
            worst = max(bad, key=lambda t: t.kind)
            raise BatchDimensionError(
                f"{entry.describe()}: an output is {worst.describe()}; per-sample gradients of its parameters need "
                "per-sample outputs."
            )
        inputs, in_spec = tree_flatten((args, kwargs))
        tensor_slots = [i for i, v in enumerate(inputs) if isinstance(v, Tensor)]
        saved = [inputs[i].detach() for i in tensor_slots]
        # Outputs without samples (batch-free: they depend on the parameters alone) get per-sample gradients where
        # they meet per-sample data, like any batch-free use's.
        layouts = [(t.dim, t.inner) if t is not None and t.kind == Kind.BATCHED else None for t in tags]
        sources = tuple(s for t in _tags_of(inputs, trace.number) if t.kind == Kind.FREE for s in t.sources)
        if trace.replay:
            tapped = trace.tap(None, saved, outputs)
        else:
            kind = BATCHED if any(layout is not None for layout in layouts) else FREE
            use = Use(trace, entry.path, entry.module, None, self._params_of(frame, entry, True), kind)
            use.layouts = layouts
            use.upstream = sources
            shapes = [(t.shape, t.dtype, t.device) for t in outputs]
            use.extra = _GenericInputs(in_spec, inputs, tensor_slots, frame.random_state, positions, shapes)
            tapped = trace.tap(use, saved, outputs)
            for t, layout, tag in zip(tapped, layouts, tags, strict=True):
                write_tag(t, tag if layout is not None else free(trace.number, (*sources, use.index)))
        if trace.replay:
            for t, layout, tag in zip(tapped, layouts, tags, strict=True):
                write_tag(t, tag if layout is not None else free(trace.number, ()))
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
                p.requires_grad_(False)
            self.disabled_count[id(p)] = count + 1
            switched.append(p)
        return switched

    def _enable(self, params: list[nn.Parameter]) -> None:
        for p in params:
            count = self.disabled_count.get(id(p), 0) - 1
            if count <= 0:
                self.disabled_count.pop(id(p), None)
                p.requires_grad_(True)
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
        if isinstance(leaf.grad_fn, UseTap._backward_cls):
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
