"""What one forward call of the model recorded: its uses of parameters, and how the batch flows through it.

A :class:`Trace` is made by the root module's forward pre-hook and closed by its forward hook. It is the
:class:`~groupclip.dataflow.mode.TraceHost` of the batch tracker: it knows the batch size, creates aliases for
parameters used raw, and creates the meeting taps where batch-free tensors meet per-sample data.

A :class:`Use` is one call of a module owning trainable parameters (or one raw use of a parameter). Its per-sample
gradient contributions are computed when its tap's backward runs. Nothing here holds a tensor of the forward pass:
activations live in the taps' saved tensors (freed with the graph, recomputed under activation checkpointing), and
graph nodes are held weakly, so an abandoned forward pass frees everything with its graph.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..dataflow.tags import Tag, free, write_tag
from ..errors import BatchDimensionError
from .taps import MeetingTap, UseTap, UseTap1

if TYPE_CHECKING:
    from .core import ClippingEngine

_NUMBERS = itertools.count(1)

BATCHED, FREE, RAW = "batched", "free", "raw"


class Use:
    """One recorded use of parameters (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "consumers",
        "done",
        "engine",
        "extra",
        "gram_key",
        "index",
        "kind",
        "layouts",
        "module",
        "n_out",
        "node",
        "output",
        "params",
        "path",
        "promoted",
        "rule",
        "sample_grads",
        "trace",
        "upstream",
    )  # fmt: skip

    def __init__(self, trace: Trace, path: str, module: nn.Module | None, rule, params: dict, kind: str) -> None:
        self.engine = trace.engine
        self.trace = trace
        self.index = len(trace.uses)
        self.path = path
        self.module = module
        self.rule = rule
        self.params = params  # name relative to the module -> the attach-time parameter
        self.kind = kind
        self.layouts: list[tuple[int | None, int]] = []  # per tapped output (or the input, for rules)
        self.node: Any = None  # weak reference to the tap's node
        self.n_out = 0
        self.output: Any = None  # weak reference to the tapped output (a batch-free use's meeting partner)
        self.consumers = 0
        self.promoted: tuple[int, int] | None = None  # a batch-free use whose rows turned out to be samples
        self.upstream: tuple[int, ...] = ()  # batch-free uses its input derives from
        self.sample_grads: list[Tensor | None] | None = None
        self.extra: Any = None  # generic fallback: how to rebuild its inputs, random state, output positions
        self.gram_key: tuple | None = None  # input identity shared by rules that can share its Gram
        self.done = False
        trace.uses.append(self)

    def describe(self) -> str:
        owner = f"{self.path or '<root>'} ({type(self.module).__name__})" if self.module is not None else self.path
        return f"{owner} [{', '.join(self.params)}]"

    def edges(self) -> list:
        """The gradient edges of this use's tapped outputs (empty if its graph is gone)."""
        node = self.node() if self.node is not None else None
        return [] if node is None else [torch.autograd.graph.GradientEdge(node, k) for k in range(self.n_out)]


class Meeting:
    """Where a batch-free tensor meets per-sample data: splits the gradient there by sample, pulls it back.

    ``what == "expanded"``: the batch-free ``operand`` entered an elementwise op broadcast explicitly along the
    batch; the tap sits on that expanded copy, which only this op consumes. ``what == "masked"``: the tap sits on the
    op's per-sample result; the op consumed ``aliases`` -- views of the batch-free operands made for it alone -- so
    the op's own share of their gradient can be taken there, one sample at a time. Either way the per-sample
    gradients of the batch-free operands are then pulled back through their (batch-free) history only.
    """

    __slots__ = ("aliases", "engine", "layout", "operand", "shape", "sources", "trace", "what")
    # aliases: (the op's view of an operand, the operand)

    def __init__(self, trace: Trace, operand: Tensor, sources: tuple[int, ...], layout, what: str, shape) -> None:
        self.engine = trace.engine
        self.trace = trace
        self.operand = operand  # expanded: the batch-free operand; masked: the op's result
        self.sources = sources
        self.layout = layout  # (dim, inner) of the tapped tensor
        self.what = what
        self.shape = shape  # the operand's shape (expanded: before expansion)
        self.aliases: list[tuple[Tensor, Tensor]] = []  # masked: (the op's view of an operand, the operand)

    def on_grad(self, grad: Tensor) -> None:
        self.engine.on_meeting_grad(self, grad)


def promoted_source(trace: Trace, operand: Tensor) -> Use | None:
    """The promoted use whose output ``operand`` is (see :meth:`Trace.aligned`)."""
    tag = getattr(operand, "_groupclip_tag", None)
    if tag is None or len(tag.sources) != 1:
        return None
    use = trace.uses[tag.sources[0]]
    return use if use.promoted is not None and use.output is not None and use.output() is operand else None


class Trace:
    """One recorded forward call of the model (see the module docstring)."""

    def __init__(
        self, engine: ClippingEngine, batch: int, loss_scale: float, replay: bool = False, number: int | None = None
    ) -> None:
        self.engine = engine
        self.number = next(_NUMBERS) if number is None else number
        self.batch = batch
        self.loss_scale = loss_scale
        self.replay = replay  # a non-reentrant checkpoint recomputation: taps as before, records nothing
        self.uses: list[Use] = []
        self.deferred: dict[int, int] = {}  # param id -> calls under no_grad (a reentrant checkpoint recomputes them)
        self.deferred_calls: dict[int, Any] = {}  # id(module) -> its no_grad calls' layouts, in order
        self.forward_done = False
        self.state: Any = None  # the backward state that took this trace
        self.activation_bytes = 0
        self._activation_storages: set[int] = set()

    # ------------------------------------------------------------------ TraceHost
    def trainable(self, param: Tensor) -> bool:
        """A trainable parameter of the model (used raw: outside a recorded call of its module) with grad on."""
        return id(param) in self.engine.trainable_ids and torch.is_grad_enabled()

    def raw_alias(self, param: nn.Parameter) -> Tensor:
        """A batch-free alias of a parameter used outside a call of its module (per-sample gradients attributed)."""
        name = self.engine.parameter_name(param)
        use = Use(self, name, None, None, {name: param}, RAW)
        alias = self.tap(use, [], [param.detach()])[0]
        write_tag(alias, free(self.number, (use.index,)))
        return alias

    def expanded_meeting(self, operand: Tensor, expanded: Tensor, sources: tuple[int, ...], tag: Tag) -> Tensor:
        meeting = Meeting(self, operand, sources, (tag.dim, tag.inner), "expanded", tuple(operand.shape))
        out = MeetingTap.apply(meeting, self.engine.anchor, expanded)
        write_tag(out, tag)
        return out

    def masked_meeting(self, output: Tensor, tag: Tag, aliases: list[tuple[Tensor, Tensor]], call: str) -> Tensor:
        meeting = Meeting(self, output, (), (tag.dim, tag.inner), "masked", tuple(output.shape))
        meeting.aliases = aliases
        out = MeetingTap.apply(meeting, self.engine.anchor, output)
        write_tag(out, tag)
        return out

    def refuse(self, message: str, sources: tuple[int, ...]) -> None:
        where = ", ".join(self.uses[s].describe() for s in sources) or "a parameter"
        raise BatchDimensionError(
            f"{message}. The batch-free tensor comes from {where}. groupclip recovers per-sample gradients of a "
            "batch-free tensor where it meets per-sample data elementwise or in an op with a layout rule; "
            "see groupclip.dataflow.register_layout_rule."
        )

    def checkpointed(self) -> bool:
        from .capture import in_checkpoint_region

        return in_checkpoint_region()

    def consumed(self, tensor: Tensor, sources: tuple[int, ...]) -> None:
        for s in sources:
            use = self.uses[s]
            if use.output is not None and use.output() is tensor:
                use.consumers += 1
                if use.consumers > 1:
                    use.promoted = None  # a second consumer: its gradient is no longer one sample's per row

    def aligned(self, tensor: Tensor, sources: tuple[int, ...], layout: tuple[int, int]) -> None:
        """``tensor`` meets per-sample data elementwise, row for row along ``layout``: if it is the output of one
        batch-free use of constants and this is its first consumer, that use is *promoted* -- its rows are
        samples, like a per-sample use's -- unless a later op consumes the output too."""
        if len(sources) != 1:
            return
        use = self.uses[sources[0]]
        if use.output is None or use.output() is not tensor or use.consumers != 1 or use.kind == RAW:
            return
        if use.upstream:  # its input derives from other batch-free uses, which need their own per-sample gradients
            return
        if use.rule is None and len(use.layouts) != 1:
            return
        use.promoted = layout

    # ------------------------------------------------------------------ recording
    def tap(self, use: Use | None, saved: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        """Pass ``outputs`` through a tap saving ``saved``; returns the tapped outputs."""
        engine = self.engine
        for t in saved:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._activation_storages:
                self._activation_storages.add(storage.data_ptr())
                self.activation_bytes += storage.nbytes()
        with engine.tracker_paused():
            if len(saved) == 1 and len(outputs) == 1:
                tapped = [UseTap1.apply(engine.anchor, saved[0], outputs[0])]
                tapped[0].grad_fn.use = use if not self.replay else None
            else:
                out = UseTap.apply(use if not self.replay else None, engine.anchor, len(saved), *saved, *outputs)
                tapped = list(out) if isinstance(out, tuple) else [out]
        if use is not None and tapped:
            use.node = weakref.ref(tapped[0].grad_fn)
            use.output = weakref.ref(tapped[0])
            use.n_out = len(tapped)
        return tapped

    def fulfil(self, params) -> None:
        """A reentrant checkpoint's recomputation recorded calls deferred under no_grad."""
        for p in params:
            if self.deferred.get(id(p), 0) > 0:
                self.deferred[id(p)] -= 1

    def defer(self, params) -> None:
        for p in params:
            self.deferred[id(p)] = self.deferred.get(id(p), 0) + 1


_INPUTS = itertools.count(1)


def input_identity(t: Tensor) -> int:
    """A number for this tensor object, the same for every layer that reads it (q, k, v share one Gram)."""
    number = getattr(t, "_groupclip_input", None)
    if number is None:
        number = next(_INPUTS)
        t._groupclip_input = number
    return number
