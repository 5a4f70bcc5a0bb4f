"""The optimizer and the learning-rate schedule of a recipe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..grouping import trainable_parameters
from .recipe import OptimizerConfig, RecipeError, ScheduleConfig


def build_optimizer(config: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over the model's trainable parameters."""
    params = list(trainable_parameters(model).values())
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name in ("adam", "adamw"):
        cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
        return cls(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    raise RecipeError(f"[optimizer] name = {config.name!r}: expected 'sgd', 'adam' or 'adamw'.")


def lr_factor(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each step: linear warm-up, then constant / cosine / linear."""
    if schedule.lr_schedule not in ("constant", "cosine", "linear"):
        raise RecipeError(f"[schedule] lr_schedule = {schedule.lr_schedule!r}: expected constant, cosine or linear.")
    warmup = schedule.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        rest = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / rest)
        if schedule.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule.lr_schedule == "linear":
            return 1 - progress
        return 1.0

    return factor
