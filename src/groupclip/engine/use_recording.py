"""Use recording: what a finished call of a module owning trainable parameters leaves in its trace.

:class:`~groupclip.engine.capture.Capture`'s post-hook hands each such call here. Its samples' layouts are read off
the dataflow tags (or taken from a reentrant checkpoint's first run), its inputs and outputs pass through a tap, and a
:class:`~groupclip.engine.trace.Use` records which parameters it used, how (a rule, or the generic fallback with what
it takes to rebuild the call) and which batch-free uses it derives from. Replays (non-reentrant recomputations) tap
the same tensors and record nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..dataflow.tags import Kind, free, read_tag, write_tag
from ..errors import BatchDimensionError, UnsupportedModuleError
from .trace import BATCHED, FREE, Trace, Use, input_identity

if TYPE_CHECKING:
    from .capture import Frame


class Deferred(NamedTuple):
    """A call's layouts: ``kind`` (batched or batch-free), per tapped tensor its ``(dim, inner)`` (None: batch-free)
    and tag, and the batch-free uses its input derives from."""

    kind: str
    layouts: list
    tags: list
    sources: tuple


class GenericInputs:
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


def params_of(frame: Frame, entry, generic: bool) -> dict[str, nn.Parameter]:
    """The parameters the call used, by local name; for a generic use, less those of submodules that recorded
    their own uses during it."""
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


def classify(entry, args: tuple, kwargs: dict, output: Any, trace: Trace, out_tag=None) -> Deferred:
    """How a call's samples are laid out, read off the tags: ``(kind, layouts, output tags)``."""
    if entry.rule is not None:
        x, output = rule_tensors(entry, args, kwargs, output)
        xtag = read_tag(x, trace.number)
        otag = out_tag if out_tag is not None else read_tag(output, trace.number)
        kind, layout, sources = use_kind(entry, xtag, otag, "input")
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


def recorded(frame: Frame, entry, args, kwargs, output) -> Deferred:
    """The call's layouts: read off the tags now, or recorded when a reentrant checkpoint first ran it."""
    if frame.deferred is None:
        return classify(entry, args, kwargs, output, frame.trace, frame.out_tag)
    if frame.deferred.kind != BATCHED:
        raise BatchDimensionError(
            f"{entry.describe()} is a batch-free use inside a region of a reentrant activation checkpoint, whose "
            "recomputation groupclip cannot follow; use torch.utils.checkpoint with use_reentrant=False."
        )
    return frame.deferred


def record_rule(frame: Frame, entry, args: tuple, kwargs: dict, output: Any) -> Any:
    trace = frame.trace
    x, output = rule_tensors(entry, args, kwargs, output)
    kind, (layout,), (otag,), sources = recorded(frame, entry, args, kwargs, output)
    if trace.replay:
        out = trace.tap(None, [x.detach()], [output])[0]
        write_tag(out, otag if kind == BATCHED else free(trace.number, ()))
        return out
    use = Use(trace, entry.path, entry.module, entry.rule, params_of(frame, entry, False), kind)
    use.layouts = [layout]
    use.upstream = sources
    if entry.rule.right_is_input:
        use.gram_key = input_identity(x)
    out = trace.tap(use, [x.detach()], [output])[0]
    write_tag(out, otag if kind == BATCHED else free(trace.number, (*sources, use.index)))
    return out


def use_kind(entry, tag, out_tag, what: str):
    """``(kind, layout, sources)`` of a use whose ``what`` carries ``tag``; refuses inputs that mix samples."""
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


def record_generic(frame: Frame, entry, args: tuple, kwargs: dict, output: Any) -> Any:
    trace = frame.trace
    leaves, spec = tree_flatten(output)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    if not positions:
        raise UnsupportedModuleError(
            f"{entry.describe()} owns trainable parameters but returned no floating-point tensor, so no gradient "
            "can reach them."
        )
    outputs = [leaves[i] for i in positions]
    kind, layouts, tags, sources = recorded(frame, entry, args, kwargs, output)
    inputs, in_spec = tree_flatten((args, kwargs))
    tensor_slots = [i for i, v in enumerate(inputs) if isinstance(v, Tensor)]
    saved = [inputs[i].detach() for i in tensor_slots]
    if trace.replay:
        tapped = trace.tap(None, saved, outputs)
    else:
        use = Use(trace, entry.path, entry.module, None, params_of(frame, entry, True), kind)
        use.layouts = layouts
        use.upstream = sources
        shapes = [(t.shape, t.dtype, t.device) for t in outputs]
        use.extra = GenericInputs(in_spec, inputs, tensor_slots, frame.random_state, positions, shapes)
        tapped = trace.tap(use, saved, outputs)
        sources = (*sources, use.index)
    for t, layout, tag in zip(tapped, layouts, tags, strict=True):
        write_tag(t, tag if layout is not None else free(trace.number, sources if not trace.replay else ()))
    for i, t in zip(positions, tapped, strict=True):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


def rule_tensors(entry, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor]:
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if not isinstance(x, Tensor) or not isinstance(output, Tensor):
        raise UnsupportedModuleError(
            f"{entry.describe()} was called without a tensor input or returned a non-tensor; its rule needs input "
            "and output tensors."
        )
    return x, output


def _tags_of(leaves, number: int):
    for v in leaves:
        if isinstance(v, Tensor):
            tag = read_tag(v, number)
            if tag is not None:
                yield tag
