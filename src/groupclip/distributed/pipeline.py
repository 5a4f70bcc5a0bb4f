"""Pipeline-parallel DP training on ``torch.distributed.pipelining``: per-device or all-layer clipping.

One process per pipeline stage (single-stage schedules: ``ScheduleGPipe``, ``Schedule1F1B``). Each process calls
:func:`make_private_pipeline` on its stage module and optimizer, builds its schedule with ``private.schedule(...)``,
pads Poisson batches to fixed-size chunks with :func:`fixed_size_chunks`, and trains as usual.

* ``"per-device"`` (or any grouping whose groups each lie within one stage): each stage clips its own groups inside
  its own backward; no per-sample norm crosses stages.
* ``"all-layer"``: one group over every stage; clipping is deferred to the end of the schedule's step, when one
  all-reduce of the per-sample squared norms gives every stage the global norms.

Each stage adds noise to its own parameters, scaled by the GLOBAL sensitivity over every stage's groups. Set-up
errors are raised on every stage together. Usage, batches and padding, parameter names, what is not supported:
``docs/DISTRIBUTED.md``, section "Pipeline stages"; the mathematics: ``docs/MATH.md``, section "Distributed
training".
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, ScheduleGPipe

from ..accounting import AccountantKind
from ..clipping import ClipFunction, resolve_thresholds, sensitivity
from ..engine import ClippingEngine, LossReduction, NormMode
from ..errors import DistributedSetupError, PassError
from ..private import PrivateTraining, build_private
from ..setup_checks import check_seed
from ..topology import Topology
from . import data_parallel as dp
from .agreement import check_agreement
from .pipeline_setup import PipelineGrouping, check_layout, gather, locally, prepare_stage, raise_if_errors, stage_seed


class PrivatePipelineStage(PipelineStage):
    """A :class:`~torch.distributed.pipelining.PipelineStage` whose module is clipped by a
    :class:`PipelineStageTopology`.

    It runs the shape inference of dynamic stages with the engine suspended, refuses split (zero-bubble) backwards
    and gradient scaling by the schedule, and clips all-layer groups when the schedule's step ends.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device, *, private, **kwargs) -> None:
        super().__init__(submodule, stage_index, num_stages, device, **kwargs)
        self._topology = private

    def _prepare_forward_infra(self, *args: Any, **kwargs: Any):
        with self._topology.engine.suspended():  # shape inference: a run of the module that is no training pass
            return super()._prepare_forward_infra(*args, **kwargs)

    def _prepare_backward_infra(self, *args: Any, **kwargs: Any):
        with self._topology.engine.suspended():
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
                "(private.schedule(...) does)."
            )
        super().perform_reduce_grad(1)
        self._topology.end_of_schedule_step()


class PipelineStageTopology(Topology):
    """One pipeline stage per process: each stage steps its own parameters and adds their noise; the sensitivity is
    the GLOBAL one over every stage's groups; all-layer groups are clipped when the schedule's step ends.

    Reached through the :class:`~groupclip.PrivateTraining` it serves: ``private.schedule(...)``,
    ``private.stage``, ``private.stage_thresholds``, ``private.communication`` (bytes, seconds and calls of
    groupclip's own collectives, not counting the schedule's P2P traffic).
    """

    name = "pipeline-stage"
    exports = ("schedule", "stage", "stage_thresholds", "communication", "stage_index", "num_stages", "all_layer")

    def __init__(
        self,
        *,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        stage_kwargs: Mapping[str, Any],
        all_layer: bool,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.rank, self.world_size = dp.require_process_group(group)
        self.stage_index, self.num_stages, self.device = stage_index, num_stages, device
        self.stage_kwargs = dict(stage_kwargs)
        self.all_layer = all_layer
        self.group = group
        self.stage_thresholds: list[dict[str, float]] = []
        self.communication = {"bytes": 0, "seconds": 0.0, "calls": 0}
        self.stage: PrivatePipelineStage | None = None

    def noise_seed(self, seed: int | None) -> int | None:
        return None if seed is None else stage_seed(seed, self.stage_index)

    def shared_seed(self, seed: int | None) -> int:
        return dp.shared_seed(seed, self.group)  # every stage draws the same Poisson batches

    def bind(self, engine: ClippingEngine, params: list[nn.Parameter]) -> None:
        super().bind(engine, params)
        engine.concurrent_passes = True  # the schedule runs several microbatch forwards before their backwards
        engine.defer_clipping = self.all_layer
        self.stage = PrivatePipelineStage(
            engine.model, self.stage_index, self.num_stages, self.device, private=self, **self.stage_kwargs
        )

    def set_stage_thresholds(self, stage_thresholds: list[dict[str, float]]) -> None:
        """Every stage's ``{group: R_k}`` (gathered once at set-up)."""
        self.stage_thresholds = [dict(t) for t in stage_thresholds]

    def sensitivity(self) -> float:
        if self.all_layer:  # one group shared by every stage: its R counts once
            return float(self.stage_thresholds[0]["all"])
        return sensitivity({f"{k}/{g}": r for k, t in enumerate(self.stage_thresholds) for g, r in t.items()})

    def schedule(
        self,
        schedule_class: type[PipelineScheduleSingle] = ScheduleGPipe,
        *,
        n_microbatches: int,
        loss_fn: Callable[..., Tensor],
        **kwargs: Any,
    ) -> PipelineScheduleSingle:
        """``schedule_class(stage, n_microbatches, loss_fn=loss_fn, scale_grads=False, **kwargs)``.

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

    def end_of_schedule_step(self) -> None:
        if self.all_layer:
            self._clip_deferred()

    def finish_gradients(self, noise: Any, std: float, expected_batch_size: float) -> None:
        if self.all_layer:
            # backwards run outside a schedule step (e.g. by hand) are clipped now, on every stage together
            pending = self._all_reduce(
                torch.tensor([float(self.engine.deferred_passes > 0)], dtype=torch.float64), dist.ReduceOp.MAX
            )
            if pending[0] > 0:
                self._clip_deferred()
        super().finish_gradients(noise, std, expected_batch_size)


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
    noise_seed: int | None = None,
    seed: int | None = None,
    secure_noise: bool = False,
    group: dist.ProcessGroup | None = None,
    input_args: Tensor | tuple[Tensor, ...] | None = None,
    output_args: Tensor | tuple[Tensor, ...] | None = None,
) -> PrivateTraining:
    """Make one pipeline stage train with DP; call it on every stage's process (collective).

    Args:
        module: this stage's module (parameter names distinct across stages, see ``docs/DISTRIBUTED.md``).
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
            accountant, noise_seed, secure_noise: as for :func:`~groupclip.make_private` (``batch_size`` is the expected
            logical batch size, over all chunks and microbatches).
        group: the pipeline's process group (default: the world).
        input_args, output_args: example stage inputs / outputs for ``PipelineStage`` (optional: shapes are
            inferred otherwise, with the engine suspended).

    Returns:
        The :class:`~groupclip.PrivateTraining` (topology :class:`PipelineStageTopology`), attached. Call
        ``detach()`` in a ``finally``.

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
    plan = prepared["plan"]
    noise_seed = check_seed("noise_seed", noise_seed if noise_seed is not None else seed)
    check_agreement(
        {
            "num_stages": num_stages,
            "grouping": grouping,
            "max_grad_norm": max_grad_norm,
            "clip_fn": clip_fn if isinstance(clip_fn, str) else type(clip_fn).__qualname__,
            "clip_options": dict(clip_options or {}),
            "loss_reduction": loss_reduction,
            "plan": repr(plan),
            "seeded": noise_seed is not None,
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
    topology = PipelineStageTopology(
        stage_index=stage_index,
        num_stages=num_stages,
        device=torch.device(device),
        stage_kwargs={"input_args": input_args, "output_args": output_args, "group": group},
        all_layer=all_layer,
        group=group,
    )
    box: list[PrivateTraining] = []

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
            nonfinite="drop",
        )
        box.append(build_private(module, optimizer, engine, plan, topology, noise_seed, secure_noise, None))

    error = locally(build)
    # The one exchange of thresholds: every stage learns every group's R_k, hence the global sensitivity.
    gathered = gather({"error": error, "thresholds": box[0].engine.thresholds if box else None}, group)
    try:
        raise_if_errors([g["error"] for g in gathered], "engine set-up")
        topology.set_stage_thresholds([g["thresholds"] for g in gathered])
    except BaseException:
        if box:
            box[0].detach()
        raise
    return box[0]


def fixed_size_chunks(batch: Tensor, size: int, fill: float = 0) -> list[Tensor]:
    """Split ``batch`` (batch on dim 0) into chunks of exactly ``size`` rows, the last padded with ``fill``.

    Always at least one chunk (an empty Poisson batch gives one chunk of padding). Every stage gets the same number
    of chunks for the same batch. Padded rows must get zero gradient from the loss (see ``docs/DISTRIBUTED.md``,
    section "Pipeline stages").

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


__all__ = ["PipelineStageTopology", "PrivatePipelineStage", "fixed_size_chunks", "make_private_pipeline"]
