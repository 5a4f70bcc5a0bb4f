"""Where a training process runs: its device, and its place in a (possibly torchrun-launched) process group."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .recipe import RecipeError


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
