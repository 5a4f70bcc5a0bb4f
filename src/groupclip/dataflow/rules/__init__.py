"""Layout rules: how each torch op moves the samples from its inputs to its outputs.

A rule receives a :class:`Call` -- the op, its arguments, its result and the per-sample tags of its tensor
arguments -- and returns the tag of the result (one tag for every tensor of a tuple result, or a list of them).
Rules are only asked about ops with per-sample inputs whose tags are all ``BATCHED``: the dispatcher handles
everything else (constants, batch-free tensors, losses, lost layouts). An op without a rule gives ``UNKNOWN``, which
a layer or a loss that needs per-sample gradients refuses loudly; register a rule to teach groupclip the op::

    from groupclip.dataflow import register_layout_rule

    @register_layout_rule(torch.special.i0)          # an elementwise op: samples stay where they were
    def i0(call):
        return call.elementwise()

Functions, ``Tensor`` methods (``torch.Tensor.view``), operators (their ``Tensor`` method) and property getters
(``torch.Tensor.T.__get__``) are separate entries; :func:`register_layout_rule` takes any number of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..tags import Kind, Tag, batched, lost

_MISSING = object()


class Call:
    """One op call as a layout rule sees it."""

    __slots__ = ("args", "batch", "func", "kwargs", "out", "tags", "trace")

    def __init__(self, func, args: tuple, kwargs: dict, out, trace: int, batch: int, tags: dict[int, Tag]) -> None:
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out
        self.trace, self.batch, self.tags = trace, batch, tags

    @property
    def name(self) -> str:
        return op_name(self.func)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """A positional-or-keyword argument."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if index < len(self.args) else default

    def tag(self, tensor: Any) -> Tag | None:
        return self.tags.get(id(tensor)) if isinstance(tensor, Tensor) else None

    def batched(self) -> list[tuple[Tensor, Tag]]:
        """Every per-sample tensor argument (nested in lists too) with its tag, in argument order."""
        found = []
        for value in (*self.args, *self.kwargs.values()):
            for t in _tensors(value):
                tag = self.tags.get(id(t))
                if tag is not None:
                    found.append((t, tag))
        return found

    def first(self) -> tuple[Tensor, Tag]:
        """The first argument, which must be per-sample (for ops whose layout follows their input)."""
        t = self.args[0] if self.args else next(iter(self.kwargs.values()))
        tag = self.tag(t)
        if tag is None:
            raise LayoutLost(f"{self.name}: its input is not the per-sample tensor")
        return t, tag

    def at(self, dim: int, inner: int = 1) -> Tag:
        return batched(self.trace, dim, inner)

    def unknown(self, why: str | None = None) -> Tag:
        return lost(self.trace, Kind.UNKNOWN, why or self.name)

    def mixed(self, why: str | None = None) -> Tag:
        return lost(self.trace, Kind.MIXED, why or f"{self.name} combines samples")

    def reduced(self) -> Tag:
        return lost(self.trace, Kind.REDUCED, self.name)

    def elementwise(self, out: Tensor | None = None) -> Tag:
        """Broadcasting elementwise op: every per-sample argument's batch dim lands on one output dim."""
        out = self.out if out is None else out
        if isinstance(out, list | tuple):
            out = out[0]
        return broadcast_layout(self, self.batched(), out.shape)

    def same(self) -> Tag:
        """The result has the first argument's layout (same dims)."""
        return self.first()[1]


class LayoutLost(Exception):
    """Raised inside a rule: the op's result has no single per-sample layout (the dispatcher tags it UNKNOWN)."""


RuleFn = Callable[[Call], Tag | Sequence[Tag | None] | None]
_RULES: dict[Any, RuleFn] = {}


def register_layout_rule(*funcs: Any) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering a layout rule for ``funcs`` (replacing earlier rules of the same funcs)."""

    def decorate(rule: RuleFn) -> RuleFn:
        for func in funcs:
            _RULES[func] = rule
        return rule

    return decorate


def lookup(func: Any) -> RuleFn | None:
    return _RULES.get(func)


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = f"Tensor.{getattr(owner, '__name__', '?')}"
    elif getattr(func, "__objclass__", None) is not None:
        name = f"Tensor.{name}"
    return name or repr(func)


def funcs_named(names: Iterable[str], *, tensor: bool = True, torch_ns: bool = True, functional: bool = True) -> list:
    """Every callable by these names in ``torch``, ``torch.nn.functional``, ``torch._C._nn`` and ``Tensor``."""
    import torch.nn.functional as F

    spaces = []
    if torch_ns:
        spaces += [torch, torch.special, torch.linalg]
    if functional:
        spaces += [F, torch._C._nn]
    found = []
    for name in names:
        for space in spaces:
            fn = getattr(space, name, None)
            if fn is not None and callable(fn):
                found.append(fn)
        if tensor:
            method = getattr(Tensor, name, None)
            if method is not None:
                found.append(method.__get__ if isinstance(method, property | type(Tensor.T)) else method)
    return found


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            if isinstance(v, Tensor):
                yield v
            elif isinstance(v, list | tuple):
                yield from (w for w in v if isinstance(w, Tensor))


def broadcast_layout(call: Call, inputs: list[tuple[Tensor, Tag]], out_shape: Sequence[int]) -> Tag:
    """Where the samples of broadcast-aligned inputs land in an output of ``out_shape`` (one place, or MIXED)."""
    nd = len(out_shape)
    found = None
    for t, tag in inputs:
        od = tag.dim + nd - t.dim()
        if od < 0 or od >= nd or t.shape[tag.dim] != out_shape[od]:
            raise LayoutLost(f"{call.name} broadcasts its per-sample argument")
        if found is None:
            found = (od, tag.inner)
        elif found != (od, tag.inner):
            return call.mixed(f"{call.name} combines different samples (their batch dims do not line up)")
    if found is None:
        raise LayoutLost(f"{call.name}: no per-sample argument")
    return call.at(*found)


# Import the rule families (they register themselves).
from . import compute, elementwise, shapes  # noqa: E402,F401

__all__ = ["Call", "LayoutLost", "RuleFn", "broadcast_layout", "funcs_named", "lookup", "register_layout_rule"]
