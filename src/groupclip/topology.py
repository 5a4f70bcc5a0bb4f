"""Where a DP step's clipped sums are reduced and where its noise is added: the topology of a training run.

:class:`~groupclip.private.PrivateTraining` is one object for every layout of a run; what differs between one
process, data-parallel ranks, FSDP2 shards and pipeline stages is behind this small interface:

* :meth:`Topology.finish_gradients` -- at ``optimizer.step()``: turn every trainable parameter's clipped sum into
  the noisy average the optimizer steps on (reduce over ranks if needed, add ``N(0, std^2)`` exactly once per
  coordinate, divide by the expected batch size);
* :meth:`Topology.sensitivity` -- the run's L2 sensitivity ``S`` (one place: the thresholds of every group of the
  run, wherever those groups live);
* :meth:`Topology.total` -- a sum over ranks of small statistics (samples, clip counts, adaptive counts);
* :meth:`Topology.on_rank0` -- run a decision on one rank and give every rank its result (adaptive thresholds);
* :meth:`Topology.sampler_shard` / :meth:`Topology.shared_seed` -- how the Poisson sample is drawn and split.

This module is the local (one process) topology; the distributed ones live in :mod:`groupclip.distributed` and
are never imported by the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .clipping import sensitivity

if TYPE_CHECKING:
    from .engine import ClippingEngine
    from .noise import GaussianNoise


class Topology:
    """One process holds the whole model (the default). Subclass for distributed layouts."""

    name = "local"
    rank = 0
    world_size = 1
    exports: tuple[str, ...] = ()  # attributes the PrivateTraining it serves hands through (e.g. "schedule")

    def prepare(self, model: nn.Module, engine: ClippingEngine, settings: dict[str, Any]) -> None:
        """Before the engine is attached: check the model and settings suit this topology (all ranks agree)."""

    def noise_seed(self, seed: int | None) -> int | None:
        """The seed of this process' noise generator (None: OS entropy)."""
        return seed

    def bind(self, engine: ClippingEngine, params: list[nn.Parameter]) -> None:
        """Called once, after the engine is attached: the trainable parameters this process steps."""
        self.engine = engine
        self.params = params

    def unbind(self) -> None:
        """Called by ``PrivateTraining.detach()``: remove whatever :meth:`bind` installed."""

    def sensitivity(self) -> float:
        """``S = sqrt(sum_k R_k^2)`` over every group of the run."""
        return sensitivity(self.engine.thresholds)

    def finish_gradients(self, noise: GaussianNoise, std: float, expected_batch_size: float) -> None:
        """``grad <- (clipped sum + N(0, std^2)) / expected_batch_size`` for every parameter this process steps."""
        grads = gradients_of(self.params)
        with torch.no_grad():
            noise.add_(grads, std)
            torch._foreach_mul_(grads, 1.0 / expected_batch_size)

    def total(self, values: Tensor) -> Tensor:
        """The sum of ``values`` over ranks (here: itself)."""
        return values

    def on_rank0(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` on rank 0, its result on every rank."""
        return decide()

    def sampler_shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` if this process takes a share of a global Poisson sample."""
        return None

    def shared_seed(self, seed: int | None) -> int | None:
        """A seed every rank of the run agrees on (the sampler's: one global Poisson mask)."""
        return seed

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_REGISTRY: dict[str, Callable[..., Topology]] = {}


def register_topology(name: str, factory: Callable[..., Topology]) -> None:
    """Make ``factory`` available by name (``groupclip.distributed`` registers ``"data-parallel"`` on import)."""
    _REGISTRY[name] = factory


def registered_topology(name: str) -> Callable[..., Topology]:
    """The factory registered as ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"No topology {name!r} is registered (import groupclip.distributed registers 'data-parallel').")
    return _REGISTRY[name]


def gradients_of(params: list[nn.Parameter]) -> list[Tensor]:
    """Every parameter's ``.grad``, zeros created where none was written (an empty batch still gets noise)."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads
