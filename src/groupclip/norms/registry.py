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
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from torch import Tensor, nn

from .contributions import Contribution

RuleFn = Callable[[nn.Module, Tensor, Tensor, Collection[str]], dict[str, Contribution]]
CheckFn = Callable[[nn.Module, str], None]


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

    Whatever the model's layout, the rule sees the layer's own tensors with its batch dim first; when the samples
    are folded into that dim (``[B*T, d]``) the engine regroups the contributions by sample afterwards.
    """

    module_type: type[nn.Module]
    contributions: RuleFn
    check: CheckFn | None = None
    right_is_input: bool = False
    rows: str = "leading"
    trailing: Callable[[nn.Module], int] | None = None


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer(
    module_type: type[nn.Module],
    *,
    check: CheckFn | None = None,
    right_is_input: bool = False,
    rows: str = "leading",
    trailing: Callable[[nn.Module], int] | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``fn`` as the per-sample rule of ``module_type`` (replacing any earlier one)."""
    if rows not in ("leading", "first"):
        raise ValueError(f"Expected rows={rows!r} in ('leading', 'first').")

    def decorate(fn: RuleFn) -> RuleFn:
        _RULES[module_type] = LayerRule(module_type, fn, check, right_is_input, rows, trailing)
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
