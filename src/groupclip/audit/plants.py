"""Deliberately broken configurations of the real training pipeline, to check that the audit catches bugs.

No mocks: each plant goes through groupclip's public objects only.

* ``"no-clipping"`` -- ``clip_fn`` is a :class:`groupclip.ClipFunction` whose factors are all 1 and which claims
  ``bound_proven=True``, so the engine trusts it and skips its runtime bound check: per-sample gradients go
  through unclipped while the noise is still calibrated to the thresholds.
* ``"low-noise"`` -- after :func:`groupclip.make_private`, ``private.gradient_noise_multiplier`` (the z the noise
  std ``z * S`` is computed from at every step) is multiplied by 0.1; the accountant still records the stated
  sigma (``private.noise_multiplier``), so the claimed epsilon is 10x too optimistic in noise terms.
* ``"unclipped-group"`` -- one group is left unclipped while the sensitivity still counts its threshold. Raising
  the group's threshold would raise the noise with it (the std is recomputed from ``engine.sensitivity`` at every
  step), so the plant instead marks the group: it gets a distinctive threshold ``0.75 R / sqrt(G)`` through
  ``max_grad_norm={group: R_k}``, and a ``ClipFunction`` (again ``bound_proven=True``) returns factor 1 whenever it
  is called with that threshold and ``min(1, R / ||g||)`` otherwise. The claimed sensitivity stays
  ``sqrt(sum_k R_k^2)`` -- small -- while that group's gradients pass at full size: the bug of a clip loop that
  skips one group.

Example:
    >>> setup = planted_setup("unclipped-group", ["0", "2"], max_grad_norm=1.0)
    >>> setup.unclipped_group, round(setup.max_grad_norm["0"], 4), round(setup.max_grad_norm["2"], 4)
    ('0', 0.5303, 0.7071)
    >>> round(planted_setup("none", ["0", "2"], max_grad_norm=1.0).sensitivity, 12)   # R / sqrt(2) twice: S = R
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ClipFunction

PLANTS = ("none", "no-clipping", "low-noise", "unclipped-group")
LOW_NOISE_FACTOR = 0.1
_MARK = 0.75  # the unclipped group's threshold, relative to the others': distinct from all of them


class PlantError(RuntimeError):
    """A planted bug could not be planted (the public object it relies on changed) or did not take effect."""


@dataclass(frozen=True)
class PlantedSetup:
    """Arguments for :func:`groupclip.make_private` that plant a bug (or none).

    Attributes:
        plant: one of :data:`PLANTS`.
        clip_fn: ``"abadi"`` or the lying :class:`~groupclip.ClipFunction`.
        max_grad_norm: ``{group: R_k}``: ``R / sqrt(G)`` each (the split ``make_private`` makes of a total R),
            with the marked group's threshold for ``"unclipped-group"``. Explicit, so the audit knows every
            threshold without reading the engine.
        unclipped_group: the group left unclipped (``"unclipped-group"`` only).
    """

    plant: str
    clip_fn: str | ClipFunction
    max_grad_norm: dict[str, float]
    unclipped_group: str | None = None

    @property
    def sensitivity(self) -> float:
        """``sqrt(sum_k R_k^2)``: what one sample may move the clipped sum by, as the noise is calibrated."""
        return math.sqrt(sum(r * r for r in self.max_grad_norm.values()))


def _no_clipping() -> ClipFunction:
    return ClipFunction("planted-no-clipping", factors=lambda norms, r: torch.ones_like(norms), bound_proven=True)


def _skip_marked(marked: float) -> ClipFunction:
    def factors(norms: Tensor, threshold: Tensor) -> Tensor:
        honest = torch.where(norms > threshold, threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
        # The engine passes the threshold in the norms' dtype; isclose absorbs the rounding to float32.
        skip = torch.isclose(threshold, torch.as_tensor(marked, dtype=threshold.dtype), rtol=1e-6, atol=0.0)
        return torch.where(skip, torch.ones_like(honest), honest)

    return ClipFunction("planted-unclipped-group", factors=factors, bound_proven=True)


def planted_setup(
    plant: str, groups: Sequence[str], max_grad_norm: float = 1.0, unclipped_group: str | None = None
) -> PlantedSetup:
    """The ``clip_fn`` and ``max_grad_norm`` to pass to ``make_private`` for ``plant``.

    Args:
        plant: one of :data:`PLANTS`.
        groups: the grouping's group names.
        max_grad_norm: the total threshold R (honest groups get ``R / sqrt(G)``).
        unclipped_group: the group to leave unclipped (default: the first).
    """
    if plant not in PLANTS:
        raise ValueError(f"Unknown plant={plant!r}; expected one of {PLANTS}.")
    if not groups:
        raise ValueError("Expected at least one group.")
    honest = max_grad_norm / math.sqrt(len(groups))
    thresholds = {g: honest for g in groups}
    if plant in ("none", "low-noise"):
        return PlantedSetup(plant, "abadi", thresholds)
    if plant == "no-clipping":
        return PlantedSetup(plant, _no_clipping(), thresholds)
    target = unclipped_group if unclipped_group is not None else groups[0]
    if target not in groups:
        raise ValueError(f"unclipped_group={target!r} is not one of the groups {list(groups)}.")
    thresholds[target] = _MARK * honest
    return PlantedSetup(plant, _skip_marked(thresholds[target]), thresholds, target)


def plant_after_setup(private: Any, plant: str) -> None:
    """Plant what cannot go through ``make_private``'s arguments (``"low-noise"``); other plants: nothing.

    Raises:
        PlantError: ``private`` has no ``gradient_noise_multiplier`` any more (the plant would silently vanish).
    """
    if plant != "low-noise":
        return
    if not hasattr(private, "gradient_noise_multiplier"):
        raise PlantError(
            "PrivateTraining has no attribute 'gradient_noise_multiplier'; the low-noise plant cannot be planted. "
            "Update groupclip.audit.plants to the attribute the noise std is now computed from."
        )
    private.gradient_noise_multiplier = private.gradient_noise_multiplier * LOW_NOISE_FACTOR


def check_planted(private: Any, setup: PlantedSetup, noise_multiplier: float) -> None:
    """After a step, check from ``private.last_metrics`` that the plant took effect, where the metrics tell.

    Checks the noise std (``"noise_std"``, against ``0.1 * noise_multiplier * setup.sensitivity``) for
    ``"low-noise"`` and the mean clip factors (``"mean_clip_factor"``) for the clipping plants; metrics that are
    not reported are not checked (the audit's verdict is then the only evidence).

    Raises:
        PlantError: the metrics show the pipeline ignored the plant.
    """
    metrics: Mapping[str, Any] = getattr(private, "last_metrics", None) or {}
    if setup.plant == "low-noise" and "noise_std" in metrics:
        wanted = LOW_NOISE_FACTOR * noise_multiplier * setup.sensitivity
        if not math.isclose(metrics["noise_std"], wanted, rel_tol=1e-6):
            raise PlantError(
                f"The low-noise plant did not take effect: noise std {metrics['noise_std']}, not {wanted}."
            )
    factors = metrics.get("mean_clip_factor") or {}
    if setup.plant == "no-clipping":
        bad = {g: f for g, f in factors.items() if f != 1.0}
    elif setup.plant == "unclipped-group":
        bad = {g: f for g, f in factors.items() if g == setup.unclipped_group and f != 1.0}
    else:
        bad = {}
    if bad:
        raise PlantError(f"The {setup.plant} plant did not take effect: mean clip factors {bad} are not 1.")
