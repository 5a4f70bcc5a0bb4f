"""DP training with the Hugging Face ``Trainer``: :class:`PrivateTrainer` and :class:`PrivacyArguments`.

    from transformers import DataCollatorWithPadding, TrainingArguments
    from groupclip.integrations.transformers import PrivacyArguments, PrivateTrainer

    args = TrainingArguments("out", per_device_train_batch_size=64,   # the PHYSICAL batch size
                             num_train_epochs=3, learning_rate=1e-3, report_to="none")
    privacy = PrivacyArguments(target_epsilon=3.0, target_delta=1e-5,
                               logical_batch_size=512,                # expected Poisson batch size
                               per_sample_max_grad_norm=1.0, grouping="all-layer")
    trainer = PrivateTrainer(model=model, args=args, privacy=privacy, train_dataset=train,
                             eval_dataset=test, data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()                  # every log line carries "epsilon"; checkpoints carry the privacy state
    trainer.private.epsilon()        # the groupclip PrivateTraining behind it

What :class:`PrivateTrainer` changes in the ``Trainer``:

- **Sampling.** The train dataloader is ``private.poisson_loader(train_dataset, collate_fn=data_collator)``: each
  example joins each step's batch independently with probability ``q = logical_batch_size / N``, as the
  accountant assumes. One epoch is ``round(N / logical_batch_size)`` steps. Batches vary in size and can be
  empty; an empty batch runs no forward pass, but the optimizer step is still taken (it applies noise only) and
  the accountant counts it.
- **Logical and physical batches.** One Poisson batch is one optimizer step. ``training_step`` splits it into
  physical batches of ``per_device_train_batch_size`` (:func:`groupclip.physical_batches`), one forward and
  backward pass each; the clipped per-sample gradients add up in ``.grad`` and the noise is added once, at
  ``optimizer.step()``. The Trainer's own ``gradient_accumulation_steps`` must therefore stay 1. With an
  ``attention_mask``, the rows are first ordered by length and each physical batch drops its trailing all-padding
  columns (``PrivacyArguments.trim_padding``), which changes no per-sample loss.
- **Per-sample losses.** The loss handed to backward is the mean (``loss_reduction="mean"``, the default) or the
  sum (``"sum"``) over the physical batch of per-sample losses, where a sample's loss is its OWN mean over its
  labelled tokens (causal LM: shifted labels, ``-100`` and padding excluded; token classification and masked LM:
  the same without the shift) or its classification / regression loss (sequence classification). Padding does
  not change a sample's loss and every sample weighs the same, whatever its length. (The Hugging Face models'
  own loss is a mean over all the tokens of the batch, which is not a sum of per-sample terms under padding.) See
  :func:`per_sample_losses`; override :meth:`PrivateTrainer.per_sample_loss` for any other loss.
- **The Trainer's max_grad_norm is neutralised.** ``TrainingArguments.max_grad_norm`` (default 1.0) would clip
  the SUM of the clipped per-sample gradients before the noise is added (the pre-hook runs inside
  ``optimizer.step()``): with a sum of B gradients of norm up to R, that scales the signal down by up to B R and
  leaves the noise as it is. The default 1.0 and 0 are accepted and ignored; any other value is refused, since it
  shows that the user expected it to act. The per-sample threshold is
  ``PrivacyArguments.per_sample_max_grad_norm``. The Trainer's ``grad_norm`` log entry is dropped too: it is the
  norm of the clipped sum before noise, a statistic of the data that the DP guarantee does not cover.
- **Logs** carry ``epsilon`` (spent so far, at the run's delta).
- **Checkpoints** carry the privacy state (``groupclip_privacy.pt``: thresholds, accountant ledger, noise and
  sampler generator states, step count); ``train(resume_from_checkpoint=...)`` restores it, so the resumed run
  reports the same epsilon and takes bit-identical next steps. The sampler state replaces the Trainer's skipping
  of already-seen batches. A checkpoint without it (``save_only_model=True``, or a non-private Trainer) is
  refused, since resuming from it would restart the epsilon at 0.
- **Calibration.** With ``target_epsilon``, the noise multiplier is calibrated for the number of steps the
  Trainer will take: ``max_steps`` if set, else ``ceil(num_train_epochs * round(N / logical_batch_size))``.

Why a subclass and not a ``TrainerCallback``: callbacks see neither the batches nor the loss. DP training has to
replace the train dataloader (the Trainer builds fixed-size shuffled batches itself), the loss (per-sample losses),
the backward (several physical batches per step, none at all for an empty batch), switch off the Trainer's
gradient clipping and ``grad_norm`` logging, and add state to checkpoints and restore it. All of these are
``Trainer`` methods.

PEFT models (LoRA and the others) work as they are: the optimizer gets the trainable parameters only, and groupclip
groups, clips and noises the trainable parameters only; the frozen base weights cost nothing.

Refused, each with a message: ``gradient_accumulation_steps != 1``, ``max_grad_norm`` other than 0 or the default,
more than one process or GPU (DDP, ``DataParallel``, DeepSpeed, FSDP), ``fp16`` (loss scaling would scale the
per-sample norms), ``model_init`` and ``compute_loss_func``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from ..private import PrivateTraining, make_private
from ..sampling import physical_batches
from .accelerate import unwrap_optimizer
from .per_sample_losses import LossType, infer_loss_type, logits_of, per_sample_losses
from .trainer_arguments import PrivacyArguments, check_trainer_setup
from .trainer_data import PoissonEpochs, batch_rows, by_length, poisson_loader_options, without_trailing_padding
from .trainer_errors import TrainerSetupError

__all__ = [
    "PRIVACY_STATE_NAME",
    "LossType",
    "PrivacyArguments",
    "PrivateTrainer",
    "TrainerSetupError",
    "infer_loss_type",
    "per_sample_losses",
]

PRIVACY_STATE_NAME = "groupclip_privacy.pt"
"""File name of the privacy state inside a Trainer checkpoint folder."""


class PrivateTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP through groupclip (see the module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        privacy: the DP settings (required).

    Attributes:
        private: the :class:`~groupclip.PrivateTraining` (engine, accountant, noise, sampler), created when
            training starts (``None`` before). It stays attached after ``train()``; ``private.detach()`` makes
            the model and optimizer ordinary again.
        privacy: the :class:`PrivacyArguments`.

    Raises:
        TrainerSetupError: settings that would not give the stated DP guarantee or a correct update.
    """

    def __init__(self, *args: Any, privacy: PrivacyArguments | None = None, **kwargs: Any) -> None:
        if privacy is None:
            raise TrainerSetupError(
                "PrivateTrainer needs privacy=PrivacyArguments(...) (target_epsilon and target_delta, or "
                "noise_multiplier; per_sample_max_grad_norm; logical_batch_size)."
            )
        if not isinstance(privacy, PrivacyArguments):
            raise TrainerSetupError(f"privacy={type(privacy).__name__}: expected a PrivacyArguments.")
        self.privacy = privacy
        self.private: PrivateTraining | None = None
        self._loss_type: str | None = None
        self._epsilon_cache: tuple[int, float] | None = None
        super().__init__(*args, **kwargs)
        if "labels" not in self.label_names:  # keep them through remove_unused_columns: the loss is computed here
            self.label_names = [*self.label_names, "labels"]
        check_trainer_setup(self)
        self.add_callback(PoissonEpochs(self))

    # ------------------------------------------------------------------ privacy set-up and data
    def _create_private(self) -> PrivateTraining:
        """``make_private`` on the model and the Trainer's optimizer, for the steps this run will take."""
        data_size = len(self.train_dataset)
        batch_size = self.privacy.logical_batch_size or self.args.per_device_train_batch_size
        if batch_size > data_size:
            raise TrainerSetupError(
                f"PrivacyArguments(logical_batch_size={batch_size}) exceeds the {data_size} training examples."
            )
        self._steps_per_epoch = max(1, round(data_size / batch_size))
        if self.args.max_steps > 0:
            planned = self.args.max_steps
        else:
            planned = math.ceil(self.args.num_train_epochs * self._steps_per_epoch)
        optimizer = unwrap_optimizer(self.create_optimizer())
        p = self.privacy
        kwargs: dict[str, Any] = dict(
            grouping=p.grouping,
            max_grad_norm=p.per_sample_max_grad_norm,
            clip_fn=p.clip_fn,
            clip_options=p.clip_options,
            loss_reduction=p.loss_reduction,
            norm_mode=p.norm_mode,
            noise_multiplier=p.noise_multiplier,
            target_epsilon=p.target_epsilon,
            target_delta=p.target_delta,
            steps=planned,
            batch_size=batch_size,
            data_size=data_size,
            accountant=p.accountant,
            adaptive=p.adaptive,
            secure_noise=p.secure_noise,
            **p.extra,
        )
        kwargs.update(_seed_arguments(p.noise_seed))
        return make_private(self.model, optimizer, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """The Poisson-sampling loader (``private.poisson_loader``); creates the privacy engine on first use."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if not hasattr(self.train_dataset, "__len__") or isinstance(
            self.train_dataset, torch.utils.data.IterableDataset
        ):
            raise TrainerSetupError(
                "Poisson sampling needs a map-style train_dataset with a length (an IterableDataset cannot be "
                "sampled example by example)."
            )
        if self.private is None:
            self.private = self._create_private()
        dataset, collate = self.train_dataset, self.data_collator
        try:  # the Trainer's own column handling for datasets.Dataset and other datasets
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        loader_kwargs = poisson_loader_options(self.args)
        return self.private.poisson_loader(dataset, collate_fn=collate, steps=self._steps_per_epoch, **loader_kwargs)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """Unchanged: the restored sampler state already continues after the last batch of the checkpoint."""
        return dataloader

    # ------------------------------------------------------------------ loss and step
    def per_sample_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        """``(losses [B], model outputs)`` for a (physical) batch; override for a custom per-sample loss.

        The labels are taken out of ``inputs`` before the forward pass (the model's own batch-mean loss is not
        computed) and :func:`per_sample_losses` is applied to the logits. A causal LM batch without labels uses
        its ``input_ids`` as labels, with the positions that ``attention_mask`` masks out ignored.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        loss_type = self._resolved_loss_type()
        if labels is None and loss_type == "causal-lm" and isinstance(inputs.get("input_ids"), Tensor):
            labels = inputs["input_ids"]
            if isinstance(inputs.get("attention_mask"), Tensor):
                labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        if labels is None:
            raise TrainerSetupError(
                f"The batch (keys {sorted(inputs)}) has no 'labels'; the data collator must provide them "
                "(or override PrivateTrainer.per_sample_loss)."
            )
        outputs = model(**inputs)
        config = getattr(self.model, "config", None)
        losses = per_sample_losses(
            logits_of(outputs),
            labels,
            loss_type,
            problem_type=getattr(config, "problem_type", None),
            label_smoothing=self.args.label_smoothing_factor,
        )
        return losses, outputs

    def _resolved_loss_type(self) -> str:
        if self._loss_type is None:
            wanted = self.privacy.loss_type
            self._loss_type = infer_loss_type(self.model) if wanted == "auto" else wanted
        return self._loss_type

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The mean over the batch of the per-sample losses (used by evaluation; training uses
        :meth:`training_step`). ``num_items_in_batch`` is ignored: each sample's loss is its own token mean."""
        losses, outputs = self.per_sample_loss(model, inputs)
        loss = losses.mean() if losses.numel() else losses.sum()
        if return_outputs and not isinstance(outputs, Mapping):  # the Trainer's evaluation reads dicts or tuples
            outputs = {"logits": logits_of(outputs)}
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Forward and backward over the physical batches of one Poisson batch; returns its mean per-sample loss.

        An empty batch runs nothing here and returns 0; the Trainer's ``optimizer.step()`` that follows still adds
        the noise and the accountant counts the step.
        """
        private = self.private
        if private is None:
            raise TrainerSetupError("training_step ran before the privacy engine was created (train() creates it).")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        batch = dict(self._prepare_inputs(inputs))
        size = batch_rows(batch)
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        if size == 0:
            return total.float()
        reduce = torch.mean if self.privacy.loss_reduction == "mean" else torch.sum
        physical = self._train_batch_size
        trim = self.privacy.trim_padding and isinstance(batch.get("attention_mask"), Tensor)
        if trim and size > physical:
            batch = by_length(batch, size)
        for chunk in physical_batches(batch, physical):
            if trim:
                chunk = without_trailing_padding(chunk)
            with self.compute_loss_context_manager():
                losses, _ = self.per_sample_loss(model, chunk)
            private.backward(reduce(losses))
            total += losses.detach().sum().to(total.device, torch.float64)
        return (total / size).float()

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """No clipping of the summed gradient: see the module docstring (max_grad_norm is neutralised)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """Not logged: the norm of the clipped sum before noise is not covered by the DP guarantee."""
        return None

    # ------------------------------------------------------------------ logs and checkpoints
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with ``epsilon`` (spent so far, at the run's delta) once training has started."""
        if self.private is not None:
            logs = {**logs, "epsilon": self._epsilon()}
        super().log(logs, start_time)

    def _epsilon(self) -> float:
        """``private.epsilon()``, computed once per step count (an accountant call takes a fraction of a second)."""
        steps = self.private.steps
        if self._epsilon_cache is None or self._epsilon_cache[0] != steps:
            self._epsilon_cache = (steps, self.private.epsilon())
        return self._epsilon_cache[1]

    def privacy_state_dict(self) -> dict[str, Any]:
        """The privacy state saved in checkpoints: :meth:`PrivateTraining.state_dict` without the model and
        optimizer (the Trainer saves those itself)."""
        if self.private is None:
            raise TrainerSetupError("No privacy state yet: it is created when train() starts.")
        return {k: v for k, v in self.private.state_dict().items() if k not in ("model", "optimizer")}

    def load_privacy_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`privacy_state_dict` (after the train dataloader, hence the sampler, exists)."""
        if self.private is None:
            raise TrainerSetupError("The privacy engine does not exist yet: it is created when train() starts.")
        current = {"model": self.private.model.state_dict(), "optimizer": self.private.optimizer.state_dict()}
        self.private.load_state_dict({**state, **current})
        self._epsilon_cache = None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.private is not None and self.args.should_save:
            torch.save(self.privacy_state_dict(), os.path.join(output_dir, PRIVACY_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, PRIVACY_STATE_NAME)
        if not os.path.isfile(path):
            raise TrainerSetupError(
                f"The checkpoint {checkpoint} holds no groupclip privacy state ({PRIVACY_STATE_NAME}): it was saved "
                "by a non-private Trainer or with save_only_model=True. Resuming from it would restart the privacy "
                "accounting at epsilon 0 and lose the noise and sampler states. Resume from a checkpoint that "
                "PrivateTrainer saved (save_only_model=False), or start a new run."
            )
        self.load_privacy_state_dict(torch.load(path, weights_only=True))


def _seed_arguments(noise_seed: int | None) -> dict[str, Any]:
    """``make_private``'s seed argument: ``noise_seed``, or ``seed`` (its old name) where it has no ``noise_seed``."""
    if "noise_seed" in inspect.signature(make_private).parameters:
        return {"noise_seed": noise_seed}
    return {"seed": noise_seed}
