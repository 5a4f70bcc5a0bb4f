"""groupclip: exact group-wise per-sample gradient clipping for differentially private training.

The one ordinary backward pass leaves ``sum_i C_ik g_ik`` in ``param.grad`` for any grouping of the parameters
(all-layer, layer-wise, param-wise, M blocks, explicit, per-device) -- see :class:`ClippingEngine`.
"""

from . import distributed as _distributed  # noqa: F401  (registers the distributed topologies)
from .accounting import PrivacyAccountant, UnreachableEpsilonError, calibrate_noise_multiplier, compute_epsilon
from .adaptive import AdaptiveClipping
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
from .noise import GaussianNoise, ReproducibleNoiseWarning
from .norms import register_layer
from .privacy_plan import PrivacyPlan, plan_privacy
from .private import LossReductionError, PrivacySetupError, PrivateTraining, check_loss_reduction, make_private
from .sampling import FixedSizeBatchesWarning, PoissonBatchSampler, physical_batches, poisson_loader, shuffled_loader
from .topology import Topology

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipping",
    "AttachError",
    "BatchDimensionError",
    "ClipFunction",
    "ClippingEngine",
    "FixedSizeBatchesWarning",
    "GaussianNoise",
    "GroupClipError",
    "GroupingError",
    "LossReductionError",
    "NonFiniteNormError",
    "PassError",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "PrivacyPlan",
    "PrivacySetupError",
    "PrivateTraining",
    "ReproducibleNoiseWarning",
    "ResolvedGrouping",
    "Topology",
    "UnattributedGradientError",
    "UnreachableEpsilonError",
    "UnsupportedModuleError",
    "abadi",
    "attached",
    "automatic",
    "calibrate_noise_multiplier",
    "check_loss_reduction",
    "compute_epsilon",
    "get_clip_function",
    "make_private",
    "physical_batches",
    "plan_privacy",
    "poisson_loader",
    "register_clip_function",
    "register_layer",
    "replace_batchnorm",
    "resolve_grouping",
    "sensitivity",
    "shuffled_loader",
]
