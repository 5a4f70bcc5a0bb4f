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

The parts: :mod:`.launch` (device, process group), :mod:`.optimization` (optimizer, LR schedule), :mod:`.loop`
(the shared loop, evaluation and checkpoints), :mod:`.private_loop` and :mod:`.plain_loop` (how a step is taken),
:mod:`.run_folder` (``config.toml``, ``metrics.jsonl``, ``final.json``); this module starts and resumes runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import data_parallel as dp
from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from .launch import Launch, join_launch, resolve_device
from .loop import TrainingLoop
from .optimization import build_optimizer, lr_factor
from .plain_loop import PlainLoop
from .private_loop import SECRET_NOISE, SEEDED_NOISE, PrivateLoop, execution_order, grouping_for, train_private_steps
from .recipe import RESUMABLE_CHANGES, Recipe, recipe_differences, recipe_to_dict
from .run_folder import RunWriter, records_after
from .tasks import build_task, to_device

__all__ = [
    "SECRET_NOISE",
    "SEEDED_NOISE",
    "Launch",
    "PlainLoop",
    "PrivateLoop",
    "RunWriter",
    "TrainingLoop",
    "build_optimizer",
    "execution_order",
    "grouping_for",
    "join_launch",
    "lr_factor",
    "resolve_device",
    "train",
    "train_private_steps",
]


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
        result = _train_on(recipe, device, launch, run_dir, progress, log, start, checkpoint, checkpointing, resume_dir)
        if launch.owns_group and launch.distributed:
            # Leave together: a rank that tears its gloo group down while rank 0 still writes its results was seen
            # to abort ("terminate called without an active exception"), and torchrun then killed rank 0 before
            # final.json. Only after a successful run, so that a failed peer cannot hang it here.
            dist.barrier()
        return result
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
    loop = (PrivateLoop if recipe.privacy.private else PlainLoop)(recipe, setup, launch)
    try:
        if checkpoint is not None:
            loop.restore(checkpoint, records_after(resume_dir, checkpoint["metrics_offset"]))
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
