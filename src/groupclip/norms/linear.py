"""Per-sample rules for linear layers: ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2).

Weight gradient of sample i: ``G_i = g_i^T a_i`` (Linear, weight ``[out, in]``) or ``a_i^T g_i`` (Conv1D, weight
``[in, out]``), with every non-batch, non-feature dimension of the input treated as a sequence dimension T.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

from torch import Tensor, nn

from .contributions import Contribution, Factored, FactorSum
from .registry import FactorShape, LayerCost, register_layer, registered_types


def _as_sequence(t: Tensor, features: int) -> Tensor:
    """``[B, ..., features]`` -> ``[B, T, 1, features]``."""
    return t.reshape(t.shape[0], -1, 1, features)


def linear_contributions(
    weight_shape, activation: Tensor, grad_output: Tensor, wanted: Collection[str], *, transposed: bool
) -> dict[str, Contribution]:
    d_in = activation.shape[-1]
    d_out = grad_output.shape[-1]
    a = _as_sequence(activation, d_in)
    g = _as_sequence(grad_output, d_out)
    side = ("right" if transposed else "left") if "bias" in wanted else None
    weight = (
        Factored(a, g, weight_shape, bias_side=side) if transposed else Factored(g, a, weight_shape, bias_side=side)
    )
    out: dict[str, Contribution] = {}
    if "weight" in wanted:
        out["weight"] = weight
    if "bias" in wanted:
        out["bias"] = FactorSum(weight, (d_out,))
    return out


def linear_shape(module: nn.Module, activation: Tensor, output: Tensor, batch: int) -> FactorShape:
    """``T`` (every non-batch, non-feature input dim), ``p`` = input features, ``d`` = output features."""
    cols = activation.shape[-1]
    per_sample = activation.shape[0] == batch if activation.dim() > 1 else False
    steps = max(1, activation.numel() // (batch * cols)) if per_sample else max(1, activation.numel() // max(cols, 1))
    return FactorShape(steps=steps, cols=cols, rows=output.shape[-1])


LINEAR_COST = LayerCost("factored", shape=linear_shape, operand="input")


@register_layer(nn.Linear, right_is_input=True, trailing=lambda m: 1, cost=LINEAR_COST)
def linear(module: nn.Linear, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
    return linear_contributions(module.weight.shape, activation, grad_output, wanted, transposed=False)


def register_transformers_layers() -> None:
    """Register Hugging Face's ``Conv1D`` if transformers is already imported.

    A model that contains ``Conv1D`` was built by an imported transformers, so groupclip never imports it
    itself (it is an optional dependency, and slow to import). Without a rule, Conv1D would still be handled
    exactly by the generic fallback.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    Conv1D = getattr(module, "Conv1D", None)
    if Conv1D is None or Conv1D in registered_types():
        return

    @register_layer(Conv1D, trailing=lambda m: 1, cost=LINEAR_COST)
    def hf_conv1d(module: nn.Module, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
        return linear_contributions(module.weight.shape, activation, grad_output, wanted, transposed=True)
