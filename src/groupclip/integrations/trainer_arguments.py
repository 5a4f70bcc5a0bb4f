"""The settings of a :class:`~groupclip.integrations.transformers.PrivateTrainer` run: :class:`PrivacyArguments`
(the DP settings), and the checks of the Trainer's own settings that DP training refuses."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..adaptive import AdaptiveClipping
from ..grouping import GroupingSpec
from .per_sample_losses import LOSS_TYPES, LossType
from .trainer_errors import TrainerSetupError

if TYPE_CHECKING:
    from transformers import Trainer

TRAINER_DEFAULT_MAX_GRAD_NORM = 1.0
"""``TrainingArguments.max_grad_norm``'s default, accepted (and ignored) as well as 0."""


@dataclass
class PrivacyArguments:
    """The DP settings of a :class:`PrivateTrainer` run (the rest comes from ``TrainingArguments``).

    No field name clashes with one of ``TrainingArguments``.

    Attributes:
        target_epsilon: calibrate the noise multiplier to reach this epsilon at the end of training (with
            ``target_delta``), over the number of steps the Trainer will take. Give this or ``noise_multiplier``.
        target_delta: the delta of the guarantee; default ``min(1e-5, 1 / (10 N))`` (required with
            ``target_epsilon``).
        noise_multiplier: a fixed noise multiplier sigma instead of ``target_epsilon``.
        per_sample_max_grad_norm: the per-sample clipping threshold R in total over the groups (each of M groups gets
            ``R / sqrt(M)``), or ``{group: R_k}``. Not ``TrainingArguments.max_grad_norm``, which is neutralised.
        grouping: the groupclip grouping (``"all-layer"``, ``"layer-wise"``, ``"param-wise"``, an int M, explicit
            groups, a callable); see the README.
        clip_fn: ``"abadi"`` or ``"automatic"`` (or a ``ClipFunction``); ``clip_options`` its options.
        norm_mode: ``"auto"``, ``"ghost"``, ``"instantiate"`` or per-module overrides.
        logical_batch_size: the EXPECTED Poisson batch size B (sample rate ``q = B / N``); default the
            ``per_device_train_batch_size`` (then logical and physical batches have the same expected size).
        loss_reduction: how the loss handed to backward combines the per-sample losses of a physical batch:
            ``"mean"`` or ``"sum"``. The resulting update is the same either way.
        loss_type: which per-sample loss to use (:func:`per_sample_losses`); ``"auto"`` reads the model class
            (``*ForCausalLM`` / ``*LMHeadModel``, ``*ForSequenceClassification``, ``*ForTokenClassification``,
            ``*ForMaskedLM``, through PEFT wrappers).
        accountant: ``"rdp"`` or ``"pld"``.
        adaptive: optional :class:`~groupclip.AdaptiveClipping` (per-group thresholds that adapt).
        noise_seed: ``make_private``'s ``noise_seed``: the seed of the Gaussian noise and of the Poisson sampler
            (default: both from the OS). Anyone who knows it can regenerate the noise and the batches: use one for
            tests and reproductions only.
        secure_noise: draw the noise from the OS's cryptographic generator (slower; no seed).
        trim_padding: when the batch has a 2-D ``attention_mask``, order each Poisson batch by length (longest
            first) before splitting it into physical batches, and drop from each physical batch the trailing
            columns that none of its rows attends to (from every tensor shaped ``[rows, columns, ...]`` like the
            mask). The per-sample losses do not change (for right padding, with labels ``-100`` on padding), only
            the wasted compute on padding; set False for a model whose output depends on padded positions.
        extra: further keyword arguments for :func:`groupclip.make_private`.
    """

    target_epsilon: float | None = None
    target_delta: float | None = None
    noise_multiplier: float | None = None
    per_sample_max_grad_norm: float | dict[str, float] = 1.0
    grouping: GroupingSpec = "all-layer"
    clip_fn: Any = "abadi"
    clip_options: dict[str, float] | None = None
    norm_mode: Any = "auto"
    logical_batch_size: int | None = None
    loss_reduction: Literal["mean", "sum"] = "mean"
    loss_type: LossType = "auto"
    accountant: Literal["rdp", "pld"] = "rdp"
    adaptive: AdaptiveClipping | None = None
    noise_seed: int | None = None
    secure_noise: bool = False
    trim_padding: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise TrainerSetupError(f"PrivacyArguments(loss_type={self.loss_type!r}): expected one of {LOSS_TYPES}.")
        if self.loss_reduction not in ("mean", "sum"):
            raise TrainerSetupError(
                f"PrivacyArguments(loss_reduction={self.loss_reduction!r}): expected 'mean' or 'sum'."
            )
        if self.logical_batch_size is not None and self.logical_batch_size < 1:
            raise TrainerSetupError(
                f"PrivacyArguments(logical_batch_size={self.logical_batch_size}): expected a positive expected batch "
                "size."
            )


def check_trainer_setup(trainer: Trainer) -> None:
    """Refuse the ``Trainer`` settings that would not give the stated DP guarantee or a correct update (and warn
    about a sampling strategy that Poisson sampling replaces)."""
    args = trainer.args
    if args.gradient_accumulation_steps != 1:
        raise TrainerSetupError(
            f"TrainingArguments(gradient_accumulation_steps={args.gradient_accumulation_steps}): PrivateTrainer "
            "forms the logical batches itself (one Poisson batch per optimizer step, split into physical batches "
            "of per_device_train_batch_size). Set gradient_accumulation_steps=1 and give the expected logical "
            "batch size as PrivacyArguments(logical_batch_size="
            f"{args.per_device_train_batch_size * args.gradient_accumulation_steps})."
        )
    if args.max_grad_norm not in (None, 0, TRAINER_DEFAULT_MAX_GRAD_NORM):
        raise TrainerSetupError(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}) would clip the SUM of the clipped per-sample "
            "gradients before the noise is added, shrinking the signal but not the noise. PrivateTrainer clips "
            "each sample's gradient instead: set the threshold as PrivacyArguments(per_sample_max_grad_norm="
            f"{args.max_grad_norm}) and leave max_grad_norm at 0 (or its default 1.0, which PrivateTrainer "
            "ignores)."
        )
    if args.world_size > 1 or args.n_gpu > 1:
        raise TrainerSetupError(
            f"PrivateTrainer runs in one process on one device (world_size={args.world_size}, "
            f"n_gpu={args.n_gpu}): DistributedDataParallel and DataParallel need autograd parameter gradients, "
            "which groupclip's one-pass clipping does not produce. Use one device (CUDA_VISIBLE_DEVICES), or "
            "a plain loop with groupclip.make_private(..., distributed=True) under torchrun."
        )
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise TrainerSetupError(
            "PrivateTrainer does not support DeepSpeed or the Trainer's FSDP: unset deepspeed / fsdp. For sharded "
            "DP training, see groupclip.distributed.sharded.make_private_sharded."
        )
    if args.fp16:
        raise TrainerSetupError(
            "TrainingArguments(fp16=True) scales the loss before backward (GradScaler), so the per-sample norms "
            "groupclip clips would be those of scaled gradients. Use bf16=True or full precision."
        )
    if trainer.model_init is not None:
        raise TrainerSetupError(
            "PrivateTrainer does not support model_init (a model re-created at each train() call would leave "
            "the privacy engine on the old one); pass model= instead."
        )
    if trainer.compute_loss_func is not None:
        raise TrainerSetupError(
            "compute_loss_func returns one loss for the whole batch; DP needs one loss per sample. Subclass "
            "PrivateTrainer and override per_sample_loss(model, inputs) instead."
        )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in (None, "random") or getattr(args, "group_by_length", False):
        warnings.warn(
            f"TrainingArguments(train_sampling_strategy={strategy!r}) is ignored: PrivateTrainer samples the "
            "batches by Poisson sampling, which the privacy accounting assumes.",
            stacklevel=3,
        )
