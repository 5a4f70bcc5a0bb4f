"""Audit a training recipe end to end: its model, data, grouping, clipping and noise, with black-box canaries.

    result = run_recipe_audit(load_recipe("default"), canaries=1000, steps=None, seed=0)
    print(result.report.summary())            # the claimed epsilon, the one-run lower bound, the verdict

The recipe's task builds the model and the training set exactly as ``groupclip train`` does
(:func:`groupclip.training.tasks.build_task`); the last ``canaries`` training examples are taken out of the
ordinary data and become mislabeled input canaries (:meth:`InputCanaries.mislabeled`: a random wrong label), each
put back into the training set with probability 1/2. The model is trained with the recipe's DP settings
(:func:`groupclip.training.runner.train_private_steps`: Poisson sampling, the recipe's grouping and thresholds, its
noise multiplier or calibrated epsilon, secret noise unless ``privacy.noise_seed`` is set) for ``steps`` steps
(default: the recipe's), and each canary is scored by how much its loss fell. A black-box audit on a real recipe
certifies far less than the white-box one (``groupclip audit``): a bound under the claim proves nothing about its
tightness, a bound above it proves a bug (except with probability alpha).

Recipes whose examples are ``(input, integer label)`` pairs (``image-classification``) are supported.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from .canaries import InputCanaries
from .experiment import AuditConfigError
from .run import Auditor, AuditReport, json_ready


@dataclass(frozen=True)
class RecipeAuditResult:
    """What :func:`run_recipe_audit` found.

    Attributes:
        recipe: the recipe's name.
        canaries: m.
        steps: training steps taken.
        report: bounds and verdict (the claim is the run's epsilon at its delta).
        scores: ``[m]`` canary scores (loss decrease).
        included: ``[m]`` coin flips.
        privacy: the training's privacy summary (epsilon, delta, noise multiplier, noise, grouping, ...).
        seconds: wall time.
    """

    recipe: str
    canaries: int
    steps: int
    report: AuditReport
    scores: np.ndarray
    included: np.ndarray
    privacy: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-canary arrays)."""
        keep = ("epsilon", "delta", "accountant", "noise_multiplier", "noise", "noise_seed", "sample_rate")
        return json_ready(
            {
                "recipe": self.recipe,
                "kind": "black-box (mislabeled input canaries)",
                "canaries": self.canaries,
                "steps": self.steps,
                "report": self.report.to_dict(),
                "privacy": {k: self.privacy.get(k) for k in (*keep, "grouping", "groups", "clip_fn")},
                "seconds": self.seconds,
            }
        )


def _pairs(dataset: Any, task: str) -> None:
    """Raise unless the items are ``(input tensor, integer label)``."""
    item = dataset[0]
    ok = (
        isinstance(item, tuple | list)
        and len(item) == 2
        and all(isinstance(t, Tensor) for t in item)
        and item[1].dim() == 0
        and not item[1].is_floating_point()
    )
    if not ok:
        raise AuditConfigError(
            f"--recipe: the audit needs a classification recipe whose examples are (input, label) pairs "
            f"(e.g. image-classification); task {task!r} has other examples."
        )


def run_recipe_audit(
    recipe: Any, *, canaries: int = 1000, steps: int | None = None, seed: int = 0, alpha: float = 0.05
) -> RecipeAuditResult:
    """Train ``recipe`` (a :class:`~groupclip.training.recipe.Recipe`) with ``canaries`` black-box canaries and
    audit it. ``seed`` seeds the coin flips and the wrong labels; the recipe's ``run.seed`` the rest as usual.

    Raises:
        AuditConfigError: a setting is out of range, the recipe is not a supported kind, or has too few examples.
        groupclip.GroupClipError: the recipe or its privacy settings are wrong (e.g. a non-private recipe).
    """
    from ..training.runner import train_private_steps
    from ..training.tasks import build_task

    start = time.perf_counter()
    if canaries < 4:
        raise AuditConfigError(f"--canaries must be at least 4, got {canaries}")
    if steps is not None and steps < 1:
        raise AuditConfigError(f"--steps must be at least 1, got {steps}")
    if not 0 < alpha < 1:
        raise AuditConfigError(f"--alpha must be in (0, 1), got {alpha}")
    if not recipe.privacy.private:
        raise AuditConfigError(f"--recipe {recipe.name}: the recipe trains without DP (privacy.private = false).")
    torch.manual_seed(recipe.run.seed)
    setup = build_task(recipe.task, recipe.data, recipe.model, recipe.run.seed)
    _pairs(setup.train, recipe.task)
    size = len(setup.train)
    if size <= canaries:
        raise AuditConfigError(
            f"--recipe {recipe.name}: {size} training examples leave none besides {canaries} canaries; use fewer "
            "--canaries or more data."
        )
    rows = [setup.train[i] for i in range(size - canaries, size)]
    inputs, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    with torch.no_grad():
        classes = int(setup.model(inputs[:1]).shape[-1])
    canary_set = InputCanaries.mislabeled(inputs, labels, classes, seed=seed)
    setup = dataclasses.replace(setup, train=canary_set.training_set(Subset(setup.train, range(size - canaries))))
    auditor = Auditor(canary_set, delta=recipe.privacy.delta, alpha=alpha)
    auditor.start(setup.model)
    privacy = train_private_steps(recipe, setup, steps)
    setup.model.to("cpu")  # the canaries are scored on the CPU
    report = auditor.finish(setup.model, claimed_epsilon=privacy["epsilon"])
    return RecipeAuditResult(
        recipe=recipe.name,
        canaries=canaries,
        steps=privacy["steps"],
        report=report,
        scores=auditor.scores(setup.model),
        included=auditor.included,
        privacy=privacy,
        seconds=time.perf_counter() - start,
    )
