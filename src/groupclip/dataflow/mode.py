"""The batch tracker: a ``TorchFunctionMode`` that tags every tensor of the forward pass by data flow.

While the model's forward runs, every torch op passes through :meth:`BatchTracker.__torch_function__`:

* ops on constants only run untouched (the common case for parameters and buffers: one attribute read per tensor);
* a trainable parameter used *raw* -- outside a call of the module that owns it (DeBERTa reads
  ``rel_embeddings.weight`` in its encoder) -- is replaced by an alias the engine can attribute gradients to;
* the result of an op on tagged tensors gets a tag from the op's layout rule (:mod:`groupclip.dataflow.rules`);
* where a batch-free tensor (from a batch-free use of a parameter) first meets per-sample data, the op is rewritten
  so that per-sample gradients of the batch-free tensor can be recovered, without changing what the op computes:
  elementwise ops see the batch-free operand expanded to the batch (the same values, broadcast explicitly); other
  ops get their result tapped, and its gradient is split by sample and pulled back (see the engine's taps).

The tracker never changes a value or a shape the model computes with.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .rules import Call, LayoutLost, funcs_named, lookup, op_name
from .rules.elementwise import DETACHING, LINEAR, POINTWISE, SCALING
from .tags import ATTRIBUTE, Kind, Tag, batched, free, lost, write_tag


class TraceHost(Protocol):
    """What the tracker needs from the forward trace it tags (implemented by the engine's trace)."""

    number: int
    batch: int

    def trainable(self, param: Tensor) -> bool: ...
    def raw_alias(self, param: nn.Parameter) -> Tensor: ...
    def expanded_meeting(self, operand: Tensor, expanded: Tensor, sources: tuple[int, ...], tag: Tag) -> Tensor: ...
    def masked_meeting(self, output: Tensor, tag: Tag, aliases: list[tuple[Tensor, Tensor]], call: str) -> Tensor: ...
    def refuse(self, message: str, sources: tuple[int, ...]) -> None: ...
    def consumed(self, tensor: Tensor, sources: tuple[int, ...]) -> None: ...
    def checkpointed(self) -> bool: ...
    def aligned(self, tensor: Tensor, sources: tuple[int, ...], layout: tuple[int, int]) -> None: ...


POINTWISE_SET = frozenset(POINTWISE)
# Elementwise ops that save none of their operands for backward: an expanded operand changes no saved tensor, which
# a non-reentrant activation checkpoint compares between the first run and the recomputation.
UNSAVED_OPERANDS = frozenset(
    funcs_named(["add", "sub", "subtract", "rsub", "add_", "sub_", "__radd__", "__rsub__", "where", "masked_fill"])
)
INPLACE_WRITES = frozenset({Tensor.__setitem__})
_IN_PLACE: dict = {}


def _in_place(func) -> bool:
    """A method that writes into its first argument (``add_``, ``masked_fill_``...) or ``__setitem__``."""
    found = _IN_PLACE.get(func)
    if found is None:
        name = getattr(func, "__name__", "")
        found = _IN_PLACE[func] = func in INPLACE_WRITES or (name.endswith("_") and not name.startswith("__"))
    return found


# Queries whose results are never tensors: answered without looking at tags.
PASSTHROUGH = {
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.stride, Tensor.is_floating_point, Tensor.is_contiguous,
    Tensor.element_size, Tensor.data_ptr, Tensor.storage_offset, Tensor.__len__, Tensor.is_complex,
    Tensor.shape.__get__, Tensor.ndim.__get__, Tensor.dtype.__get__, Tensor.device.__get__,
    Tensor.requires_grad.__get__, Tensor.grad_fn.__get__, Tensor.is_leaf.__get__, Tensor.layout.__get__,
    Tensor.is_cuda.__get__, Tensor.is_sparse.__get__, Tensor.__hash__, Tensor.nelement,
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
    Tensor.__repr__, Tensor.__format__, Tensor.untyped_storage, Tensor.get_device, Tensor.is_inference,
    Tensor.register_hook, Tensor.retain_grad, Tensor.is_meta.__get__, Tensor._version.__get__,
}  # fmt: skip


class BatchTracker(TorchFunctionMode):
    """Tags tensors of the active trace; see the module docstring. One per engine, reused across passes."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: TraceHost | None = None
        self.paused = 0

    # ------------------------------------------------------------------ the hot path
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        trace = self.trace
        if trace is None or self.paused or func in PASSTHROUGH:
            return func(*args, **kwargs)
        # Scan the arguments once: the tags of this trace, and parameters used raw.
        number = trace.number
        found: list[tuple[Tensor, Tag]] = []
        raw = False
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, Tensor):
                tag = getattr(value, ATTRIBUTE, None)
                if tag is not None and tag.trace == number:
                    found.append((value, tag))
                elif value.requires_grad and trace.trainable(value):
                    raw = True
            elif isinstance(value, list | tuple) and value and isinstance(value[0], Tensor | list | tuple):
                for t in _all_tensors((value,), {}):
                    tag = getattr(t, ATTRIBUTE, None)
                    if tag is not None and tag.trace == number:
                        found.append((t, tag))
                    elif t.requires_grad and trace.trainable(t):
                        raw = True
        if not found and not raw:
            return func(*args, **kwargs)
        self.paused += 1
        try:
            if not raw and len(found) == 1 and found[0][1].kind == Kind.BATCHED:
                return self._one_batched(func, args, kwargs, found[0], trace)
            return self._tracked(func, args, kwargs, trace, raw)
        finally:
            self.paused -= 1

    def _one_batched(self, func, args, kwargs, operand: tuple[Tensor, Tag], trace: TraceHost):
        """The common case: one per-sample argument and no batch-free ones."""
        out = func(*args, **kwargs)
        t, tag = operand
        if isinstance(out, Tensor):
            if trace.batch <= 1:
                tag_out = batched(trace.number, None)
            elif func in POINTWISE_SET and out.shape == t.shape:
                tag_out = tag  # elementwise, no broadcasting: the same layout
            else:
                tag_out = self._result_tags(func, args, kwargs, out, {id(t): tag}, trace)
            write_tag(out, tag_out if not isinstance(tag_out, list | tuple) else tag_out[0])
            if out is not t and _in_place(func):  # per-sample data written into a constant
                _written_in_place(out, tag_out, trace.number)
            return out
        tag_or_tags = (
            batched(trace.number, None)
            if trace.batch <= 1
            else self._result_tags(func, args, kwargs, out, {id(t): tag}, trace)
        )
        _tag_outputs(out, tag_or_tags, require_grad=False)
        if _in_place(func) and args and isinstance(args[0], Tensor):
            _written_in_place(args[0], tag_or_tags, trace.number)
        return out

    # ------------------------------------------------------------------ tagged ops
    def _tracked(self, func, args: tuple, kwargs: dict, trace: TraceHost, raw: bool):
        number = trace.number
        if raw:
            args, kwargs = _replace_raw(args, kwargs, trace)
        tags: dict[int, Tag] = {}
        sources: set[int] = set()
        free_operands: list[tuple[Tensor, Tag]] = []
        for t in _all_tensors(args, kwargs):
            tag = getattr(t, ATTRIBUTE, None)
            if tag is None or tag.trace != number:
                continue
            if tag.kind == Kind.FREE:
                sources.update(tag.sources)
                free_operands.append((t, tag))
                trace.consumed(t, tag.sources)
            else:
                tags[id(t)] = tag
        if not tags:  # batch-free operands only
            out = func(*args, **kwargs)
            if func not in DETACHING:
                _tag_outputs(out, free(number, tuple(sources)), require_grad=True)
            return out
        if trace.batch <= 1:  # one sample: everything per-sample is that sample's
            out = func(*args, **kwargs)
            _tag_outputs(out, batched(number, None), require_grad=False)
            return out
        masked = False
        aliases: list[tuple[Tensor, Tensor]] = []
        if free_operands:
            args, kwargs, masked = self._meet(func, args, kwargs, tags, free_operands, trace)
            if masked:  # the op's own share of the gradient of each batch-free operand is taken at an alias
                replaced = {}
                for f, _ in free_operands:
                    if id(f) not in replaced:
                        replaced[id(f)] = f.view_as(f)
                        aliases.append((replaced[id(f)], f))
                args, kwargs = _substitute(args, kwargs, replaced)
        out = func(*args, **kwargs)
        tag_or_tags = self._result_tags(func, args, kwargs, out, tags, trace)
        _tag_outputs(out, tag_or_tags, require_grad=False)
        if _in_place(func) and args and isinstance(args[0], Tensor):
            _written_in_place(args[0], tag_or_tags, number)
        if masked:
            out = self._tap_masked(func, out, tuple(sorted(sources)), aliases, trace)
        return out

    def _result_tags(self, func, args, kwargs, out, tags: dict[int, Tag], trace: TraceHost):
        kinds = {tag.kind for tag in tags.values()}
        number = trace.number
        if Kind.MIXED in kinds or Kind.UNKNOWN in kinds:
            worst = max(tags.values(), key=lambda t: t.kind)
            return worst
        if Kind.REDUCED in kinds:
            if Kind.BATCHED not in kinds and (func in LINEAR or (func in SCALING and len(tags) == 1)):
                return lost(number, Kind.REDUCED, op_name(func))
            return lost(number, Kind.MIXED, f"{op_name(func)} of a sum over samples")
        rule = lookup(func)
        if rule is None:
            return lost(number, Kind.UNKNOWN, f"{op_name(func)} (no layout rule)")
        try:
            return rule(Call(func, args, kwargs, out, number, trace.batch, tags))
        except LayoutLost as lost_layout:
            return lost(number, Kind.UNKNOWN, str(lost_layout))
        except Exception as exc:  # a rule that does not understand this call: the layout is lost, loudly later
            return lost(number, Kind.UNKNOWN, f"{op_name(func)} (its layout rule failed: {type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ meetings
    def _meet(self, func, args, kwargs, tags, free_operands, trace: TraceHost):
        """Rewrite an op where batch-free operands meet per-sample ones; returns ``(args, kwargs, masked)``."""
        number = trace.number
        for tag in tags.values():
            if tag.kind != Kind.BATCHED:
                all_sources = tuple(sorted({s for _, f in free_operands for s in f.sources}))
                trace.refuse(
                    f"{op_name(func)} combines a batch-free tensor with {tag.describe()}, so its gradient cannot be "
                    "split by sample",
                    all_sources,
                )
        if func not in POINTWISE_SET or _writes_into(func, args, free_operands):
            return args, kwargs, True
        if func not in UNSAVED_OPERANDS and trace.checkpointed():
            return args, kwargs, True
        try:
            shapes = [t.shape for t in _all_tensors(args, kwargs)]
            out_shape = torch.broadcast_shapes(*shapes)
            target = Call(func, args, kwargs, None, number, trace.batch, tags).elementwise(_Shaped(out_shape))
        except (LayoutLost, RuntimeError):
            return args, kwargs, True
        if target.kind != Kind.BATCHED:
            return args, kwargs, True
        od, nd = target.dim, len(out_shape)
        replaced: dict[int, Tensor] = {}
        for f, ftag in free_operands:
            fd = od - (nd - f.dim())
            if fd >= 0 and f.shape[fd] == out_shape[od]:
                # Aligned with the samples already (BERT's default token types, a [B, T] buffer): the producing
                # use may take its plain gradient as per-sample if this op stays its only consumer; the result is
                # split by sample otherwise.
                trace.aligned(f, ftag.sources, (fd, target.inner))
                return args, kwargs, True
            view = f.reshape((1,) * (nd - f.dim()) + tuple(f.shape))
            size = list(view.shape)
            size[od] = out_shape[od]
            expanded = view.expand(size)
            etag = batched(number, od, target.inner)
            replaced[id(f)] = trace.expanded_meeting(f, expanded, ftag.sources, etag)
        args, kwargs = _substitute(args, kwargs, replaced)
        for t in replaced.values():
            tags[id(t)] = getattr(t, ATTRIBUTE)
        return args, kwargs, False

    def _tap_masked(self, func, out, sources: tuple[int, ...], aliases, trace: TraceHost):
        if isinstance(out, Tensor):
            tag = getattr(out, ATTRIBUTE, None)
            if tag is None or tag.kind != Kind.BATCHED:
                trace.refuse(
                    f"{op_name(func)} combines a batch-free tensor with per-sample data into a result "
                    f"{tag.describe() if tag else 'without samples'}",
                    sources,
                )
            return trace.masked_meeting(out, tag, aliases, op_name(func))
        trace.refuse(f"{op_name(func)} combines a batch-free tensor with per-sample data (several results)", sources)
        return out


def _writes_into(func, args: tuple, free_operands) -> bool:
    """An in-place op whose target is batch-free (it cannot be replaced by an expanded view)."""
    name = getattr(func, "__name__", "")
    return bool(args) and (name.endswith("_") or func in INPLACE_WRITES) and any(f is args[0] for f, _ in free_operands)


def _written_in_place(target: Tensor, tag_or_tags, number: int) -> None:
    """Per-sample data written in place: the target carries it now, and so does the tensor it is a view of."""
    tag = tag_or_tags[0] if isinstance(tag_or_tags, list | tuple) else tag_or_tags
    write_tag(target, tag)
    base = target._base
    if base is not None and tag is not None and tag.per_sample:
        old = getattr(base, ATTRIBUTE, None)
        if old is None or old.trace != number or old.kind == Kind.FREE:
            write_tag(base, lost(number, Kind.UNKNOWN, "per-sample data written in place into a view"))


class _Shaped:
    """Stand-in for an op result when only its shape is known (before the op runs)."""

    def __init__(self, shape) -> None:
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)


def _interesting(value: Any, number: int, trace: TraceHost) -> bool:
    if isinstance(value, Tensor):
        tag = getattr(value, ATTRIBUTE, None)
        if tag is not None and tag.trace == number:
            return True
        return isinstance(value, nn.Parameter) and value.requires_grad and trace.trainable(value)
    if isinstance(value, list | tuple):
        return any(_interesting(v, number, trace) for v in value if isinstance(v, Tensor | list | tuple))
    return False


def _all_tensors(args: tuple, kwargs: dict):
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, list | tuple):
            for v in value:
                if isinstance(v, Tensor):
                    yield v
                elif isinstance(v, list | tuple):
                    yield from (w for w in v if isinstance(w, Tensor))


def _map_tensors(value: Any, fn):
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, list | tuple) and any(isinstance(v, Tensor | list | tuple) for v in value):
        mapped = [_map_tensors(v, fn) for v in value]
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    return value


def _replace_raw(args: tuple, kwargs: dict, trace: TraceHost):
    def swap(t: Tensor) -> Tensor:
        if isinstance(t, nn.Parameter) and t.requires_grad and trace.trainable(t):
            return trace.raw_alias(t)
        return t

    return tuple(_map_tensors(a, swap) for a in args), {k: _map_tensors(v, swap) for k, v in kwargs.items()}


def _substitute(args: tuple, kwargs: dict, replaced: dict[int, Tensor]):
    def swap(t: Tensor) -> Tensor:
        return replaced.get(id(t), t)

    return tuple(_map_tensors(a, swap) for a in args), {k: _map_tensors(v, swap) for k, v in kwargs.items()}


def _tag_outputs(out: Any, tag_or_tags, *, require_grad: bool) -> None:
    """Write tags onto the result's tensors (one tag for all, or one per tensor of a tuple result)."""
    if isinstance(out, Tensor):
        tag = tag_or_tags[0] if isinstance(tag_or_tags, list | tuple) else tag_or_tags
        if require_grad and tag is not None and not out.requires_grad:
            tag = None  # batch-free and not differentiable: a constant
        write_tag(out, tag)
        return
    if isinstance(out, list | tuple):
        tensors = [t for t in out if isinstance(t, Tensor)]
        many = isinstance(tag_or_tags, list | tuple)
        for i, t in enumerate(tensors):
            tag = tag_or_tags[i] if many and i < len(tag_or_tags) else (None if many else tag_or_tags)
            if require_grad and tag is not None and not t.requires_grad:
                tag = None
            write_tag(t, tag)
