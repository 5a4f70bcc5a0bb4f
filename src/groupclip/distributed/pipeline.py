"""Pipeline-parallel DP training on ``torch.distributed.pipelining``: per-device or all-layer clipping (MATH.md §6).

One process per pipeline stage (single-stage schedules: :class:`~torch.distributed.pipelining.ScheduleGPipe`,
:class:`~torch.distributed.pipelining.Schedule1F1B`). Each process calls :func:`make_private_pipeline` on its stage
module and optimizer, builds its schedule with :meth:`PrivatePipeline.schedule`, and trains as usual::

    private = make_private_pipeline(stage_module, optimizer, stage_index=rank, num_stages=world,
                                    grouping="per-device", max_grad_norm=1.0, noise_multiplier=1.0,
                                    batch_size=256, data_size=len(dataset))
    schedule = private.schedule(ScheduleGPipe, n_microbatches=4, loss_fn=loss_fn)   # loss_fn: reduction="sum"
    for x, y in private.poisson_loader(dataset):                  # the same Poisson batches on every stage
        for xs, ys in zip(fixed_size_chunks(x, 64), fixed_size_chunks(y, 64, fill=-100)):
            schedule.step(xs) if private.stage.is_first else schedule.step(target=ys)
        optimizer.step()                                          # noise on this stage's parameters, once
        optimizer.zero_grad()

Groupings:

* ``"per-device"`` -- each stage's parameters are one group (He et al.). Each stage clips its own part inside its
  own backward: no per-sample norm crosses stages. Any grouping whose every group lies within one stage works
  the same way: ``"layer-wise"``, ``"param-wise"``, explicit patterns (``{group: [patterns]}`` over the stages'
  parameter names) or a callable ``(name, param) -> group``.
* ``"all-layer"`` -- one group over every stage. A stage cannot clip inside its backward: the per-sample norm needs
  the other stages' parts, and for a microbatch the upstream stages' backward has not run yet (a collective there
  would deadlock the pipeline). So each stage keeps every microbatch's contributions until the schedule's step
  ends; then one all-reduce (SUM) of all the step's per-sample squared norms (``4`` or ``8`` bytes per sample,
  plus a 32-byte header checking the stages agree on the microbatches) gives every stage the global norms, and
  each stage writes its clipped sums. Memory: the kept tensors of all microbatches, as all-layer clipping keeps
  every layer's in one process.

Noise: at ``optimizer.step()`` every stage adds ``N(0, sigma^2 S^2)`` to its own parameters only (every coordinate
gets noise once; independent seeds per stage) where ``S = sqrt(sum_k R_k^2)`` is the GLOBAL sensitivity over all
stages' groups (the thresholds are exchanged once at set-up), then divides by the expected batch size. Every stage
keeps the same accountant ledger, so ``epsilon()`` is equal everywhere. A step is refused on every stage together
(one 2-value all-reduce) if any stage had a non-finite norm.

Batches: the P2P buffers of ``torch.distributed.pipelining`` have fixed shapes, but Poisson batches vary in size.
:func:`fixed_size_chunks` pads a batch to whole chunks of one physical size; padded rows must contribute zero
gradient -- e.g. targets ``-100`` with ``cross_entropy(..., ignore_index=-100, reduction="sum")`` and
``loss_reduction="sum"`` -- so their per-sample gradients are zero and change nothing. Several chunks of one
logical batch accumulate (one ``schedule.step`` each) before the one ``optimizer.step()``.

Parameter names: the stages' ``named_parameters()`` names identify parameters across the pipeline, so they must be
distinct across stages (keep the full model's names, e.g. delete the other stages' layers from a full model, or
name the ``nn.Sequential`` children by their global index). A name on two stages is refused (it would be a
parameter present on two stages, e.g. tied embeddings split across the first and last stage).

Set-up errors (a group spanning stages, a parameter on two stages, stages disagreeing on privacy settings, bad
arguments on one stage) raise :class:`~groupclip.errors.DistributedSetupError` on every stage, never on one alone.
During training groupclip raises only at points every stage reaches together (the end of the schedule's step, the
step flags at ``optimizer.step()``); an exception elsewhere in one stage (e.g. in the user's loss) leaves the others
waiting in the schedule's P2P, as with plain ``torch.distributed.pipelining``.

Not supported (refused with a message): multi-stage-per-rank and zero-bubble schedules (split input / weight
backwards), ``scale_grads=True``, int (execution-order) groupings. Not provided: adaptive thresholds and
checkpointing (``state_dict``) for pipelines. The stage's shape-inference run (when ``input_args`` /
``output_args`` are not given) happens with the engine suspended, so it is no training pass.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, ScheduleGPipe
from torch.utils.data import DataLoader, Dataset

from ..accounting import AccountantKind, PrivacyAccountant
from ..clipping import ClipFunction, resolve_thresholds
from ..engine import ClippingEngine, ClipReport, LossReduction, NormMode
from ..errors import DistributedSetupError, NonFiniteNormError, PassError
from ..grouping import trainable_parameters
from ..noise import GaussianNoise
from ..sampling import poisson_loader
from . import data_parallel as dp
from .agreement import check_agreement
from .pipeline_setup import PipelineGrouping, check_layout, gather, locally, prepare_stage, raise_if_errors, stage_seed


class PrivatePipelineStage(PipelineStage):
    """A :class:`~torch.distributed.pipelining.PipelineStage` whose module is clipped by a :class:`PrivatePipeline`.

    It runs the shape inference of dynamic stages with the engine suspended, refuses split (zero-bubble) backwards
    and gradient scaling by the schedule, and clips all-layer groups when the schedule's step ends.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device, *, private, **kwargs) -> None:
        super().__init__(submodule, stage_index, num_stages, device, **kwargs)
        self._private = private

    def _prepare_forward_infra(self, *args: Any, **kwargs: Any):
        with self._private.engine.suspended():  # shape inference: a run of the module that is no training pass
            return super()._prepare_forward_infra(*args, **kwargs)

    def _prepare_backward_infra(self, *args: Any, **kwargs: Any):
        with self._private.engine.suspended():
            return super()._prepare_backward_infra(*args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        if not full_backward:
            raise PassError(
                "Split input/weight backwards (zero-bubble schedules) are not supported by groupclip: the clipped "
                "sums come from the one full backward of each microbatch. Use ScheduleGPipe or Schedule1F1B."
            )
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=True, last_backward=last_backward)

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        # Called by the schedule on every stage once all microbatches' backwards are done: a safe point for a
        # collective (nothing of this step is in flight any more).
        if grad_scale_factor != 1:
            raise DistributedSetupError(
                "The pipeline schedule scales gradients (scale_grads=True); groupclip divides the noisy clipped sum "
                "by the expected batch size at optimizer.step(). Build the schedule with scale_grads=False "
                "(PrivatePipeline.schedule does)."
            )
        super().perform_reduce_grad(1)
        self._private._end_of_schedule_step()


class PrivatePipeline:
    """The DP side of one pipeline stage: engine hooks, optimizer hooks (noise, accountant), the stage object.

    Build it with :func:`make_private_pipeline`. Attributes: ``engine``, ``stage`` (a :class:`PrivatePipelineStage`),
    ``accountant``, ``noise_multiplier``, ``sample_rate``, ``expected_batch_size``, ``sensitivity`` (the GLOBAL
    ``S``), ``stage_thresholds`` (every stage's ``{group: R_k}``), ``all_layer``, ``steps``, ``last_metrics`` and
    ``communication`` (bytes, seconds and calls of groupclip's own collectives during training, not counting the
    schedule's activation / gradient P2P traffic).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        engine: ClippingEngine,
        *,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        stage_kwargs: Mapping[str, Any],
        all_layer: bool,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        delta: float,
        accountant: AccountantKind,
        seed: int,
        secure_noise: bool,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.engine = engine
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.all_layer = all_layer
        self.stage_thresholds: list[dict[str, float]] = []
        self.sensitivity = math.nan  # the global S, from every stage's thresholds (set_stage_thresholds)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.delta = delta
        self.accountant = PrivacyAccountant(accountant)
        self.seed = seed
        self.noise = GaussianNoise(seed=stage_seed(seed, stage_index), secure=secure_noise)
        self.group = group
        self.steps = 0
        self.last_metrics: dict[str, Any] = {}
        self.communication = {"bytes": 0, "seconds": 0.0, "calls": 0}
        self._params = list(trainable_parameters(module).values())
        self._nonfinite_seen = engine.nonfinite_passes
        self._rows = 0
        self._clipped: dict[str, float] = {}
        engine.concurrent_passes = True  # the schedule runs several microbatch forwards before their backwards
        engine.defer_clipping = all_layer
        engine.defer_nonfinite_error = True  # never raise inside the schedule (the other stages would hang)
        self.stage = PrivatePipelineStage(module, stage_index, num_stages, device, private=self, **stage_kwargs)
        self._handles = [
            engine.add_report_hook(self._on_report),
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def set_stage_thresholds(self, stage_thresholds: list[dict[str, float]]) -> None:
        """Every stage's ``{group: R_k}`` (gathered once at set-up); sets the global sensitivity ``S``."""
        self.stage_thresholds = [dict(t) for t in stage_thresholds]
        if self.all_layer:  # one group shared by every stage: its R counts once
            self.sensitivity = float(stage_thresholds[0]["all"])
        else:  # disjoint groups
            self.sensitivity = math.sqrt(sum(r * r for t in stage_thresholds for r in t.values()))

    # ------------------------------------------------------------------ the loop
    def schedule(
        self,
        schedule_class: type[PipelineScheduleSingle] = ScheduleGPipe,
        *,
        n_microbatches: int,
        loss_fn: Callable[..., Tensor],
        **kwargs: Any,
    ) -> PipelineScheduleSingle:
        """``schedule_class(self.stage, n_microbatches, loss_fn=loss_fn, scale_grads=False, **kwargs)``.

        ``loss_fn(output, target)`` is the loss of one microbatch, reduced as declared by ``loss_reduction``.
        """
        if not (isinstance(schedule_class, type) and issubclass(schedule_class, PipelineScheduleSingle)):
            raise DistributedSetupError(
                f"{getattr(schedule_class, '__name__', schedule_class)} is not a single-stage schedule; groupclip "
                "supports one stage per process with ScheduleGPipe or Schedule1F1B."
            )
        if kwargs.pop("scale_grads", False):
            raise DistributedSetupError("scale_grads=True: groupclip divides by the expected batch size itself.")
        return schedule_class(self.stage, n_microbatches, loss_fn=loss_fn, scale_grads=False, **kwargs)

    def poisson_loader(self, dataset: Dataset, **loader_kwargs: Any) -> DataLoader:
        """A Poisson-sampling loader at this run's rate: every stage draws the same batches (shared seed)."""
        return poisson_loader(dataset, self.sample_rate, seed=self.seed + 1, **loader_kwargs)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's); the same on every stage."""
        return self.accountant.epsilon(self.delta if delta is None else delta)

    def detach(self) -> None:
        """Remove the optimizer hooks and detach the engine (the stage module trains non-privately afterwards)."""
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles = []
            if self.engine.attached:
                self.engine.detach()

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        start = time.perf_counter()
        home = tensor.device
        tensor = tensor.to(dp.collective_device(self.group))  # NCCL reduces GPU tensors only
        dist.all_reduce(tensor, op=op, group=self.group)
        self.communication["seconds"] += time.perf_counter() - start
        self.communication["bytes"] += tensor.numel() * tensor.element_size()
        self.communication["calls"] += 1
        return tensor.to(home)

    def _clip_deferred(self) -> None:
        """All-layer: one all-reduce of every deferred microbatch's squared per-sample norms, then clip them all."""
        local = self.engine.deferred_squared_norms()
        passes = float(self.engine.deferred_passes)
        header = self._all_reduce(
            torch.tensor([passes, local.numel(), -passes, -local.numel()], dtype=torch.float64), dist.ReduceOp.MAX
        )
        if header[0] != -header[2] or header[1] != -header[3]:
            raise PassError(
                f"The pipeline stages hold different microbatches to clip (stage {self.stage_index}: {passes:.0f} "
                f"passes, {local.numel()} samples; max over stages {header[0]:.0f} / {header[1]:.0f}). Run every "
                "backward through the schedule, the same on every stage."
            )
        if header[0] > 0:
            self.engine.clip_deferred(lambda flat: self._all_reduce(flat.contiguous()))

    def _end_of_schedule_step(self) -> None:
        if self.all_layer:
            self._clip_deferred()

    # ------------------------------------------------------------------ hooks
    def _on_report(self, report: ClipReport) -> None:
        self._rows += report.batch_size
        for group, factors in report.clip_factors.items():
            self._clipped[group] = self._clipped.get(group, 0.0) + float((factors < 1).sum())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        failed = self.engine.nonfinite_passes != self._nonfinite_seen or any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self._params
        )
        flags = self._all_reduce(
            torch.tensor([float(failed), float(self.engine.deferred_passes > 0)], dtype=torch.float64),
            dist.ReduceOp.MAX,
        )
        if flags[1] > 0:  # backwards run outside a schedule step (e.g. by hand): clip them now, on every stage
            self._clip_deferred()
            failed = bool(flags[0] > 0) or self.engine.nonfinite_passes != self._nonfinite_seen
            failed = bool(self._all_reduce(torch.tensor([float(failed)], dtype=torch.float64), dist.ReduceOp.MAX)[0])
        else:
            failed = bool(flags[0] > 0)
        self._nonfinite_seen = self.engine.nonfinite_passes
        if failed:
            self._rows, self._clipped = 0, {}
            raise NonFiniteNormError(
                "A pipeline stage had non-finite per-sample norms (or a non-finite clipped sum) in this batch; the "
                "step was not taken on any stage (parameters, optimizer state, accountant unchanged). Call "
                "optimizer.zero_grad() on every stage and continue with the next batch."
            )
        std = self.noise_multiplier * self.sensitivity
        self._noise_std = std
        with torch.no_grad():
            for p in self._params:
                noise = self.noise.sample(p.shape, std, dtype=p.dtype, device=p.device)
                grad = noise if p.grad is None else p.grad.add_(noise)
                p.grad = grad.div_(self.expected_batch_size)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.steps += 1
        self.last_metrics = {
            "step": self.steps,
            "noise_std": self._noise_std,
            "sensitivity": self.sensitivity,
            "thresholds": dict(self.engine.thresholds),
            "rows": self._rows,  # padded rows included
            "clipped_rows": dict(self._clipped),
        }
        self._rows, self._clipped = 0, {}


def make_private_pipeline(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    stage_index: int,
    num_stages: int,
    device: torch.device | str = "cpu",
    grouping: PipelineGrouping = "per-device",
    max_grad_norm: float | Mapping[str, float] = 1.0,
    clip_fn: str | ClipFunction = "abadi",
    clip_options: Mapping[str, float] | None = None,
    loss_reduction: LossReduction = "sum",
    norm_mode: NormMode | Mapping[str, NormMode] = "auto",
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float | None = None,
    batch_size: int | None = None,
    data_size: int | None = None,
    accountant: AccountantKind = "rdp",
    seed: int | None = None,
    secure_noise: bool = False,
    group: dist.ProcessGroup | None = None,
    input_args: Tensor | tuple[Tensor, ...] | None = None,
    output_args: Tensor | tuple[Tensor, ...] | None = None,
) -> PrivatePipeline:
    """Make one pipeline stage train with DP; call it on every stage's process (collective).

    Args:
        module: this stage's module (parameter names distinct across stages, see the module docstring).
        optimizer: this stage's optimizer, over exactly the module's trainable parameters.
        stage_index, num_stages: this stage and the pipeline length; stage ``i`` runs on rank ``i`` of ``group``.
        device: the stage's device (``PipelineStage``'s).
        grouping: ``"per-device"`` (default), ``"all-layer"`` (one group across all stages: one all-reduce of
            per-sample squared norms per schedule step), or any grouping whose groups each lie within one stage.
        max_grad_norm: total R (M groups over all stages get ``R / sqrt(M)`` each; all-layer: R), or
            ``{group: R_k}`` over all stages' groups (per-device groups are named ``"stage0"``, ``"stage1"``, ...).
        clip_fn, clip_options, norm_mode: as for :class:`~groupclip.ClippingEngine`.
        loss_reduction: of ``loss_fn`` over one microbatch; default ``"sum"`` (padding with zero-gradient rows
            needs it).
        noise_multiplier, target_epsilon, target_delta, epochs, steps, sample_rate, batch_size, data_size,
            accountant, seed, secure_noise: as for :func:`~groupclip.make_private` (``batch_size`` is the expected
            logical batch size, over all chunks and microbatches).
        group: the pipeline's process group (default: the world).
        input_args, output_args: example stage inputs / outputs for ``PipelineStage`` (optional: shapes are
            inferred otherwise, with the engine suspended).

    Returns:
        The :class:`PrivatePipeline`, attached. Call ``detach()`` in a ``finally``.

    Raises:
        DistributedSetupError: on every stage, for a group spanning stages, a parameter name on two stages, stages
            disagreeing on the privacy settings, or an invalid argument on any stage (its message is named).

    Example (one process per stage, e.g. ``torchrun --nproc-per-node 2``)::

        rank = dist.get_rank()
        stage_module = full_model_stage(rank)          # this stage's layers, with the full model's names
        optimizer = torch.optim.SGD(stage_module.parameters(), lr=0.1)
        private = make_private_pipeline(stage_module, optimizer, stage_index=rank, num_stages=2,
                                        grouping="per-device", noise_multiplier=1.0, batch_size=64, data_size=6000)
        try:
            schedule = private.schedule(Schedule1F1B, n_microbatches=4, loss_fn=loss_fn)
            ...
        finally:
            private.detach()
    """
    rank, world = dp.require_process_group(group)
    all_layer = grouping == "all-layer"
    prepared: dict[str, Any] = {}
    privacy = {
        "noise_multiplier": noise_multiplier,
        "target_epsilon": target_epsilon,
        "target_delta": target_delta,
        "epochs": epochs,
        "steps": steps,
        "sample_rate": sample_rate,
        "batch_size": batch_size,
        "data_size": data_size,
        "accountant": accountant,
    }
    local_error = locally(
        lambda: prepared.update(
            prepare_stage(
                module,
                optimizer,
                rank=rank,
                world=world,
                stage_index=stage_index,
                num_stages=num_stages,
                grouping=grouping,
                **privacy,
            )
        )
    )
    gathered = gather({"error": local_error, "layout": prepared.get("layout")}, group)
    raise_if_errors([g["error"] for g in gathered], "set-up")
    seed = dp.shared_seed(seed, group)
    check_agreement(
        {
            "num_stages": num_stages,
            "grouping": grouping,
            "max_grad_norm": max_grad_norm,
            "clip_fn": clip_fn if isinstance(clip_fn, str) else type(clip_fn).__qualname__,
            "clip_options": dict(clip_options or {}),
            "loss_reduction": loss_reduction,
            "noise_multiplier": prepared["noise_multiplier"],
            "sample_rate": prepared["sample_rate"],
            "data_size": data_size,
            "delta": prepared["delta"],
            "accountant": accountant,
            "planned_steps": prepared["planned"],
            "seed": seed,
            "secure_noise": secure_noise,
        },
        what="privacy settings of the pipeline stages",
        group=group,
    )
    layouts = [g["layout"] for g in gathered]
    global_groups = check_layout(layouts, grouping, all_layer)
    if all_layer:
        thresholds_of = {"all": float(max_grad_norm)} if not isinstance(max_grad_norm, Mapping) else max_grad_norm
    else:
        thresholds_of = max_grad_norm
    box: list[PrivatePipeline] = []

    def build() -> None:
        everything = resolve_thresholds(global_groups, thresholds_of)
        local = layouts[rank]["groups"]
        engine = ClippingEngine(
            module,
            grouping={g: ["re:" + re.escape(n) for n in names] for g, names in local.items()},
            max_grad_norm={g: everything[g] for g in local},
            clip_fn=clip_fn,
            clip_options=clip_options,
            loss_reduction=loss_reduction,
            norm_mode=norm_mode,
        )
        engine.attach()
        try:
            box.append(
                PrivatePipeline(
                    module,
                    optimizer,
                    engine,
                    stage_index=stage_index,
                    num_stages=num_stages,
                    device=torch.device(device),
                    stage_kwargs={"input_args": input_args, "output_args": output_args, "group": group},
                    all_layer=all_layer,
                    noise_multiplier=prepared["noise_multiplier"],
                    sample_rate=prepared["sample_rate"],
                    expected_batch_size=prepared["sample_rate"] * data_size,
                    delta=prepared["delta"],
                    accountant=accountant,
                    seed=seed,
                    secure_noise=secure_noise,
                    group=group,
                )
            )
        except BaseException:
            engine.detach()
            raise

    error = locally(build)
    # The one exchange of thresholds: every stage learns every group's R_k, hence the global sensitivity.
    gathered = gather({"error": error, "thresholds": box[0].engine.thresholds if box else None}, group)
    try:
        raise_if_errors([g["error"] for g in gathered], "engine set-up")
        box[0].set_stage_thresholds([g["thresholds"] for g in gathered])
    except BaseException:
        if box:
            box[0].detach()
        raise
    return box[0]


def fixed_size_chunks(batch: Tensor, size: int, fill: float = 0) -> list[Tensor]:
    """Split ``batch`` (batch on dim 0) into chunks of exactly ``size`` rows, the last padded with ``fill``.

    Always at least one chunk (an empty Poisson batch gives one chunk of padding). Every stage gets the same number
    of chunks for the same batch. Padded rows must get zero gradient from the loss (see the module docstring).

    Example:
        >>> [c.tolist() for c in fixed_size_chunks(torch.tensor([1, 2, 3]), 2, fill=-100)]
        [[1, 2], [3, -100]]
    """
    if size < 1:
        raise ValueError(f"Expected size={size} >= 1.")
    chunks = []
    for start in range(0, max(batch.shape[0], 1), size):
        chunk = batch[start : start + size]
        if chunk.shape[0] < size:
            pad = torch.full((size - chunk.shape[0], *batch.shape[1:]), fill, dtype=batch.dtype, device=batch.device)
            chunk = torch.cat([chunk, pad])
        chunks.append(chunk)
    return chunks


__all__ = ["PrivatePipeline", "PrivatePipelineStage", "fixed_size_chunks", "make_private_pipeline"]
