"""DP training of a recipe through :func:`groupclip.make_private`: the grouping, the loop, and the privacy summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adaptive import AdaptiveClipping
from ..grouping import needs_execution_order, resolve_grouping, trainable_parameters
from ..private import make_private
from ..sampling import expected_steps, physical_batches
from .launch import Launch, resolve_device
from .loop import TrainingLoop, batch_size_of, global_sums
from .recipe import Recipe
from .tasks import TaskSetup, to_device

SECRET_NOISE = "secret (OS entropy)"
SEEDED_NOISE = "reproducible (seeded)"


def execution_order(model: nn.Module, run_forward: Callable[[], Any]) -> list[str]:
    """Canonical names of the trainable parameters in the order their modules first run in ``run_forward()``."""
    names = {id(p): n for n, p in trainable_parameters(model).items()}
    order: list[str] = []
    seen: set[int] = set()

    def record(module: nn.Module, _inputs: Any) -> None:
        for p in module.parameters(recurse=False):
            if id(p) in names and id(p) not in seen:
                seen.add(id(p))
                order.append(names[id(p)])

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return order


def grouping_for(recipe: Recipe, setup: TaskSetup, distributed: bool = False) -> Any:
    """The grouping spec for :func:`make_private`; an int M is resolved up front when adaptive thresholds or a
    data-parallel launch need the groups before the first forward pass."""
    spec = recipe.clipping.grouping
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if not (needs_execution_order(spec) and (recipe.clipping.adaptive or distributed)):
        return spec
    order = execution_order(setup.model, lambda: setup.loss(setup.model, setup.example_batch))
    group_of = resolve_grouping(setup.model, spec, order).group_of()
    return lambda name, _param: group_of[name]


class PrivateLoop(TrainingLoop):
    """DP training through :func:`make_private` (Poisson sampling, clipping in the one backward, noise, accounting)."""

    def __init__(self, recipe: Recipe, setup: TaskSetup, launch: Launch) -> None:
        super().__init__(recipe, setup, launch)
        privacy, clipping = recipe.privacy, recipe.clipping
        adaptive = (
            AdaptiveClipping(
                target_quantile=clipping.target_quantile,
                learning_rate=clipping.adaptive_lr,
                rescale=clipping.adaptive_rescale,
            )
            if clipping.adaptive
            else None
        )
        calibrate = privacy.noise_multiplier is None
        # run.seed seeds the model and the data order; the noise and the Poisson sampling stay secret (OS entropy)
        # unless the recipe opts into privacy.noise_seed.
        self.private = make_private(
            self.model,
            self.optimizer,
            grouping=grouping_for(recipe, setup, launch.distributed),
            max_grad_norm=clipping.max_grad_norm,
            clip_fn=clipping.clip_fn,
            clip_options={"gamma": clipping.automatic_gamma} if clipping.clip_fn == "automatic" else None,
            loss_reduction="sum",
            norm_mode=clipping.norm_mode,
            noise_multiplier=privacy.noise_multiplier,
            target_epsilon=privacy.epsilon if calibrate else None,
            target_delta=privacy.delta,
            epochs=recipe.schedule.epochs,
            batch_size=recipe.schedule.batch_size,
            data_size=self.data_size,
            accountant=privacy.accountant,
            adaptive=adaptive,
            noise_seed=privacy.noise_seed,
            distributed=launch.distributed,
        )
        self.extra_ledger_steps = 0
        try:
            self.loader = self.private.poisson_loader(setup.train, collate_fn=setup.collate)
        except BaseException:
            self.private.detach()  # no hooks left behind on the user's model and optimizer
            raise

    def planned_steps(self) -> int:
        return expected_steps(self.recipe.schedule.batch_size / self.data_size, self.recipe.schedule.epochs)

    def batches(self):
        return iter(self.loader)

    def step(self, batch: Any) -> dict[str, Any]:
        size = batch_size_of(batch)
        total = 0.0
        for chunk in physical_batches(batch, self.recipe.schedule.physical_batch_size):
            loss = self.setup.loss(self.model, chunk)
            loss.backward()
            total += float(loss.detach())
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # noise once per logical batch, divided by the expected batch size
        self.optimizer.zero_grad(set_to_none=True)
        total, size = global_sums(self.launch, total, size, self.device)
        metrics = self.private.last_metrics
        clipped = metrics.get("fraction_clipped") or {}
        record: dict[str, Any] = {
            "loss": total / size if size else None,
            "batch_size": size,
            "lr": lr,
            "fraction_clipped": sum(clipped.values()) / len(clipped) if clipped else None,
        }
        if self.recipe.clipping.adaptive:
            record["thresholds"] = metrics.get("thresholds")
        return record

    def epsilon(self) -> float | None:
        try:
            return self.private.epsilon()
        except ImportError:  # dp-accounting is not installed
            return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "private": self.private.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra_ledger_steps": self.extra_ledger_steps,
        }

    def load_state_dict(self, state: dict[str, Any], lost_steps: int) -> None:
        self.private.load_state_dict(state["private"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.extra_ledger_steps = int(state["extra_ledger_steps"])
        noise = state["private"].get("noise") or {}
        if noise.get("secure", True):
            # Not replayable: the steps after the checkpoint get fresh noise when taken again, so those that may
            # have been released before the kill are charged too (see the module docstring).
            self.private.accountant.step(self.private.noise_multiplier, self.private.sample_rate, lost_steps)
            self.extra_ledger_steps += lost_steps

    def privacy_summary(self) -> dict[str, Any]:
        engine = self.private.engine
        noise_seed = self.recipe.privacy.noise_seed
        return {
            "private": True,
            "epsilon": self.epsilon(),
            "delta": self.private.delta,
            "accountant": self.recipe.privacy.accountant,
            "noise_multiplier": self.private.noise_multiplier,
            "gradient_noise_multiplier": self.private.gradient_noise_multiplier,
            "noise": SEEDED_NOISE if noise_seed is not None else SECRET_NOISE,
            "noise_seed": noise_seed,
            "sample_rate": self.private.sample_rate,
            "expected_batch_size": self.private.expected_batch_size,
            "planned_steps": self.planned_steps(),
            "extra_ledger_steps": self.extra_ledger_steps,
            "grouping": str(self.recipe.clipping.grouping),
            "groups": len(engine.grouping.groups) if engine.grouping is not None else None,
            "clip_fn": self.recipe.clipping.clip_fn,
            "adaptive": self.recipe.clipping.adaptive,
            "final_thresholds": dict(engine.thresholds),
            "sensitivity": engine.sensitivity,
            "peak_kept_mb": engine.peak_held_bytes / 2**20,
        }

    def close(self) -> None:
        self.private.detach()


def train_private_steps(recipe: Recipe, setup: TaskSetup, steps: int | None = None) -> dict[str, Any]:
    """Train ``setup.model`` in place with ``recipe``'s DP settings for ``steps`` steps (default: the recipe's);
    no run folder, no evaluation, no checkpoints. Returns the privacy summary (epsilon, delta, noise, ...) and the
    steps taken. Used by ``groupclip audit --recipe``, which puts canaries into ``setup.train`` first."""
    device = resolve_device(recipe.run.device)
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, device=str(device)))
    setup.model.to(device)
    loop = PrivateLoop(recipe, setup, Launch())
    total = loop.total_steps if steps is None else steps
    taken = 0
    try:
        while taken < total:
            for batch in loop.batches():
                loop.step(to_device(batch, device))
                loop.scheduler.step()
                taken += 1
                if taken >= total:
                    break
        return {**loop.privacy_summary(), "steps": taken}
    finally:
        loop.close()
