"""What a tensor of the forward pass is, as far as samples go: its *tag*.

A tensor is per-sample if and only if it derives from the batched inputs of the forward pass -- never because a
size happens to equal the batch size. Tags are attached to tensors as the forward pass runs (see
:mod:`groupclip.dataflow.mode`); an untagged tensor is a constant (parameters, buffers, anything built without the
batch).

Kinds:

* ``BATCHED`` -- per-sample data with a known *layout*: dimension ``dim`` has size ``outer * B * inner`` and
  index ``k`` of it belongs to sample ``(k // inner) % B``. The plain batch axis is ``(dim=0, inner=1)``; OPT's
  tokens folded into rows (``[B*T, d]``) are ``(0, T)``; attention heads folded into the batch (``[B*H, T, T]``)
  are ``(0, H)``. ``dim=None`` means "every element belongs to sample 0" and occurs only when ``B == 1``.
* ``FREE`` -- derives from batch-free uses of trainable parameters (T5's relative attention bias, DeBERTa's
  relative embeddings, a raw parameter), but not from the batch. ``sources`` are the uses it derives from; their
  per-sample gradients are recovered where the tensor first meets per-sample data.
* ``REDUCED`` -- a sum or mean over samples (a loss).
* ``UNKNOWN`` -- per-sample data whose layout an op without a layout rule lost (``why`` names the op).
* ``MIXED`` -- samples combined non-linearly (batch statistics, a softmax over the batch); ``why`` names the op.

Tags hold the number of the forward trace they belong to, not the trace itself, so a tensor never keeps a trace
(or through it, the autograd graph) alive; a tag of another trace reads as "constant".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from torch import Tensor

ATTRIBUTE = "_groupclip_tag"


class Kind(IntEnum):
    BATCHED = 1
    FREE = 2
    REDUCED = 3
    UNKNOWN = 4
    MIXED = 5


@dataclass(frozen=True, slots=True)
class Tag:
    """The sample structure of one tensor of one forward trace (see the module docstring)."""

    trace: int
    kind: Kind
    dim: int | None = 0
    inner: int = 1
    sources: tuple[int, ...] = ()
    why: str = ""

    @property
    def per_sample(self) -> bool:
        """Carries sample data (anything but FREE)."""
        return self.kind != Kind.FREE

    def describe(self) -> str:
        if self.kind == Kind.BATCHED:
            if self.dim is None:
                return "per-sample (batch of one)"
            return f"per-sample along dim {self.dim}" + (f" (groups of {self.inner})" if self.inner > 1 else "")
        if self.kind == Kind.FREE:
            return "batch-free"
        return {Kind.REDUCED: "summed over samples", Kind.UNKNOWN: "per-sample with an unknown layout"}.get(
            self.kind, "mixing samples"
        ) + (f" ({self.why})" if self.why else "")


def read_tag(tensor: Tensor, trace: int) -> Tag | None:
    """The tag of ``tensor`` in trace number ``trace``, or None (a constant)."""
    tag = getattr(tensor, ATTRIBUTE, None)
    return tag if tag is not None and tag.trace == trace else None


def write_tag(tensor: Tensor, tag: Tag | None) -> None:
    if tag is None:
        if getattr(tensor, ATTRIBUTE, None) is not None:
            setattr(tensor, ATTRIBUTE, None)
        return
    setattr(tensor, ATTRIBUTE, tag)


def batched(trace: int, dim: int | None, inner: int = 1) -> Tag:
    return Tag(trace, Kind.BATCHED, dim, inner)


def free(trace: int, sources: tuple[int, ...]) -> Tag:
    return Tag(trace, Kind.FREE, None, 1, tuple(sorted(set(sources))))


def lost(trace: int, kind: Kind, why: str) -> Tag:
    return Tag(trace, kind, None, 1, (), why)
