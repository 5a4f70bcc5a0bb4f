"""groupclip: exact group-wise per-sample gradient clipping for differentially private training.

The one ordinary backward pass leaves ``sum_i C_ik g_ik`` in ``param.grad`` for any grouping of the parameters
(all-layer, layer-wise, param-wise, M blocks, explicit, per-device) -- see :class:`ClippingEngine`.
"""

from .clipping import ClipFunction, abadi, automatic, get_clip_function, register_clip_function, sensitivity
from .engine import ClippingEngine, attached
from .errors import (
    AttachError,
    BatchDimensionError,
    GroupClipError,
    GroupingError,
    NonFiniteNormError,
    PassError,
    UnattributedGradientError,
    UnsupportedModuleError,
)
from .fixers import replace_batchnorm
from .grouping import ResolvedGrouping, resolve_grouping
from .norms import register_layer

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "BatchDimensionError",
    "ClipFunction",
    "ClippingEngine",
    "GroupClipError",
    "GroupingError",
    "NonFiniteNormError",
    "PassError",
    "ResolvedGrouping",
    "UnattributedGradientError",
    "UnsupportedModuleError",
    "abadi",
    "attached",
    "automatic",
    "get_clip_function",
    "register_clip_function",
    "register_layer",
    "replace_batchnorm",
    "resolve_grouping",
    "sensitivity",
]
