"""The training loop that DP and non-private training share: optimizer, schedule, evaluation, records,
progress and checkpoints. :mod:`.private_loop` and :mod:`.plain_loop` add how a step is taken."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import FORMAT, CheckpointError, rng_state, save_checkpoint, set_rng_state
from .launch import Launch
from .optimization import build_optimizer, lr_factor
from .progress import ProgressBar
from .recipe import Recipe, RecipeError, recipe_to_dict
from .run_folder import RunWriter
from .tasks import TaskSetup, to_device
from .weight_average import WeightAverage


def peak_rss_mb() -> float:
    """The peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TrainingLoop:
    """What DP and non-private training share: optimizer, schedule, evaluation, records, progress, checkpoints."""

    def __init__(self, recipe: Recipe, setup: TaskSetup, launch: Launch) -> None:
        self.recipe = recipe
        self.setup = setup
        self.launch = launch
        self.model = setup.model
        self.device = torch.device(recipe.run.device)
        self.optimizer = build_optimizer(recipe.optimizer, self.model)
        self.data_size = len(setup.train)
        if self.data_size < 1:
            raise RecipeError("The training set is empty (check [data] limit).")
        if recipe.schedule.batch_size > self.data_size:
            raise RecipeError(
                f"schedule.batch_size = {recipe.schedule.batch_size} exceeds the training set ({self.data_size} "
                "examples); lower the batch size or raise data.limit."
            )
        self.total_steps = self.planned_steps()
        if recipe.schedule.max_steps:
            self.total_steps = min(self.total_steps, recipe.schedule.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(recipe.schedule, self.planned_steps())
        )
        decay = recipe.schedule.ema_decay
        self.average = WeightAverage(self.model, decay) if decay else None
        self.evals: list[dict[str, Any]] = []
        self.steps_done = 0
        self.train_time = 0.0
        self.resumed_from: list[int] = []
        self._resume_rng: dict[str, Any] | None = None  # set when resuming: restored after the first loader

    def planned_steps(self) -> int:
        raise NotImplementedError

    def batches(self):
        raise NotImplementedError

    def pass_done(self) -> None:
        """The loader of :meth:`batches` is exhausted (an epoch or a Poisson pass ended)."""

    def step(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError

    def privacy_summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the subclass needs to continue bit-identically (model, optimizer, data order, ...)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any], lost_steps: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def eval_due(self, step: int) -> bool:
        every = self.recipe.schedule.eval_every or self.steps_per_epoch()
        return step % max(1, every) == 0 or step == self.total_steps

    def checkpoint_due(self, step: int) -> bool:
        every = self.recipe.run.checkpoint_every
        if every < 0:
            return False
        if step == self.total_steps:
            return self.recipe.run.keep_checkpoint  # the last state, only when it is to be kept
        return step % max(1, every or self.steps_per_epoch()) == 0

    def steps_per_epoch(self) -> int:
        return max(1, round(self.data_size / self.recipe.schedule.batch_size))

    # ------------------------------------------------------------------ checkpoints
    def save(self, writer: RunWriter, step: int) -> None:
        """Checkpoint the state after ``step`` (every rank takes part: the RNG states are gathered on rank 0)."""
        rng = [rng_state()]
        if self.launch.distributed:
            rng = [None] * self.launch.world_size
            dist.all_gather_object(rng, rng_state())
        if writer.run_dir is None:
            return
        state = {
            "format": FORMAT,
            "recipe": recipe_to_dict(self.recipe),
            "world_size": self.launch.world_size,
            "step": step,
            "train_time_s": self.train_time,
            "evals": self.evals,
            "resumed_from": self.resumed_from,
            "metrics_offset": writer.offset(),
            "rng": rng,
            "loop": self.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
        }
        save_checkpoint(state, writer.run_dir)

    def restore(self, checkpoint: dict[str, Any], records_after: int) -> None:
        """Load a checkpoint into this freshly built loop; ``records_after``: step records logged after it."""
        if checkpoint["world_size"] != self.launch.world_size:
            raise CheckpointError(
                f"The checkpoint was made by {checkpoint['world_size']} process(es), this launch has "
                f"{self.launch.world_size}: resume with the same number of processes."
            )
        self.load_state_dict(checkpoint["loop"], lost_steps=records_after + 1)
        if self.average is not None:
            if checkpoint.get("average") is None:
                raise CheckpointError("The checkpoint holds no weight average, but schedule.ema_decay is set.")
            self.average.load_state_dict(checkpoint["average"])
        self.steps_done = int(checkpoint["step"])
        self.train_time = float(checkpoint["train_time_s"])
        self.evals = list(checkpoint["evals"])
        self.resumed_from = [*checkpoint["resumed_from"], self.steps_done]
        self._resume_rng = checkpoint["rng"][self.launch.rank]

    def _fresh_batches(self):
        """:meth:`batches`; the first one after a resume gets the checkpoint's global RNG state once its loader
        exists (creating a loader may draw from the global RNG, which the checkpointed run had done already)."""
        batches = self.batches()
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        return batches

    # ------------------------------------------------------------------ the loop
    def run(
        self, writer: RunWriter, progress: bool, log: Callable[[str], None], start: float, checkpointing: bool = False
    ) -> dict[str, Any]:
        setup = self.setup
        step = self.steps_done
        bar = ProgressBar(self.total_steps, label=self.recipe.name, initial=step) if progress else None
        if step and progress:
            log(f"resuming {self.recipe.name} at step {step} of {self.total_steps}")
        eps_every = max(1, self.total_steps // 50)
        while step < self.total_steps:
            for batch in self._fresh_batches():
                began = time.perf_counter()
                record = self.step(to_device(batch, self.device))
                self.scheduler.step()
                if self.average is not None:
                    self.average.update()
                self.train_time += time.perf_counter() - began
                step += 1
                record.update(step=step, epoch=step / self.steps_per_epoch(), step_time_s=time.perf_counter() - began)
                if step % eps_every == 0 or step == self.total_steps:
                    record["epsilon"] = self.epsilon()
                writer.record(record)
                if self.eval_due(step) and self.launch.rank == 0:
                    metrics = self.evaluate()
                    entry = {"kind": "eval", "step": step, "epoch": record["epoch"], **metrics}
                    self.evals.append(entry)
                    writer.record(entry)
                if bar is not None:
                    bar.update(
                        step,
                        loss=record.get("loss"),
                        **{setup.headline: self.evals[-1][setup.headline] if self.evals else None},
                        eps=record.get("epsilon"),
                    )
                self.steps_done = step
                if checkpointing and self.checkpoint_due(step):
                    self.save(writer, step)
                if step >= self.total_steps:
                    break
            else:
                self.pass_done()
        if bar is not None:
            bar.close()
        last = self.evals[-1] if self.evals else {}
        return {
            "recipe": self.recipe.name,
            "task": self.recipe.task,
            "headline": setup.headline,
            setup.headline: last.get(setup.headline),
            "final_eval": {k: v for k, v in last.items() if k not in ("kind",)},
            "best_" + setup.headline: (max if setup.higher_is_better else min)(
                (e[setup.headline] for e in self.evals), default=None
            ),
            **self.privacy_summary(),
            "steps": step,
            "epochs": step / self.steps_per_epoch(),
            "seed": self.recipe.run.seed,
            "threads": torch.get_num_threads(),
            "train_size": self.data_size,
            "info": setup.info or {},
            "train_time_s": self.train_time,
            "wall_time_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "device": str(self.device),
            **gpu_facts(self.device),
            "world_size": self.launch.world_size,
            "rank": self.launch.rank,
            "resumed_from": self.resumed_from,
        }

    def evaluate(self) -> dict[str, Any]:
        """The task's metrics; with a weight average, those of the averaged weights, and the last iterate's beside
        them as ``last_iterate_<metric>``."""
        if self.average is None:
            return self.setup.evaluate(self.model)
        last = self.setup.evaluate(self.model)
        with self.average.applied():
            averaged = self.setup.evaluate(self.model)
        return {**averaged, **{f"last_iterate_{key}": value for key, value in last.items()}}

    def epsilon(self) -> float | None:
        return None


def global_sums(launch: Launch, total: float, size: int, device: torch.device) -> tuple[float, int]:
    """The step's summed loss and batch size over all ranks (unchanged in a single process)."""
    if not launch.distributed:
        return total, size
    packed = torch.tensor([total, float(size)], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return float(packed[0]), int(packed[1])


def gpu_facts(device: torch.device) -> dict[str, Any]:
    """The GPU's name and peak allocated memory for ``final.json`` (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "gpu": torch.cuda.get_device_name(device),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def batch_size_of(batch: Any) -> int:
    """The number of examples in a batch (the length of its first tensor)."""
    first = batch[0] if isinstance(batch, tuple | list) else batch
    return int(first.shape[0])
