"""Data-parallel DP training: each rank clips its own samples; the clipped sums are all-reduced; noise is added once.

What :func:`groupclip.make_private` does with ``distributed=True``, on any torch.distributed backend (gloo on CPU,
NCCL on GPU; launch with ``torchrun``): all ranks check that they were given the same settings and start from rank
0's parameters; one global Poisson mask is split among the ranks; at ``optimizer.step()`` rank 0 adds the noise and
one all-reduce gives every rank the noisy global sum, divided by the global expected batch size. A dead or hung
peer becomes a one-line :class:`PeerFailureError`. DDP-wrapped models are refused (Book-Keeping computes no
autograd parameter gradient for DDP's reducer to reduce).

Details -- sampling, where the noise goes, failures, why not DDP: ``docs/DISTRIBUTED.md``, section "Data parallel";
the mathematics: ``docs/MATH.md``, section "Distributed training".
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DistributedSetupError, GroupClipError
from ..topology import Topology, gradients_of, register_topology
from .agreement import check_agreement

# Messages of backend errors that mean "another rank is gone or did not answer" (gloo, NCCL, the TCP store).
_PEER_FAILURE_MARKERS = (
    "timed out",
    "timeout",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "gloo/transport",
    "socket",
    "nccl communicator was aborted",
    "watchdog",
)


class PeerFailureError(GroupClipError, RuntimeError):
    """A collective failed because another rank died or did not answer within the process group's timeout."""


def peer_failure(err: BaseException, rank: int, timeout: float | None) -> PeerFailureError | None:
    """A one-line :class:`PeerFailureError` for ``err`` if it is a collective that failed for want of a peer
    (a dead rank's closed connection, or the timeout expiring), else None (``err`` is something else)."""
    if isinstance(err, GroupClipError):
        return None
    backend_errors = tuple(
        getattr(dist, name)
        for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
        if hasattr(dist, name)
    )
    text = str(err).lower()
    if not (
        isinstance(err, backend_errors)
        or (isinstance(err, RuntimeError) and any(m in text for m in _PEER_FAILURE_MARKERS))
    ):
        return None
    waited = f"within the {timeout:g} s collective timeout" if timeout else "within the process group's timeout"
    detail = " ".join(str(err).split())
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return PeerFailureError(
        f"rank {rank} stopped: another rank died or did not answer {waited} ({type(err).__name__}: {detail}). "
        "Check the other ranks' logs; resume from the last checkpoint with --resume RUN_DIR."
    )


def require_process_group(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; a clear error if torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedSetupError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') before make_private."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def refuse_ddp_wrapper(model: nn.Module) -> None:
    """Raise if ``model`` is wrapped in DistributedDataParallel (its reducer would never see the clipped sums)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DistributedSetupError(
            "make_private got a DistributedDataParallel-wrapped model. DDP all-reduces gradients from autograd's "
            "parameter hooks, which Book-Keeping bypasses, so the clipped sums would never be reduced. Pass the "
            "bare module (ddp_model.module) with distributed=True: groupclip broadcasts the parameters and "
            "all-reduces the clipped sums itself."
        )


def refuse_sharded_parameters(model: nn.Module) -> None:
    """Raise if ``model`` has DTensor parameters (fully_shard): broadcasting rank 0's shards would overwrite the
    other ranks' different shards."""
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise DistributedSetupError(
            f"Parameters {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are DTensors (fully_shard / tensor "
            "parallel): make_private(distributed=True) replicates parameters. For a fully_shard-ed model use "
            "groupclip.distributed.sharded.make_private_sharded."
        )


def shared_seed(seed: int | None, group: dist.ProcessGroup | None) -> int:
    """``seed`` if given (checked equal across ranks elsewhere), else a random seed drawn on rank 0 and broadcast."""
    if seed is not None:
        return seed
    box = [secrets.randbits(62) if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=_global_rank(0, group), group=group)
    return int(box[0])


def broadcast_model(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Copy rank 0's parameters and buffers to every rank (as DDP does at construction)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=_global_rank(0, group), group=group)


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the small tensors of groupclip's own collectives live: the current CUDA device under NCCL (which
    reduces GPU tensors only; ``torch.cuda.set_device(local_rank)`` first), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank if ``flag`` is true on any rank (one small all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)


def all_reduce_sums(values: Mapping[str, float], keys: Iterable[str], group: dist.ProcessGroup | None) -> dict:
    """``{key: sum over ranks of values.get(key, 0)}`` for ``keys`` (the same keys in the same order on all ranks)."""
    keys = list(keys)
    if not keys:
        return {}
    packed = torch.tensor(
        [float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=collective_device(group)
    )
    dist.all_reduce(packed, group=group)
    return dict(zip(keys, packed.tolist(), strict=True))


def all_reduce_gradients(
    params: list[nn.Parameter],
    group: dist.ProcessGroup | None,
    add_noise: Callable[[nn.Parameter, Tensor], None] | None,
) -> None:
    """Sum every parameter's ``.grad`` over ranks (a missing grad counts as zeros), ``add_noise`` applied first.

    ``add_noise(param, grad)`` adds noise in place to ``grad`` on the rank that passes it (rank 0), so the sum
    carries the noise once. Gradients are packed into one flat buffer per dtype and device: one all-reduce each.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if add_noise is not None:
            add_noise(p, p.grad)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for members in buckets.values():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in members:
            size = p.grad.numel()
            p.grad.copy_(flat[offset : offset + size].view_as(p.grad))
            offset += size


def broadcast_object(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=_global_rank(0, group), group=group)
    return box[0]


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class DataParallel(Topology):
    """Data parallel: every rank holds the whole model and clips its own samples; at ``step()`` rank 0 adds the
    noise to its clipped sums and one all-reduce per (dtype, device) gives every rank the noisy global sum; the
    Poisson sample is one global mask split among the ranks (``docs/DISTRIBUTED.md``, section "Data parallel")."""

    name = "data-parallel"

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self.rank, self.world_size = require_process_group(process_group)

    def prepare(self, model: nn.Module, engine: Any, settings: dict[str, Any]) -> None:
        refuse_ddp_wrapper(model)
        refuse_sharded_parameters(model)
        if engine.grouping is None:
            # An int M grouping resolves at the first forward pass, which a rank with an empty Poisson batch
            # skips: that rank would not know the thresholds (nor the noise's sensitivity).
            raise DistributedSetupError(
                f"grouping={engine.grouping_spec!r} (M blocks in execution order) is only known after a forward "
                "pass, which a rank may skip (an empty Poisson batch). Resolve it up front and pass the groups: "
                "groups = groupclip.grouping.resolve_grouping(model, M, order).groups with the parameter names in "
                "execution order (groupclip.training.runner.execution_order gives it), or use a named or explicit "
                "grouping."
            )
        check_agreement(settings, what="grouping and privacy settings", group=self.group)
        broadcast_model(model, self.group)

    def shared_seed(self, seed: int | None) -> int:
        return shared_seed(seed, self.group)

    def sampler_shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def finish_gradients(self, noise: Any, std: float, expected_batch_size: float) -> None:
        grads = gradients_of(self.params)
        with torch.no_grad():
            if self.rank == 0:  # the noise, once, in the sum
                noise.add_(grads, std)
            buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
            for g in grads:
                buckets.setdefault((g.dtype, g.device), []).append(g)
            for members in buckets.values():
                flat = torch.cat([g.reshape(-1) for g in members])
                dist.all_reduce(flat, group=self.group)
                torch._foreach_copy_(
                    members,
                    [v.view(g.shape) for v, g in zip(flat.split([g.numel() for g in members]), members, strict=True)],
                )
            torch._foreach_mul_(grads, 1.0 / expected_batch_size)

    def total(self, values: Tensor) -> Tensor:
        home = values.device
        values = values.to(collective_device(self.group))
        dist.all_reduce(values, group=self.group)
        return values.to(home)

    def on_rank0(self, decide: Callable[[], Any]) -> Any:
        return broadcast_object(decide() if self.rank == 0 else None, self.group)


register_topology("data-parallel", DataParallel)
