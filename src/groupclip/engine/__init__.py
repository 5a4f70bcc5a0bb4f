"""The clipping engine (see :mod:`groupclip.engine.core`)."""

from .core import ClippingEngine, attached
from .report import ClipReport
from .settings import LossReduction, NormMode

__all__ = ["ClipReport", "ClippingEngine", "LossReduction", "NormMode", "attached"]
