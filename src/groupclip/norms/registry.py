"""The registry from layer type to its per-sample gradient rule.

A rule turns what a layer saw in the forward pass (its input) and the gradient of the loss with respect to its
output into per-sample gradient :mod:`contributions <groupclip.norms.contributions>` for the layer's own
parameters. Register a rule for a new layer type with :func:`register_layer`::

    @register_layer(MyLinear)
    def my_linear(module, activation, grad_output, wanted):
        a = activation.reshape(activation.shape[0], -1, 1, module.in_features)
        g = grad_output.reshape(grad_output.shape[0], -1, 1, module.out_features)
        return {"weight": Factored(g, a, module.weight.shape)}

Every module that owns trainable parameters and has no rule is handled by the exact generic fallback
(:mod:`groupclip.norms.generic`), so no parameter is ever dropped; a rule only makes a layer cheaper.

A rule may also declare its :class:`LayerCost` (``register_layer(MyLinear, cost=LayerCost("factored", shape=...))``):
the form of its per-sample gradients, from which the planner (:mod:`groupclip.planning`) predicts the layer's FLOPs
and the bytes the engine keeps for it. A rule without one is costed as instantiating its per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from .contributions import Contribution

RuleFn = Callable[[nn.Module, Tensor, Tensor, Collection[str]], dict[str, Contribution]]
CheckFn = Callable[[nn.Module, str], None]
CostForm = Literal["factored", "indexed", "instantiated"]
COST_FORMS = ("factored", "indexed", "instantiated")


@dataclass(frozen=True)
class FactorShape:
    """Per-sample sizes of one call's factored (or indexed) per-sample gradient.

    Attributes:
        steps: ``T``, the positions summed over (1 for a plain ``[B, p]`` input).
        cols: ``p``, input-side features per block (Embedding: the embedding dim).
        rows: ``d``, output-side features per block (Embedding: the number of rows).
        blocks: independent blocks (a grouped convolution's ``groups``).
    """

    steps: int
    cols: int
    rows: int
    blocks: int = 1


ShapeFn = Callable[[nn.Module, Tensor, Tensor, int], FactorShape]


@dataclass(frozen=True)
class LayerCost:
    """The form of a rule's per-sample gradients, as the planner's cost model needs it.

    Attributes:
        form: ``"factored"``: the weight's per-sample gradient is a sum over ``T`` positions of outer products of
            an output-side (``d``) and an input-side (``p``) factor per block (Linear, convolutions), so the engine
            keeps both factors for a ghost norm when ``T (p + d) < p d`` and instantiates otherwise; a bias is the
            sum of the output-side factor. ``"indexed"``: ``T`` indices into the ``rows`` of a ``[rows, cols]``
            weight (Embedding). ``"instantiated"``: per-sample gradients of every parameter formed at once
            (normalization layers, the generic fallback).
        shape: ``(module, input, output, batch) -> FactorShape`` for ``"factored"`` and ``"indexed"``, from the
            layer's first input tensor and its output in one call with ``batch`` samples.
        operand: ``"input"``: the input-side factor is the layer's input tensor itself (reshaped), so the engine
            keeps that storage, once for every layer reading it; ``"derived"``: a new tensor of ``T * p * blocks``
            elements per sample made from it (a convolution's unfolded patches).
        stacked: ``"instantiated"`` only: the weight's and the bias's per-sample gradients are formed side by side in
            one tensor (normalization layers), kept once for both.
    """

    form: CostForm
    shape: ShapeFn | None = None
    operand: str = "input"
    stacked: bool = False

    def __post_init__(self) -> None:
        if self.form not in COST_FORMS:
            raise ValueError(f"Expected LayerCost form={self.form!r} in {COST_FORMS}.")
        if self.form != "instantiated" and self.shape is None:
            raise ValueError(
                f"LayerCost(form={self.form!r}) needs shape=: a function (module, input, output, batch) -> FactorShape."
            )
        if self.operand not in ("input", "derived"):
            raise ValueError(f"Expected LayerCost operand={self.operand!r} in ('input', 'derived').")


@dataclass(frozen=True)
class LayerRule:
    """How groupclip computes per-sample gradients of one layer type's own parameters.

    Attributes:
        module_type: the layer class.
        contributions: ``(module, activation, grad_output, wanted) -> {param_name: Contribution}`` where
            ``activation`` is the layer's first input and ``grad_output`` the gradient of the loss with respect
            to its output, both with the batch as leading dimension; ``wanted`` names the trainable parameters
            to return.
        check: optional ``(module, path) -> None`` that raises
            :class:`~groupclip.errors.UnsupportedModuleError` for configurations the rule cannot handle.
        right_is_input: the rule's ``Factored.right`` is the layer input itself (reshaped), so layers reading
            the same input tensor (attention q, k, v) can share one Gram ``a a^T`` for their ghost norms.
        rows: which input dims may hold the samples. ``"leading"``: the layer acts on trailing dims only (Linear,
            Embedding, LayerNorm), so any leading dim may, and the engine moves it to dim 0 before calling the rule;
            ``"first"``: only dim 0 (convolutions, GroupNorm), as the layer mixes the others.
        trailing: ``module -> how many trailing input dims the layer acts on`` (Linear 1, LayerNorm its normalized
            dims, Embedding 0; ignored for ``rows="first"``). Given, it declares that the output keeps the input's
            layout whenever the samples lie in the other dims (dim 0 for ``rows="first"``), so such calls run
            untracked inside: a faster forward pass. Leave None if that is not so.
        cost: the form of the per-sample gradients for the planner's cost model (:class:`LayerCost`); None: costed
            as instantiated per-sample gradients of each parameter.

    Whatever the model's layout, the rule sees the layer's own tensors with its batch dim first; when the samples
    are folded into that dim (``[B*T, d]``) the engine regroups the contributions by sample afterwards.
    """

    module_type: type[nn.Module]
    contributions: RuleFn
    check: CheckFn | None = None
    right_is_input: bool = False
    rows: str = "leading"
    trailing: Callable[[nn.Module], int] | None = None
    cost: LayerCost | None = None


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer(
    module_type: type[nn.Module],
    *,
    check: CheckFn | None = None,
    right_is_input: bool = False,
    rows: str = "leading",
    trailing: Callable[[nn.Module], int] | None = None,
    cost: LayerCost | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``fn`` as the per-sample rule of ``module_type`` (replacing any earlier one).

    The keyword arguments are the :class:`LayerRule` attributes of the same names.
    """
    if rows not in ("leading", "first"):
        raise ValueError(f"Expected rows={rows!r} in ('leading', 'first').")
    if cost is not None and not isinstance(cost, LayerCost):
        raise TypeError(f"Expected cost= a groupclip.norms.LayerCost or None; got {type(cost).__name__}.")

    def decorate(fn: RuleFn) -> RuleFn:
        _RULES[module_type] = LayerRule(module_type, fn, check, right_is_input, rows, trailing, cost)
        return fn

    return decorate


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``: its exact type's, or a registered base class's if ``forward`` is inherited.

    A subclass that overrides ``forward`` may compute something else with the same parameters, so it gets
    the generic fallback instead of a rule that could be silently wrong.
    """
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        rule = _RULES.get(base)
        if rule is not None:
            return rule if cls.forward is base.forward else None
    return None


def registered_types() -> tuple[type[nn.Module], ...]:
    """The layer types that have a registered rule."""
    return tuple(_RULES)
