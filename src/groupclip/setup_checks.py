"""Checks of what a user hands to a DP front end, made before anything is attached.

Each raises an error that names the argument and the fix; none changes anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import AdaptiveClipping
from .errors import GroupClipError, GroupingError
from .grouping import needs_execution_order, resolve_grouping, trainable_parameters
from .privacy_plan import PrivacySetupError
from .topology import Topology


class LossReductionError(GroupClipError, ValueError):
    """The loss' reduction contradicts the declared ``loss_reduction``."""


def check_model(model: object) -> None:
    """``model`` is an ``nn.Module`` with trainable parameters that hold data (not on the meta device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "make_private got a DistributedDataParallel-wrapped model. DDP all-reduces gradients from autograd's "
            "parameter hooks, which Book-Keeping bypasses, so the clipped sums would never be reduced. Pass the "
            "bare module (ddp_model.module) with distributed=True: groupclip broadcasts the parameters and "
            "all-reduces the clipped sums itself."
        )
    params = trainable_parameters(model)
    if not params:
        raise ValueError("The model has no trainable parameters (requires_grad=True): nothing to train privately.")
    meta = [n for n, p in params.items() if p.is_meta]
    if meta:
        raise ValueError(
            f"Parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the meta device (no data): materialise "
            "the model first (model.to_empty(device=...) and initialise, or load its weights)."
        )


def unwrap_optimizer(optimizer: object) -> object:
    """The optimizer a wrapper holds as ``.optimizer``, at any depth (Accelerate's ``AcceleratedOptimizer``: its
    ``step()`` calls the inner one, whose hooks then run); anything else as is.

    Raises:
        ValueError: a wrapper that steps through a GradScaler (fp16): per-sample norms would be of scaled gradients.
    """
    # A wrapper (possibly itself an Optimizer subclass that skipped __init__) steps the optimizer it holds.
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        if getattr(optimizer, "scaler", None) is not None:
            raise ValueError(
                "The optimizer wrapper steps through a GradScaler (fp16 mixed precision): the loss is scaled before "
                "backward, so the per-sample norms groupclip clips would be of scaled gradients. Use bf16 (or no) "
                "mixed precision."
            )
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def check_optimizer(model: nn.Module, optimizer: object) -> torch.optim.Optimizer:
    """``optimizer`` is a ``torch.optim.Optimizer`` over exactly the model's trainable parameters; returns it, or
    the one a wrapper holds (:func:`unwrap_optimizer`)."""
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Expected optimizer to be a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters())); got "
            f"{optimizer!r}."
        )
    names = {id(p) for p in model.parameters()}
    trainable = trainable_parameters(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    foreign = [
        f"tensor of shape {tuple(p.shape)}" for g in optimizer.param_groups for p in g["params"] if id(p) not in names
    ]
    missing = [n for n, p in trainable.items() if id(p) not in held]
    if foreign or missing:
        parts = []
        if foreign:
            parts.append(f"the optimizer holds {len(foreign)} parameter(s) not in the model ({', '.join(foreign)})")
        if missing:
            parts.append(f"trainable model parameters missing from the optimizer: {missing}")
        raise ValueError(
            "; ".join(parts) + ". Build the optimizer from model.parameters() (or freeze the "
            "parameters it should not train)."
        )
    return optimizer


def check_seed(name: str, seed: object) -> int | None:
    """``seed`` is None or a non-negative int."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"Expected {name} to be a non-negative int or None; got {seed!r}.")
    return int(seed)


def check_clipping(model: nn.Module, grouping: object, max_grad_norm: object) -> None:
    """An ``int`` grouping is a block count >= 1; ``max_grad_norm`` is one number (the total threshold R) or a mapping
    ``{group name: threshold}`` (the values' ranges and the group names are checked by the engine)."""
    if needs_execution_order(grouping) and grouping < 1:
        raise GroupingError(
            f"Expected grouping={grouping} (a number of contiguous blocks) to be >= 1; use grouping='all-layer' for "
            "one group."
        )
    if isinstance(max_grad_norm, Mapping):
        values = list(max_grad_norm.values())
    elif isinstance(max_grad_norm, list | tuple):
        groups = ""
        if not needs_execution_order(grouping):
            try:
                groups = f" This grouping's groups are {list(resolve_grouping(model, grouping).groups)}."
            except GroupingError:  # the engine names what is wrong with the grouping
                pass
        raise TypeError(
            f"max_grad_norm={max_grad_norm!r} is a {type(max_grad_norm).__name__}: give one number (the total "
            f"threshold R, each of M groups gets R / sqrt(M)) or a mapping {{group name: threshold}}.{groups}"
        )
    else:
        values = [max_grad_norm]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"Expected max_grad_norm to be a number (the total threshold R) or a mapping {{group name: number}}; "
                f"got {value!r}."
            )


def check_options(
    *, adaptive: object, secure_noise: object, distributed: object, process_group: object, topology: object
) -> None:
    """The non-numeric options of a front end: types, and combinations that would silently be ignored."""
    if adaptive is not None and not isinstance(adaptive, AdaptiveClipping):
        raise TypeError(
            f"Expected adaptive to be None or a groupclip.AdaptiveClipping (e.g. adaptive=AdaptiveClipping("
            f"target_quantile=0.5)); got {adaptive!r}."
        )
    for name, value in (("secure_noise", secure_noise), ("distributed", distributed)):
        if not isinstance(value, bool):
            raise TypeError(f"Expected {name} to be True or False; got {value!r}.")
    if topology is not None and not isinstance(topology, Topology):
        raise TypeError(f"Expected topology to be a groupclip.topology.Topology (or None); got {topology!r}.")
    if topology is not None and distributed:
        raise PrivacySetupError(
            "Give distributed=True or a topology, not both: distributed=True builds the data-parallel topology."
        )
    if process_group is not None and not distributed:
        raise PrivacySetupError(
            "process_group is used only with distributed=True (data parallel over that group); pass "
            "distributed=True or drop process_group."
        )


def check_checkpoint_model(model: nn.Module, state: Any) -> None:
    """``state`` is a state dict of ``model``'s architecture: the same keys, with tensors of the same shapes (so
    ``model.load_state_dict`` cannot fail half-way)."""
    if not isinstance(state, Mapping):
        raise PrivacySetupError(f"The checkpoint's model state is a {type(state).__name__}, not a state dict.")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = []
    for key, value in own.items():
        theirs = state.get(key)
        if isinstance(value, Tensor) and key in state:
            if not isinstance(theirs, Tensor):
                shapes.append(f"{key}: {type(theirs).__name__} vs {tuple(value.shape)}")
            elif theirs.shape != value.shape:
                shapes.append(f"{key}: {tuple(theirs.shape)} vs {tuple(value.shape)}")
    if missing or unexpected or shapes:
        raise PrivacySetupError(
            f"The checkpoint's model state does not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, checkpoint vs model {shapes[:5]}); resume with the same model architecture."
        )


_REDUCTION_CODES = {1: "mean", 2: "sum"}  # at::Reduction: 0 none, 1 mean, 2 sum


def check_loss_reduction(loss: Tensor, declared: str) -> None:
    """Raise :class:`LossReductionError` if ``loss``'s last autograd node shows the other reduction.

    Detects ``x.mean()`` / ``x.sum()`` and loss functions that save their ``reduction`` (cross-entropy / NLL, MSE,
    L1, ...). Anything else (a custom combination) cannot be checked and passes.
    """
    node = loss.grad_fn
    if node is None:
        return
    name = type(node).__name__
    found = None
    if name.startswith("MeanBackward"):
        found = "mean"
    elif name.startswith("SumBackward"):
        found = "sum"
    else:
        code = getattr(node, "_saved_reduction", None)
        found = _REDUCTION_CODES.get(code) if isinstance(code, int) else None
    if found is not None and found != declared:
        raise LossReductionError(
            f"The loss was reduced with '{found}' ({name}) but loss_reduction='{declared}' was declared: per-sample "
            f"norms would be off by a factor of the batch size. Declare loss_reduction='{found}' or reduce the loss "
            f"with '{declared}'."
        )
