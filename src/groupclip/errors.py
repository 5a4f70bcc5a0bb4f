"""Typed errors raised by groupclip.

Every error names what went wrong (module path, parameter name or argument) and how to fix it. They all
derive from :class:`GroupClipError`, and each also derives from the built-in exception a caller would
expect (``ValueError`` for bad input, ``RuntimeError`` for a misuse detected while training).
"""

from __future__ import annotations


class GroupClipError(Exception):
    """Base class of every error groupclip raises on purpose."""


class UnsupportedModuleError(GroupClipError, ValueError):
    """A module cannot be handled exactly (it mixes samples, or uses a construct with no per-sample form)."""


class GroupingError(GroupClipError, ValueError):
    """A grouping leaves parameters out, puts one in two groups, or is malformed."""


class BatchDimensionError(GroupClipError, ValueError):
    """A module saw a tensor whose leading dimension is not the batch (so per-sample gradients are unknown)."""


class NonFiniteNormError(GroupClipError, FloatingPointError):
    """A per-sample gradient norm is NaN or infinite; no gradient was written for the step."""


class AttachError(GroupClipError, RuntimeError):
    """The engine was attached twice, used while detached, or attached to a model another engine owns."""


class UnattributedGradientError(GroupClipError, RuntimeError):
    """Autograd computed a gradient for a trainable parameter outside the forward of the modules that own it.

    Such a gradient is already summed over the batch, so it cannot be clipped per sample.
    """


class PassError(GroupClipError, RuntimeError):
    """Forward and backward passes did not pair up (backward of a superseded forward, backward twice, ...)."""


class DistributedSetupError(GroupClipError, ValueError):
    """Ranks disagree on settings that must match (grouping, privacy, thresholds), or a grouping does not fit the
    process layout (a group split across pipeline stages). Raised on every rank, never on one alone."""
