"""Clip functions, per-group thresholds and the total sensitivity they imply (``docs/MATH.md``, sections
"Clip functions" and "Thresholds and sensitivity").

A clip function maps per-sample norms ``[B]`` of one group and the group's threshold ``R_k`` to per-sample factors
``C_ik`` with ``C_ik * ||g_ik|| <= R_k``. Two are built in:

* ``"abadi"``: ``C = min(1, R / ||g||)`` (``C = 1`` for a zero norm);
* ``"automatic"`` (AUTO-S, Bu et al.): ``C = R / (||g|| + gamma)``, ``gamma = 0.01`` by default.

Adding one: decorate a factory with :func:`register_clip_function` and pass its name (or an instance)::

    @register_clip_function("hard-zero")
    def hard_zero() -> ClipFunction:
        return ClipFunction("hard-zero", lambda norms, r: (norms <= r).to(norms.dtype))

    engine = ClippingEngine(model, clip_fn="hard-zero")

The engine checks the bound ``C * ||g|| <= R`` on every group a registered clip function clips, so a wrong clip
function fails loudly instead of breaking the privacy guarantee -- unless the function declares ``bound_proven``
(the built-ins), which the engine trusts. A user's ``normalized`` form is checked the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FactorFn = Callable[[Tensor, Tensor], Tensor]
# (squared norms in units of the threshold [m, B], thresholds [m, 1] or None, out [m, B] or None) -> factors [m, B]
NormalizedFn = Callable[[Tensor, Tensor | None, Tensor | None], Tensor]


@dataclass(frozen=True)
class ClipFunction:
    """A named clip function ``(norms [B], threshold) -> factors [B]``.

    Attributes:
        name: shown in reports.
        factors: the function.
        bound_proven: the factors satisfy ``C * norm <= R`` by construction (the built-ins), so the engine skips
            its runtime check; leave False for your own functions.
        normalized: optional fast form for many groups at once: ``(q, R, out) -> factors`` where ``q = ||g||^2 /
            R^2`` is ``[groups, B]`` and ``R`` the ``[groups, 1]`` thresholds (given iff ``needs_thresholds``).
            The engine uses it to clip every group that completes at one point with a couple of ops.
        needs_thresholds: ``normalized`` reads ``R``.
    """

    name: str
    factors: FactorFn
    bound_proven: bool = False
    normalized: NormalizedFn | None = None
    needs_thresholds: bool = False

    def __call__(self, norms: Tensor, threshold: Tensor | float) -> Tensor:
        return self.factors(norms, torch.as_tensor(threshold, dtype=norms.dtype, device=norms.device))


def _abadi(norms: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(norms > threshold, threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)


def _abadi_normalized(q: Tensor, thresholds: Tensor | None, out: Tensor | None) -> Tensor:
    # min(1, R / ||g||) = 1 / sqrt(max(1, ||g||^2 / R^2)); a zero norm gives 1.
    return torch.rsqrt(q.clamp_min(1.0), out=out)


def abadi() -> ClipFunction:
    """Abadi et al. clipping: ``min(1, R / ||g||)``."""
    return ClipFunction("abadi", _abadi, bound_proven=True, normalized=_abadi_normalized)


def automatic(gamma: float = 0.01) -> ClipFunction:
    """Automatic clipping (AUTO-S, Bu et al. 2023): ``R / (||g|| + gamma)``.

    Args:
        gamma: stability constant, > 0 (default 0.01).
    """
    if not gamma > 0:
        raise ValueError(f"Expected gamma={gamma} > 0 for automatic clipping.")

    def normalized(q: Tensor, thresholds: Tensor | None, out: Tensor | None) -> Tensor:
        # R / (||g|| + gamma) = 1 / (sqrt(q) + gamma / R)
        return torch.reciprocal(q.clamp_min(0).sqrt().add_(gamma / thresholds), out=out)

    return ClipFunction(
        f"automatic(gamma={gamma})",
        lambda norms, r: r / (norms + gamma),
        bound_proven=True,
        normalized=normalized,
        needs_thresholds=True,
    )


_CLIP_FUNCTIONS: dict[str, Callable[..., ClipFunction]] = {"abadi": abadi, "automatic": automatic}


def register_clip_function(name: str) -> Callable[[Callable[..., ClipFunction]], Callable[..., ClipFunction]]:
    """Register a factory of :class:`ClipFunction` under ``name`` (usable as ``clip_fn=name``)."""

    def decorate(factory: Callable[..., ClipFunction]) -> Callable[..., ClipFunction]:
        _CLIP_FUNCTIONS[name] = factory
        return factory

    return decorate


def get_clip_function(spec: str | ClipFunction, **options: float) -> ClipFunction:
    """Resolve ``spec`` (a registered name, or a :class:`ClipFunction`) with factory ``options`` (e.g. gamma)."""
    if isinstance(spec, ClipFunction):
        return spec
    if spec not in _CLIP_FUNCTIONS:
        raise ValueError(f"Unknown clip_fn={spec!r}; expected one of {sorted(_CLIP_FUNCTIONS)} or a ClipFunction.")
    return _CLIP_FUNCTIONS[spec](**options)


def resolve_thresholds(groups: Sequence[str], max_grad_norm: float | Mapping[str, float]) -> dict[str, float]:
    """Per-group thresholds: explicit per group, or ``R / sqrt(M)`` from a total ``R`` (so the sensitivity is R).

    Raises:
        ValueError: a threshold is not positive and finite, or a mapping misses or invents group names.
    """
    if isinstance(max_grad_norm, Mapping):
        missing = [g for g in groups if g not in max_grad_norm]
        unknown = [g for g in max_grad_norm if g not in groups]
        if missing or unknown:
            raise ValueError(
                f"max_grad_norm must give one threshold per group; missing {missing}, unknown {unknown}. "
                f"Groups are {list(groups)}."
            )
        thresholds = {g: float(max_grad_norm[g]) for g in groups}
    else:
        total = float(max_grad_norm)
        thresholds = {g: total / math.sqrt(len(groups)) for g in groups}
    for group, value in thresholds.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"Expected max_grad_norm for group {group!r}={value} in (0, inf).")
    return thresholds


def sensitivity(thresholds: Mapping[str, float]) -> float:
    """Total L2 sensitivity of one sample's clipped gradient: ``sqrt(sum_k R_k^2)``."""
    return math.sqrt(sum(r * r for r in thresholds.values()))
