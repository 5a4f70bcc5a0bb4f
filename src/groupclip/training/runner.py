"""Run one recipe end to end: data, model, DP (or non-private) training, evaluation, and a run folder.

    from groupclip.training import load_recipe, apply_overrides, train
    result = train(apply_overrides(load_recipe("fashion-mnist-cnn"), ["clipping.grouping=layer-wise"]), "runs/fm")

The run folder holds ``config.toml`` (the resolved recipe), ``metrics.jsonl`` (one record per step, and one per
evaluation with ``"kind": "eval"``), ``final.json`` (the final metrics) and ``curves.png`` / ``epsilon.png``.

Distributed launch: under ``torchrun --nproc-per-node K -m groupclip.cli train ...`` (``WORLD_SIZE`` > 1) every
rank joins one process group (gloo on CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``); DP runs are data
parallel through ``make_private(distributed=True)`` (one global Poisson sample split among the ranks, clipped sums
all-reduced, noise once), non-private runs through torch's DistributedDataParallel with ``batch_size / K`` per rank.
Rank 0 alone evaluates, shows progress and writes the run folder.

DP runs use :func:`groupclip.make_private` with Poisson sampling at rate ``q = batch_size / N``, a loss that sums
per-sample losses (``loss_reduction="sum"``), logical batches split into physical ones of at most
``physical_batch_size``, and the noise multiplier calibrated to ``privacy.epsilon`` over the planned steps
(``ceil(epochs / q)``) unless ``privacy.noise_multiplier`` is given. Non-private runs (``privacy.private = false``)
train the same model with shuffled batches of ``batch_size`` and the mean loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..adaptive import AdaptiveClipping
from ..grouping import needs_execution_order, resolve_grouping, trainable_parameters
from ..private import make_private
from ..sampling import expected_steps, physical_batches
from .progress import ProgressBar
from .recipe import OptimizerConfig, Recipe, RecipeError, ScheduleConfig, recipe_to_toml
from .tasks import TaskSetup, build_task, to_device


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


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a :class:`torch.device`: ``"auto"`` is CUDA when available, else CPU.

    Raises:
        RecipeError: an unknown device name, or CUDA asked for where none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise RecipeError(f"[run] device = {name!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from err
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"[run] device = {name!r}: recipes run on 'cpu' or 'cuda' (or 'auto').")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"[run] device = {name!r} but this machine has no CUDA device; use --device cpu or auto.")
    return device


@dataclasses.dataclass
class Launch:
    """Where this process sits in a (possibly) distributed run."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # the runner created the process group (and destroys it at the end)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join_launch(device: torch.device) -> Launch:
    """Join the torchrun launch described by the environment (``WORLD_SIZE`` > 1), else a single-process launch."""
    if dist.is_available() and dist.is_initialized():
        return Launch(dist.get_rank(), dist.get_world_size(), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and groupclip's small collectives use the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Launch(dist.get_rank(), dist.get_world_size(), owns_group=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RunWriter:
    """The run folder (or nothing, when ``run_dir`` is None): config, per-step JSONL, final JSON."""

    def __init__(self, run_dir: str | None, recipe: Recipe) -> None:
        self.run_dir = run_dir
        self._metrics = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.toml"), "w", encoding="utf-8") as handle:
                handle.write(recipe_to_toml(recipe))
            self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8")

    def record(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def finish(self, final: dict[str, Any], headline: str) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.run_dir:
            from .plots import plot_run

            final["plots"] = [os.path.basename(p) for p in plot_run(self.run_dir, headline)]
            with open(os.path.join(self.run_dir, "final.json"), "w", encoding="utf-8") as handle:
                json.dump(final, handle, indent=2)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def train(
    recipe: Recipe,
    run_dir: str | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``recipe``; returns the final metrics (also written to ``run_dir/final.json`` when given)."""
    start = time.perf_counter()
    device = resolve_device(recipe.run.device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    launch = join_launch(device)
    try:
        if launch.rank != 0:  # rank 0 alone reports and writes
            run_dir, progress, log = None, False, lambda _text: None
        return _train_on(recipe, device, launch, run_dir, progress, log, start)
    finally:
        if launch.owns_group:
            dist.destroy_process_group()


def _train_on(
    recipe: Recipe,
    device: torch.device,
    launch: Launch,
    run_dir: str | None,
    progress: bool,
    log: Callable[[str], None],
    start: float,
) -> dict[str, Any]:
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, device=str(device)))
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    torch.manual_seed(recipe.run.seed)
    setup = build_task(recipe.task, recipe.data, recipe.model, recipe.run.seed)
    setup.model.to(device)
    setup.example_batch = to_device(setup.example_batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    writer = RunWriter(run_dir, recipe)
    try:
        loop = (_PrivateLoop if recipe.privacy.private else _PlainLoop)(recipe, setup, launch)
        try:
            final = loop.run(writer, progress, log, start)
        finally:
            loop.close()
        writer.finish(final, setup.headline)
    finally:
        writer.close()
    return final


class _Loop:
    """What DP and non-private training share: optimizer, schedule, evaluation, records, progress."""

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
        self.evals: list[dict[str, Any]] = []

    def planned_steps(self) -> int:
        raise NotImplementedError

    def batches(self):
        raise NotImplementedError

    def step(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError

    def privacy_summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def eval_due(self, step: int) -> bool:
        every = self.recipe.schedule.eval_every or self.steps_per_epoch()
        return step % max(1, every) == 0 or step == self.total_steps

    def steps_per_epoch(self) -> int:
        return max(1, round(self.data_size / self.recipe.schedule.batch_size))

    def run(self, writer: RunWriter, progress: bool, log: Callable[[str], None], start: float) -> dict[str, Any]:
        setup = self.setup
        bar = ProgressBar(self.total_steps, label=self.recipe.name) if progress else None
        eps_every = max(1, self.total_steps // 50)
        step, train_time = 0, 0.0
        while step < self.total_steps:
            for batch in self.batches():
                began = time.perf_counter()
                record = self.step(to_device(batch, self.device))
                self.scheduler.step()
                train_time += time.perf_counter() - began
                step += 1
                record.update(step=step, epoch=step / self.steps_per_epoch(), step_time_s=time.perf_counter() - began)
                if step % eps_every == 0 or step == self.total_steps:
                    record["epsilon"] = self.epsilon()
                writer.record(record)
                if self.eval_due(step) and self.launch.rank == 0:
                    metrics = setup.evaluate(self.model)
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
                if step >= self.total_steps:
                    break
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
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "device": str(self.device),
            **_gpu_facts(self.device),
            "world_size": self.launch.world_size,
            "rank": self.launch.rank,
        }

    def epsilon(self) -> float | None:
        return None


class _PlainLoop(_Loop):
    """Non-private training: shuffled fixed-size batches, mean loss, no clipping, no noise."""

    def planned_steps(self) -> int:
        return math.ceil(self.recipe.schedule.epochs * math.ceil(self.data_size / self.recipe.schedule.batch_size))

    def steps_per_epoch(self) -> int:
        return math.ceil(self.data_size / self.recipe.schedule.batch_size)

    def __init__(self, recipe: Recipe, setup: TaskSetup, launch: Launch) -> None:
        super().__init__(recipe, setup, launch)
        self.train_model: nn.Module = self.model
        self.epoch = 0
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
            self.epoch += 1
            loader = DataLoader(
                self.setup.train,
                batch_size=self.recipe.schedule.batch_size // world,
                sampler=sampler,
                collate_fn=self.setup.collate,
            )
            return iter(loader)
        generator = torch.Generator().manual_seed(self.recipe.run.seed + 1)
        loader = DataLoader(
            self.setup.train,
            batch_size=self.recipe.schedule.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self.setup.collate,
        )
        return iter(loader)

    def step(self, batch: Any) -> dict[str, Any]:
        size = _batch_size(batch)
        total = 0.0
        for chunk in physical_batches(batch, self.recipe.schedule.physical_batch_size):
            loss = self.setup.loss(self.train_model, chunk)
            (loss / size).backward()  # DDP averages the ranks' gradients: the mean over the global batch
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, size = _global_sums(self.launch, total, size, self.device)
        return {"loss": total / size if size else None, "batch_size": size, "lr": self.scheduler.get_last_lr()[0]}

    def privacy_summary(self) -> dict[str, Any]:
        return {"private": False, "epsilon": None, "delta": None, "grouping": None, "clip_fn": None}


class _PrivateLoop(_Loop):
    """DP training through :func:`make_private` (Poisson sampling, clipping in the one backward, noise, accounting)."""

    def __init__(self, recipe: Recipe, setup: TaskSetup, launch: Launch) -> None:
        super().__init__(recipe, setup, launch)
        privacy, clipping = recipe.privacy, recipe.clipping
        adaptive = (
            AdaptiveClipping(target_quantile=clipping.target_quantile, learning_rate=clipping.adaptive_lr)
            if clipping.adaptive
            else None
        )
        calibrate = privacy.noise_multiplier is None
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
            seed=recipe.run.seed,
            distributed=launch.distributed,
        )
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
        size = _batch_size(batch)
        total = 0.0
        for chunk in physical_batches(batch, self.recipe.schedule.physical_batch_size):
            loss = self.setup.loss(self.model, chunk)
            loss.backward()
            total += float(loss.detach())
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # noise once per logical batch, divided by the expected batch size
        self.optimizer.zero_grad(set_to_none=True)
        total, size = _global_sums(self.launch, total, size, self.device)
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

    def privacy_summary(self) -> dict[str, Any]:
        engine = self.private.engine
        return {
            "private": True,
            "epsilon": self.epsilon(),
            "delta": self.private.delta,
            "accountant": self.recipe.privacy.accountant,
            "noise_multiplier": self.private.noise_multiplier,
            "gradient_noise_multiplier": self.private.gradient_noise_multiplier,
            "sample_rate": self.private.sample_rate,
            "expected_batch_size": self.private.expected_batch_size,
            "planned_steps": self.planned_steps(),
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


def _global_sums(launch: Launch, total: float, size: int, device: torch.device) -> tuple[float, int]:
    """The step's summed loss and batch size over all ranks (unchanged in a single process)."""
    if not launch.distributed:
        return total, size
    packed = torch.tensor([total, float(size)], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return float(packed[0]), int(packed[1])


def _gpu_facts(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    return {
        "gpu": torch.cuda.get_device_name(device),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, tuple | list) else batch
    return int(first.shape[0])
