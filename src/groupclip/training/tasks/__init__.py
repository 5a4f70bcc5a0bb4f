"""The registry of training tasks: each turns a recipe's ``[data]`` and ``[model]`` tables into a :class:`TaskSetup`.

A task builder is ``build(data: dict, model: dict, seed: int) -> TaskSetup``; it checks the keys of both tables
with :func:`take_options` (unknown keys are errors naming the known ones). Register new tasks with
:func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..recipe import RecipeError


@dataclass
class TaskSetup:
    """Everything the runner needs from a task.

    Attributes:
        model: the model to train (float32, on CPU; the runner moves it to the recipe's device).
        train: the training set; items are tuples of tensors (``collate`` batches them).
        loss: ``loss(model, batch) -> Tensor``: the SUM over the batch of the per-sample losses (a scalar).
        evaluate: ``evaluate(model) -> {metric: value}`` on held-out data, on the model's device (see
            :func:`model_device`; the model is put back in train mode).
        headline: the key of ``evaluate``'s result quoted as the run's result (e.g. ``"test_accuracy"``).
        higher_is_better: whether a larger headline is better.
        collate: ``DataLoader`` collate function (``None``: the default stacking).
        batch_accuracy: optional ``batch_accuracy(model, batch, outputs?) -> (correct, count)``; unused if None.
        example_batch: a small batch for resolving execution-order groupings (int M) before training.
        info: facts about the data and model for the run's final metrics (sizes, vocabulary...).
    """

    model: nn.Module
    train: Dataset
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    headline: str
    higher_is_better: bool
    example_batch: Any
    collate: Callable[[list], Any] | None = None
    info: dict[str, Any] | None = None


TaskBuilder = Callable[[dict[str, Any], dict[str, Any], int], TaskSetup]
_TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def add(builder: TaskBuilder) -> TaskBuilder:
        _TASKS[name] = builder
        return builder

    return add


def build_task(task: str, data: dict[str, Any], model: dict[str, Any], seed: int) -> TaskSetup:
    _load_builtin_tasks()
    if task not in _TASKS:
        raise RecipeError(f"Unknown task {task!r}; known tasks: {sorted(_TASKS)}.")
    return _TASKS[task](dict(data), dict(model), seed)


def known_tasks() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def take_options(section: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``given``; a key not in ``defaults`` is a :class:`RecipeError` naming the known ones."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise RecipeError(f"Unknown key(s) {unknown} in [{section}]; this task reads {sorted(defaults)}.")
    return {**defaults, **given}


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists and dicts too) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def _load_builtin_tasks() -> None:
    from . import charlm, image, text, text_probe  # noqa: F401  (registers the built-in tasks)
