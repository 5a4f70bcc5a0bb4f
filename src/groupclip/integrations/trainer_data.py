"""The data side of :class:`~groupclip.integrations.transformers.PrivateTrainer`: the Poisson loader's options and
epochs, and the physical batches of a Poisson batch (rows, ordered by length, trailing padding dropped)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback, TrainingArguments

from .trainer_errors import TrainerSetupError


class PoissonEpochs(TrainerCallback):
    """Starts each epoch's Poisson pass afresh.

    The Trainer draws exactly ``len(loader)`` batches per epoch and never exhausts the loader's iterator, which
    is what resets the sampler's position; so the position is reset here, at the start of each epoch (a resumed
    epoch has a position below the end and is left alone).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        private = self.trainer.private
        sampler = private.sampler if private is not None else None
        if sampler is None:
            return
        current = sampler.state_dict()
        if current["position"] >= len(sampler):
            sampler.load_state_dict({**current, "position": 0})


def poisson_loader_options(args: TrainingArguments) -> dict[str, Any]:
    """The ``DataLoader`` options of ``TrainingArguments`` that a Poisson loader keeps (workers, pinning, prefetch);
    warns that worker processes make a resume inexact."""
    loader_kwargs: dict[str, Any] = {"num_workers": args.dataloader_num_workers}
    if args.dataloader_pin_memory and torch.cuda.is_available() and args.device.type == "cuda":
        loader_kwargs["pin_memory"] = True
    if args.dataloader_num_workers > 0:
        loader_kwargs["persistent_workers"] = args.dataloader_persistent_workers
        if args.dataloader_prefetch_factor is not None:
            loader_kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
        if args.save_strategy != "no":
            warnings.warn(
                f"dataloader_num_workers={args.dataloader_num_workers}: the workers draw Poisson batches ahead of "
                "training, so a checkpoint's sampler state is ahead of the last step and a run resumed from it "
                "skips those batches (the accountant counts every drawn batch, so epsilon errs on the safe "
                "side). Use dataloader_num_workers=0 for an exact resume.",
                stacklevel=3,
            )
    return loader_kwargs


def batch_rows(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "labels"):
        if isinstance(batch.get(key), Tensor):
            return batch[key].shape[0]
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise TrainerSetupError(f"The batch (keys {sorted(batch)}) holds no tensor with a batch dimension.")


def attended_widths(mask: Tensor) -> Tensor:
    """Per row, one past the last attended position (0 for a row with no attended position)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask != 0) * positions).amax(1)


def by_length(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The batch's rows ordered by attended width, longest first (stable), so physical batches pad little."""
    order = torch.argsort(attended_widths(batch["attention_mask"]), descending=True, stable=True)
    return {
        key: value[order] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size else value
        for key, value in batch.items()
    }


def without_trailing_padding(chunk: dict[str, Any]) -> dict[str, Any]:
    """Drop the trailing columns that no row of ``chunk`` attends to, from every ``[rows, columns, ...]`` tensor."""
    mask = chunk["attention_mask"]
    if mask.dim() != 2 or mask.shape[0] == 0:
        return chunk
    width = max(int(attended_widths(mask).max()), 1)
    if width == mask.shape[1]:
        return chunk
    return {
        key: value[:, :width] if isinstance(value, Tensor) and value.shape[:2] == mask.shape else value
        for key, value in chunk.items()
    }
