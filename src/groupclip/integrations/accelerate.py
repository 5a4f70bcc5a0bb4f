"""groupclip in training loops written with Hugging Face Accelerate.

    from accelerate import Accelerator
    from groupclip import physical_batches
    from groupclip.integrations.accelerate import make_private_accelerated

    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)       # before or after make_private: both work
    private = make_private_accelerated(accelerator, model, optimizer, grouping="layer-wise", max_grad_norm=1.0,
                                       target_epsilon=3.0, target_delta=1e-5, epochs=3,
                                       batch_size=256, data_size=len(train))
    for batch in private.poisson_loader(train, collate_fn=collate):   # NOT through accelerator.prepare
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        for chunk in physical_batches(batch, 32):
            private.backward(loss_fn(model(**chunk), chunk))        # or accelerator.backward(loss)
        optimizer.step()                                            # noise once per logical batch
        optimizer.zero_grad()

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which forwards ``step()`` to the torch
optimizer inside it but is not itself set up as a torch optimizer (``register_step_pre_hook`` on it fails).
groupclip hooks the inner optimizer: :func:`unwrap_optimizer` finds it, so the order of ``make_private`` and
``prepare`` does not matter (hooks on the inner optimizer fire when the wrapper steps).

What works and what is refused (:func:`check_accelerator`, with the reason and the fix):

- one process, on CPU or one GPU, without mixed precision or with ``mixed_precision="bf16"``;
- ``gradient_accumulation_steps > 1`` is refused: ``accelerator.backward`` divides the loss by it, which would
  scale every per-sample gradient before clipping, and ``accelerator.accumulate`` decides on its own count when to
  step. Split each Poisson batch with :func:`groupclip.physical_batches` instead;
- ``mixed_precision="fp16"`` is refused: the ``GradScaler`` multiplies the loss before backward, so the clipped
  per-sample norms would be those of scaled gradients;
- more than one process is refused: ``prepare`` wraps the model in ``DistributedDataParallel``, which groupclip
  refuses (no autograd parameter gradients for DDP to reduce). Use ``make_private(..., distributed=True)`` on the
  unprepared model instead (see the README).

Keep the Poisson loader out of ``accelerator.prepare``: on one process the prepared loader reads one batch ahead,
so a checkpoint's sampler state (``private.state_dict()``) would be one batch ahead of training; on several it
would split batches with its own sharding rather than groupclip's global Poisson mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import GroupClipError
from ..setup_checks import unwrap_optimizer as unwrap_optimizer_core

if TYPE_CHECKING:
    from ..private import PrivateTraining

__all__ = ["AccelerateSetupError", "check_accelerator", "make_private_accelerated", "unwrap_optimizer"]


class AccelerateSetupError(GroupClipError, ValueError):
    """An Accelerate setting that cannot give a correct DP run (the message names it and the fix)."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (at any depth); any other optimizer as is.

    :func:`groupclip.setup_checks.unwrap_optimizer` (which ``make_private`` applies too) with Accelerate's fix in the
    error. Safe to call without Accelerate installed.

    Raises:
        AccelerateSetupError: the wrapper steps through a ``GradScaler`` (``mixed_precision="fp16"``): the loss is
            scaled before backward, so per-sample norms would be those of scaled gradients.
    """
    try:
        return unwrap_optimizer_core(optimizer)
    except ValueError as err:
        raise AccelerateSetupError(
            "The optimizer was prepared with fp16 mixed precision: its GradScaler multiplies the loss before "
            "backward, so the per-sample gradients groupclip clips would be scaled and the thresholds off by the "
            "scale factor. Use Accelerator(mixed_precision='bf16') or 'no'."
        ) from err


def check_accelerator(accelerator: Any) -> None:
    """Refuse the Accelerate settings that break DP training (see the module docstring).

    Raises:
        AccelerateSetupError: several processes, ``gradient_accumulation_steps > 1`` or fp16 mixed precision.
    """
    processes = getattr(accelerator, "num_processes", 1)
    if processes > 1:
        raise AccelerateSetupError(
            f"The accelerator runs {processes} processes: accelerator.prepare would wrap the model in "
            "DistributedDataParallel, which groupclip cannot use (its one-pass clipping makes no autograd parameter "
            "gradients for DDP to reduce). Call groupclip.make_private(..., distributed=True) on every rank on the "
            "unprepared model and optimizer instead, with the global batch_size and data_size."
        )
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps > 1:
        raise AccelerateSetupError(
            f"Accelerator(gradient_accumulation_steps={steps}): accelerator.backward divides the loss by it, which "
            "scales every per-sample gradient before clipping, and accelerator.accumulate steps on its own count "
            "instead of once per Poisson batch. Use gradient_accumulation_steps=1 and split each Poisson batch with "
            "groupclip.physical_batches(batch, size), stepping once per Poisson batch."
        )
    if str(getattr(accelerator, "mixed_precision", "no")) == "fp16":
        raise AccelerateSetupError(
            "Accelerator(mixed_precision='fp16') scales the loss before backward (GradScaler), so the per-sample "
            "norms groupclip clips would be those of scaled gradients. Use mixed_precision='bf16' or 'no'."
        )


def make_private_accelerated(
    accelerator: Any, model: nn.Module, optimizer: Any, **make_private_kwargs: Any
) -> PrivateTraining:
    """:func:`groupclip.make_private` for an Accelerate loop, before or after ``accelerator.prepare``.

    Checks the accelerator (:func:`check_accelerator`), unwraps the model (``accelerator.unwrap_model``) and the
    optimizer (:func:`unwrap_optimizer`), and calls ``make_private(model, optimizer, **make_private_kwargs)``.
    Keep using the prepared objects in the loop: ``optimizer.step()`` on the ``AcceleratedOptimizer`` steps the
    hooked inner optimizer.
    """
    from ..private import make_private

    check_accelerator(accelerator)
    unwrap_model = getattr(accelerator, "unwrap_model", None)
    inner = unwrap_model(model) if callable(unwrap_model) else model
    return make_private(inner, unwrap_optimizer(optimizer), **make_private_kwargs)
