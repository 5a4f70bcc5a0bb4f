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

Noise: the DP noise generator is NOT seeded from ``run.seed`` (which is written into the run folder): unless
``privacy.noise_seed`` is set it is seeded from OS entropy, and the noise is secret. An explicit ``noise_seed``
makes the noise reproducible (and removable by anyone who knows the seed); ``final.json`` records which
(``"noise": "secret (OS entropy)"`` or ``"reproducible (seeded)"``, and ``"noise_seed"``).

Checkpoints and ``--resume``: every ``run.checkpoint_every`` steps (default: once per epoch; -1: never) rank 0
writes ``checkpoint.pt`` into the run folder atomically (:mod:`groupclip.training.checkpoint`: a temporary file,
fsync, ``os.replace``). It holds the model and optimizer, ``private.state_dict()`` (thresholds, the accountant's
ledger, the noise and Poisson sampler generator states and the sampler's position in its pass, the step), the LR
schedule, the data order and loader position of non-private runs, the global torch RNG state of every rank
(dropout), the step and epoch counters, the evaluations so far and the length of ``metrics.jsonl`` at that step.
``train(recipe, run_dir, resume=True)`` (``groupclip train --resume RUN_DIR``) rebuilds the run from its saved
config exactly as at the start (model initialisation from ``run.seed``, the same set-up), loads the checkpoint,
cuts ``metrics.jsonl`` back to the checkpoint's step and continues: the final parameters are bit-identical to
those of the uninterrupted run (on deterministic kernels; CPU here), and so is the final epsilon. When the run
ends, the checkpoint is deleted unless ``run.keep_checkpoint`` is set. **A checkpoint must be kept private**: the
noise generator state in it reveals the noise of the run's steps (past and future), and with it the noise-free
gradient sums.

The privacy ledger of a resumed run never spends less than the uninterrupted run would have. Steps taken after
the last checkpoint and before the kill may have been released (their losses, evaluations and progress lines were
printed), and the resumed run takes them again. With a replayable noise generator (always, for recipes: a torch
generator whose state is in the checkpoint, whether seeded or from entropy) the replay draws the same Poisson
batches and the same noise from the same parameters, so each replayed step releases exactly the value the lost
step released -- the same random variable, not a fresh draw -- and the composition is that of the uninterrupted
run: the ledger counts every step once and the final epsilon equals the uninterrupted run's. Were the noise not
replayable (a checkpoint without a generator state, e.g. OS CSPRNG noise), the replayed steps would be fresh
releases: the resumed run then also records in the ledger every step logged in ``metrics.jsonl`` after the
checkpoint, plus one that may have been in flight when the process died (``final.json``: ``extra_ledger_steps``),
and its epsilon is larger than the uninterrupted run's.

Distributed launches: every rank joins the process group with ``timeout = run.collective_timeout`` seconds, so a
rank that dies or hangs makes the others stop within that time with
:class:`~groupclip.distributed.data_parallel.PeerFailureError` (one clear line) instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import math
import os
import resource
import secrets
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..adaptive import AdaptiveClipping
from ..distributed import data_parallel as dp
from ..grouping import needs_execution_order, resolve_grouping, trainable_parameters
from ..private import make_private
from ..sampling import expected_steps, physical_batches
from .checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_text_atomically,
)
from .progress import ProgressBar
from .recipe import (
    RESUMABLE_CHANGES,
    OptimizerConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    recipe_differences,
    recipe_to_dict,
    recipe_to_toml,
)
from .tasks import TaskSetup, build_task, to_device

SECRET_NOISE = "secret (OS entropy)"
SEEDED_NOISE = "reproducible (seeded)"


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
    timeout: float | None = None  # seconds a collective waits for the other ranks (when the runner set it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join_launch(device: torch.device, timeout: float | None = None) -> Launch:
    """Join the torchrun launch described by the environment (``WORLD_SIZE`` > 1), else a single-process launch.

    ``timeout`` (seconds) bounds every collective and the rendezvous: a rank that dies or hangs makes the others
    fail within that time instead of waiting forever (torch's default is 30 minutes).
    """
    if dist.is_available() and dist.is_initialized():
        return Launch(dist.get_rank(), dist.get_world_size(), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and groupclip's small collectives use the current device
    kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return Launch(dist.get_rank(), dist.get_world_size(), owns_group=True, timeout=timeout)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RunWriter:
    """The run folder (or nothing, when ``run_dir`` is None): config, per-step JSONL, final JSON.

    ``resume_offset``: continue a run's ``metrics.jsonl``, cut back to that length (its length at the checkpoint).
    """

    def __init__(self, run_dir: str | None, recipe: Recipe, resume_offset: int | None = None) -> None:
        self.run_dir = run_dir
        self._metrics = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            write_text_atomically(os.path.join(run_dir, "config.toml"), recipe_to_toml(recipe))
            path = os.path.join(run_dir, "metrics.jsonl")
            if resume_offset is None:
                self._metrics = open(path, "w", encoding="utf-8")
            else:
                remove_stale_temporaries(run_dir)
                with open(path, "ab") as handle:  # creates it if it went missing
                    if handle.tell() > resume_offset:
                        handle.truncate(resume_offset)  # the records of steps after the checkpoint are redone
                self._metrics = open(path, "a", encoding="utf-8")

    def record(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def offset(self) -> int:
        """Bytes written to ``metrics.jsonl`` so far (0 without a run folder)."""
        return self._metrics.tell() if self._metrics is not None else 0

    def finish(self, final: dict[str, Any], headline: str) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.run_dir:
            from .plots import plot_run

            final["plots"] = [os.path.basename(p) for p in plot_run(self.run_dir, headline)]
            write_text_atomically(os.path.join(self.run_dir, "final.json"), json.dumps(final, indent=2))

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
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``recipe``; returns the final metrics (also written to ``run_dir/final.json`` when given).

    ``resume=True`` continues the killed run in ``run_dir`` from its latest checkpoint (see the module docstring);
    ``recipe`` must be the run's saved config (``run.checkpoint_every``, ``run.keep_checkpoint`` and
    ``run.collective_timeout`` may differ).

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a finished run, or a checkpoint of another config.
        PeerFailureError: (distributed launches) another rank died or did not answer within the timeout.
    """
    start = time.perf_counter()
    checkpoint = _checkpoint_to_resume(recipe, run_dir) if resume else None
    device = resolve_device(recipe.run.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one device per rank
    launch = join_launch(device, recipe.run.collective_timeout)
    checkpointing = run_dir is not None and recipe.run.checkpoint_every >= 0  # known to every rank
    resume_dir = run_dir
    try:
        if launch.rank != 0:  # rank 0 alone reports and writes
            run_dir, progress, log = None, False, lambda _text: None
        return _train_on(recipe, device, launch, run_dir, progress, log, start, checkpoint, checkpointing, resume_dir)
    except Exception as err:
        failure = dp.peer_failure(err, launch.rank, launch.timeout) if launch.distributed else None
        if failure is not None:
            raise failure from err
        raise
    finally:
        if launch.owns_group:
            dist.destroy_process_group()


def _checkpoint_to_resume(recipe: Recipe, run_dir: str | None) -> dict[str, Any]:
    if not run_dir:
        raise CheckpointError("Resuming needs the run folder of the run to continue.")
    if os.path.exists(os.path.join(run_dir, "final.json")):
        raise CheckpointError(f"{run_dir} has finished (final.json): nothing to resume.")
    checkpoint = load_checkpoint(run_dir)
    given = recipe_to_dict(recipe)
    if given["run"]["device"] == "auto":  # the saved config holds the device "auto" resolved to
        given["run"]["device"] = checkpoint["recipe"]["run"]["device"]
    differences = [d for d in recipe_differences(checkpoint["recipe"], given) if d[0] not in RESUMABLE_CHANGES]
    if differences:
        key, saved, given = differences[0]
        raise CheckpointError(
            f"{checkpoint_path(run_dir)} was made with {key} = {saved!r}, this run has {given!r}: resume with the "
            "run's own config."
        )
    return checkpoint


def _train_on(
    recipe: Recipe,
    device: torch.device,
    launch: Launch,
    run_dir: str | None,
    progress: bool,
    log: Callable[[str], None],
    start: float,
    checkpoint: dict[str, Any] | None = None,
    checkpointing: bool = False,
    resume_dir: str | None = None,
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
    loop = (_PrivateLoop if recipe.privacy.private else _PlainLoop)(recipe, setup, launch)
    try:
        if checkpoint is not None:
            loop.restore(checkpoint, _records_after(resume_dir, checkpoint["metrics_offset"]))
        writer = RunWriter(run_dir, recipe, checkpoint["metrics_offset"] if checkpoint is not None else None)
        try:
            final = loop.run(writer, progress, log, start, checkpointing)
            writer.finish(final, setup.headline)
        finally:
            writer.close()
    finally:
        loop.close()
    if run_dir and not recipe.run.keep_checkpoint and os.path.exists(checkpoint_path(run_dir)):
        os.unlink(checkpoint_path(run_dir))  # the run is over: no noise state is left lying around
    return final


def _records_after(run_dir: str | None, offset: int) -> int:
    """Step records in ``run_dir/metrics.jsonl`` past byte ``offset`` (steps taken after the checkpoint)."""
    path = os.path.join(run_dir or "", "metrics.jsonl")
    if not run_dir or not os.path.exists(path):
        return 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode("utf-8", errors="replace").splitlines()
    return sum(1 for line in tail if line.startswith("{") and '"kind": "eval"' not in line)


class _Loop:
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
                self.train_time += time.perf_counter() - began
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
            **_gpu_facts(self.device),
            "world_size": self.launch.world_size,
            "rank": self.launch.rank,
            "resumed_from": self.resumed_from,
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
        # The noise seed goes to make_private where it takes one; run.seed seeds the sampler only.
        takes_noise_seed = "noise_seed" in inspect.signature(make_private).parameters
        noise_seed = {"noise_seed": privacy.noise_seed} if takes_noise_seed else {}
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
            **noise_seed,
        )
        self.extra_ledger_steps = 0
        try:
            if not takes_noise_seed:
                _reseed_noise(self.private, privacy.noise_seed)
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
        if noise.get("generator") is None:
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


def _reseed_noise(private: Any, noise_seed: int | None) -> None:
    """For a :func:`make_private` without ``noise_seed``: seed the noise generator (which ``seed`` seeded) from OS
    entropy, or from ``noise_seed`` with a warning. Only rank 0's noise is ever drawn in a data-parallel run."""
    noise = getattr(private, "noise", None)
    generator = getattr(noise, "generator", None)
    if generator is None or getattr(noise, "secure", False):
        return
    if noise_seed is None:
        generator.manual_seed(secrets.randbits(63))
        return
    generator.manual_seed(noise_seed)
    warnings.warn(
        f"privacy.noise_seed = {noise_seed}: the DP noise is reproducible, and anyone who knows the seed can "
        "remove it; use seeded noise for tests and debugging, not for a model you release.",
        UserWarning,
        stacklevel=3,
    )


def train_private_steps(recipe: Recipe, setup: TaskSetup, steps: int | None = None) -> dict[str, Any]:
    """Train ``setup.model`` in place with ``recipe``'s DP settings for ``steps`` steps (default: the recipe's);
    no run folder, no evaluation, no checkpoints. Returns the privacy summary (epsilon, delta, noise, ...) and the
    steps taken. Used by ``groupclip audit --recipe``, which puts canaries into ``setup.train`` first."""
    device = resolve_device(recipe.run.device)
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, device=str(device)))
    setup.model.to(device)
    loop = _PrivateLoop(recipe, setup, Launch())
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
