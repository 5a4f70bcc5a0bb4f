"""Data-parallel DP training: each rank clips its own samples; the clipped sums are all-reduced; noise is added once.

What :func:`groupclip.make_private` does with ``distributed=True`` (MATH.md §6), on any torch.distributed backend
(gloo on CPU, NCCL on GPU; launch with ``torchrun``):

* at set-up, every rank checks that all ranks were given the same grouping, thresholds, clip function and privacy
  settings (:func:`~groupclip.distributed.agreement.check_agreement`: all ranks raise together if not), and rank 0's
  parameters and buffers are broadcast, so the replicas start equal;
* :meth:`~groupclip.PrivateTraining.poisson_loader` gives every rank the same global Poisson mask over the whole
  data set (the sampler seed is shared) and each rank keeps every ``world``-th selected index: the union of the
  ranks' batches is ONE Poisson sample of rate q, which is what the accountant analyses;
* each rank's backward leaves the clipped sums of its own samples in ``.grad`` (any grouping: per-sample norms need
  only the rank's own samples, so no norm crosses ranks);
* at ``optimizer.step()`` rank 0 adds ``N(0, sigma^2 S^2)`` to its sums, then one all-reduce (SUM) of all gradients
  gives every rank ``sum_i clip(g_i) + noise`` over the global batch: noise of the stated variance, added exactly
  once; then every rank divides by the global expected batch size ``qN`` and steps its replica identically;
* the accountant's ledger is a function of (sigma, q, steps) alone, which the set-up check made equal on every
  rank, so every rank reports the same epsilon with no communication (call ``epsilon()`` on any ranks you like).

A rank that dies or hangs: every collective waits at most the process group's ``timeout`` (pass
``timeout=datetime.timedelta(seconds=...)`` to ``init_process_group``; ``groupclip train`` passes
``run.collective_timeout``). A dead peer usually fails the next collective at once (its sockets close), a hung one
when the timeout expires; :func:`peer_failure` turns either backend error into a one-line
:class:`PeerFailureError` that says what happened and what to do.

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP's reducer all-reduces gradients from autograd's
per-parameter hooks, and Book-Keeping computes no autograd parameter gradient (the clipped sums come from the layer
inputs and output gradients), so DDP would never reduce them; groupclip does the same broadcast and gradient
all-reduce itself, on the clipped sums. A DDP-wrapped model is refused with a message saying this.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DistributedSetupError, GroupClipError

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
