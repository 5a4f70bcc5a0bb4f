"""Planning without training: a cost model of every clipping style and a grouping that fits a memory budget.

:func:`trace_model` traces one forward pass of a :class:`Workload` and predicts, per layer and per grouping, the
FLOPs and the bytes the engine keeps, from the per-sample gradient form each layer's rule declares in the norms
registry (:class:`groupclip.norms.LayerCost`). :func:`plan_grouping` proposes the grouping with the fewest groups
whose predicted peak memory fits a budget; ``groupclip plan`` runs it from the command line.
"""

from .costmodel import LayerUse, ModelCost, StylePrediction, layer_cost, style_grouping, trace_model
from .planner import Candidate, Plan, greedy_blocks, parse_bytes, plan_grouping, render_plan
from .workload import Workload, load_factory

__all__ = [
    "Candidate",
    "LayerUse",
    "ModelCost",
    "Plan",
    "StylePrediction",
    "Workload",
    "greedy_blocks",
    "layer_cost",
    "load_factory",
    "parse_bytes",
    "plan_grouping",
    "render_plan",
    "style_grouping",
    "trace_model",
]
