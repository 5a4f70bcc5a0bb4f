"""Per-sample gradient norms and clipped sums, one file per layer family, one registry.

Importing this package registers the built-in rules; Hugging Face's ``Conv1D`` is registered by
:func:`register_transformers_layers` once transformers has been imported.
"""

from . import conv, embedding, linear, normalization  # noqa: F401  (register the built-in rules)
from .contributions import Contribution, Factored, FactorSum, Indexed, Instantiated, combine_uses
from .generic import GENERIC_COST, generic_contributions
from .registry import FactorShape, LayerCost, LayerRule, find_rule, register_layer, registered_types

register_transformers_layers = linear.register_transformers_layers

__all__ = [
    "GENERIC_COST",
    "Contribution",
    "FactorShape",
    "FactorSum",
    "Factored",
    "Indexed",
    "Instantiated",
    "LayerCost",
    "LayerRule",
    "combine_uses",
    "find_rule",
    "generic_contributions",
    "register_layer",
    "register_transformers_layers",
    "registered_types",
]
