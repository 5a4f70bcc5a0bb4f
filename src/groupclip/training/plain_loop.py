"""Non-private training: shuffled fixed-size batches, the mean loss, no clipping, no noise."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..sampling import physical_batches
from .launch import Launch
from .loop import TrainingLoop, batch_size_of, global_sums
from .recipe import Recipe, RecipeError
from .tasks import TaskSetup


class PlainLoop(TrainingLoop):
    """Non-private training: shuffled fixed-size batches, mean loss, no clipping, no noise."""

    def planned_steps(self) -> int:
        return math.ceil(self.recipe.schedule.epochs * math.ceil(self.data_size / self.recipe.schedule.batch_size))

    def steps_per_epoch(self) -> int:
        return math.ceil(self.data_size / self.recipe.schedule.batch_size)

    def __init__(self, recipe: Recipe, setup: TaskSetup, launch: Launch) -> None:
        super().__init__(recipe, setup, launch)
        self.train_model: nn.Module = self.model
        self.epoch = 0  # the data order's epoch
        self.position = 0  # batches of it taken
        if launch.distributed:
            if recipe.schedule.batch_size % launch.world_size:
                raise RecipeError(
                    f"schedule.batch_size = {recipe.schedule.batch_size} is not divisible by the {launch.world_size} "
                    "ranks of this non-private data-parallel run; choose a multiple of the number of processes."
                )
            self.train_model = nn.parallel.DistributedDataParallel(self.model)

    def batches(self):
        world = self.launch.world_size
        if self.launch.distributed:
            sampler = DistributedSampler(self.setup.train, shuffle=True, seed=self.recipe.run.seed + 1)
            sampler.set_epoch(self.epoch)
            loader = DataLoader(
                self.setup.train,
                batch_size=self.recipe.schedule.batch_size // world,
                sampler=sampler,
                collate_fn=self.setup.collate,
            )
        else:
            generator = torch.Generator().manual_seed(self.recipe.run.seed + 1)
            loader = DataLoader(
                self.setup.train,
                batch_size=self.recipe.schedule.batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=self.setup.collate,
            )
        batches = iter(loader)
        for _ in range(self.position):  # resumed mid-epoch: the batches taken before the checkpoint
            next(batches, None)
        return batches

    def pass_done(self) -> None:
        self.epoch += 1
        self.position = 0

    def step(self, batch: Any) -> dict[str, Any]:
        self.position += 1
        size = batch_size_of(batch)
        total = 0.0
        for chunk in physical_batches(batch, self.recipe.schedule.physical_batch_size):
            loss = self.setup.loss(self.train_model, chunk)
            (loss / size).backward()  # DDP averages the ranks' gradients: the mean over the global batch
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, size = global_sums(self.launch, total, size, self.device)
        return {"loss": total / size if size else None, "batch_size": size, "lr": self.scheduler.get_last_lr()[0]}

    def privacy_summary(self) -> dict[str, Any]:
        return {"private": False, "epsilon": None, "delta": None, "grouping": None, "clip_fn": None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any], lost_steps: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
