"""Sharded DP training with FSDP2 (``torch.distributed.fsdp.fully_shard``): :func:`make_private_sharded`.

Each rank trains on its own samples, as in data-parallel training; FSDP2 keeps every parameter sharded on dim 0
across the ranks (a ``DTensor`` with placement ``Shard(0)``) and all-gathers a module's full parameters just for
its forward and its backward. groupclip fits in like this:

* **Norms over full parameters, no norm communication.** While a module runs, its slot holds FSDP2's *unsharded*
  parameter; the engine switches that tensor's ``requires_grad`` off, so autograd computes no weight gradient, and
  the layer rules work from the module's input and output gradient, which each rank has in full for its own
  samples. Per-sample norms are therefore those of the full parameters, for any grouping (all-layer, layer-wise,
  param-wise, M blocks, explicit): the same numbers one unsharded process would compute for those samples.
* **Clipped sums reduce-scattered once per backward.** At the end of each backward pass every rank holds the
  full-shape clipped sums of its own samples; one ``reduce_scatter`` per dtype (packed as FSDP2 packs: dim-0
  chunks of ``ceil(n / world)`` rows, the last ones short or empty, zero-padded) sums them over the ranks and
  leaves each rank its own rows, written to the sharded parameter's ``.grad`` as a ``DTensor`` with the
  parameter's placements (added to an existing ``.grad``: gradient accumulation works as usual).
* **FSDP2's own reduce-scatter never runs.** It reduces the autograd gradients of the unsharded parameters, and
  Book-Keeping produces none; a leak check on the unsharded parameters raises
  :class:`~groupclip.errors.UnattributedGradientError` if autograd ever computes one (a parameter used outside
  its module), since FSDP2 would then add an unclipped gradient to ``.grad``.
* **Noise once per coordinate.** At ``optimizer.step()`` each rank adds ``N(0, sigma^2 S^2)`` to the coordinates it
  owns -- its local shard, which excludes FSDP2's padding -- from its own noise stream (seeded per rank from the
  shared seed), then divides by the global expected batch size ``qN``. Every coordinate of every parameter is
  owned by exactly one rank, so the noise on the global sum has the stated variance, added exactly once.
* **Sampling and accounting** are those of data-parallel training (:mod:`groupclip.distributed.data_parallel`):
  one global Poisson sample split among the ranks (:meth:`~groupclip.PrivateTraining.poisson_loader`), batch
  statistics summed over ranks, the same epsilon on every rank. Ranks given different grouping or privacy
  settings all raise :class:`~groupclip.errors.DistributedSetupError` at set-up; a non-finite per-sample norm on
  any rank makes every rank write nothing for that pass and refuse the next ``step()``.

Memory: like the unsharded engine, each rank holds the full-shape clipped sums of the parameters it has clipped
until the end of its backward pass, plus one zero-padded packed copy of them (per dtype) during the reduce-scatter;
then they are freed. Between backward passes and optimizer steps FSDP2 keeps the parameters, gradients and
optimizer state sharded as usual. Mixed precision (``MixedPrecisionPolicy(param_dtype=...)``) runs the clipping in
``param_dtype``; the reduce-scatter is in the sharded parameter's dtype (``reduce_dtype`` is not used).

Requirements: call ``fully_shard`` on the submodules you want as units and then on the root module, so every
trainable parameter is a ``DTensor`` on one 1-D mesh sharded on one dim (FSDP2's default ``Shard(0)``; HSDP 2-D
meshes and CPU offload are not supported). Initialise the model identically on every rank before sharding (FSDP2
takes each rank's rows from its own copy). The per-rank loop is the ordinary FSDP2 loop, and every rank must run
each forward and backward (FSDP2 all-gathers in both), even on an empty Poisson batch.

Example (``torchrun --nproc-per-node 2 examples/fsdp2_sharded.py``)::

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)                                      # the same initial model on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the sharded parameters
    private = make_private_sharded(model, optimizer, grouping="layer-wise", max_grad_norm=1.0,
                                   noise_multiplier=1.0, batch_size=64, data_size=len(dataset), seed=0)
    for x, y in private.poisson_loader(dataset):              # this rank's share of one global Poisson sample
        private.backward(F.cross_entropy(model(x), y))        # clipped sums reduce-scattered into .grad
        optimizer.step()                                      # noise on this rank's shard, divided by qN
        optimizer.zero_grad()
    private.epsilon()                                          # the same on every rank
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..accounting import AccountantKind, PrivacyAccountant
from ..adaptive import AdaptiveClipping
from ..clipping import ClipFunction
from ..engine import ClippingEngine, ClipReport, LossReduction, NormMode
from ..errors import DistributedSetupError, NonFiniteNormError
from ..grouping import GroupingSpec, trainable_parameters
from ..noise import GaussianNoise
from ..private import (
    PrivacySetupError,
    PrivateTraining,
    _check_optimizer,
    agreement_settings,
    resolve_privacy_settings,
)
from . import data_parallel as dp
from .agreement import check_agreement

__all__ = [
    "ShardedGradientWriter",
    "ShardedPrivateTraining",
    "fsdp_parameter_alias",
    "fsdp_rerun_unshard",
    "make_private_sharded",
]


def _fsdp_api():
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard
    except ImportError as err:  # pragma: no cover - torch without distributed
        raise DistributedSetupError(f"Sharded training needs torch.distributed with FSDP2 ({err}).") from err
    return FSDPModule, DTensor, Shard


def _fsdp_params(model: nn.Module) -> list[Any]:
    """FSDP2's per-parameter records (``FSDPParam``) of every ``fully_shard``-ed module in ``model``, each once.

    This reads FSDP2 internals (``_get_fsdp_state()._fsdp_param_groups[*].fsdp_params``, and on each record
    ``sharded_param``, ``_unsharded_param``, ``_sharded_post_forward_param``) as of torch 2.13.
    """
    FSDPModule, _, _ = _fsdp_api()
    records, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", []):
            for record in group.fsdp_params:
                if id(record) not in seen:
                    seen.add(id(record))
                    records.append(record)
    return records


def fsdp_rerun_unshard(model: nn.Module):
    """``prepare(module)``: all-gather the FSDP2 unit owning ``module`` if its parameters are resharded.

    The generic fallback re-runs a module in the backward pass. FSDP2 all-gathers a unit again in the backward
    from a hook on the unit's output -- unless that output needed no gradient when FSDP2 saw it (a unit applied
    first, to data, whose parameters the engine had switched off), in which case the unit stays resharded; this
    all-gathers it (every rank makes the same call at the same point of the same graph). FSDP2's post-backward
    reshards it as usual.
    """
    FSDPModule, DTensor, _ = _fsdp_api()
    owner: dict[int, nn.Module] = {}

    def assign(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, FSDPModule) else unit
        if unit is not None:
            owner[id(module)] = unit
        for child in module.children():
            assign(child, unit)

    assign(model, None)

    def prepare(module: nn.Module) -> None:
        unit = owner.get(id(module))
        if unit is not None and any(isinstance(p, DTensor) for p in module._parameters.values()):
            unit.unshard()

    return prepare


def fsdp_parameter_alias(model: nn.Module):
    """``alias(p)``: the sharded parameter that FSDP2's unsharded (or post-forward) parameter ``p`` stands for.

    FSDP2 registers a module's sharded ``DTensor`` parameters at rest and swaps in plain unsharded parameters (one
    persistent object per parameter, its storage freed between uses) while the module runs. The engine keys groups
    and clipped sums by the sharded parameter; this maps what a slot holds back to it (anything else to itself).
    """
    cache: dict[int, tuple[Tensor, nn.Parameter]] = {}

    def rebuild() -> None:
        cache.clear()
        for record in _fsdp_params(model):
            for tensor in (record.sharded_param, getattr(record, "_unsharded_param", None)):
                if tensor is not None:
                    cache[id(tensor)] = (tensor, record.sharded_param)

    def alias(p: nn.Parameter) -> nn.Parameter:
        hit = cache.get(id(p))
        if hit is None or hit[0] is not p:
            rebuild()  # the unsharded parameters appear at the first all-gather
            hit = cache.get(id(p))
        if hit is not None and hit[0] is p:
            return hit[1]
        for record in _fsdp_params(model):  # short-lived: not cached (it would keep its data alive)
            if getattr(record, "_sharded_post_forward_param", None) is p:
                return record.sharded_param
        return p

    return alias


@dataclass(frozen=True)
class _Layout:
    """How one parameter's full-shape sum maps to the per-rank chunks of a reduce-scatter (``Shard(dim)``)."""

    dim: int
    shape: tuple[int, ...]  # global shape
    rows: int  # rows (along dim) per rank chunk: ceil(n / world)
    local_rows: int  # this rank's rows (the last ranks' chunks are short or empty)

    @property
    def moved(self) -> tuple[int, ...]:
        rest = [s for i, s in enumerate(self.shape) if i != self.dim]
        return (self.rows, *rest)

    @property
    def chunk_numel(self) -> int:
        return math.prod(self.moved)

    def pack(self, full: Tensor | None, world: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[world, chunk_numel]``: rank r's rows in row r, zero-padded."""
        if full is None:
            return torch.zeros(world, self.chunk_numel, dtype=dtype, device=device)
        t = full.to(device=device, dtype=dtype).movedim(self.dim, 0)
        pad = world * self.rows - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return t.reshape(world, self.chunk_numel)

    def unpack(self, chunk: Tensor) -> Tensor:
        """This rank's local shard (unpadded) from its chunk of the reduce-scatter output."""
        return chunk.view(self.moved)[: self.local_rows].movedim(0, self.dim).contiguous()


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


class ShardedGradientWriter:
    """The engine's ``grad_sink`` for an FSDP2 model: reduce-scatter full-shape clipped sums into sharded ``.grad``.

    Called at the end of every backward pass on every rank (a collective): with ``[(sharded param, full-shape
    clipped sum of this rank's samples)]``, or ``None`` when this rank's pass was refused for non-finite norms. If
    any rank's pass was refused, no rank writes anything (``refused`` is then True on every rank until a pass
    succeeds everywhere). Returns whether every ``.grad`` was None before the write (a new logical batch).

    Args:
        params: canonical name -> sharded trainable parameter (the same order on every rank).
        group: the process group of the parameters' 1-D mesh.
        device: the device the mesh computes on (where the sums and the collectives live).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], group: dist.ProcessGroup, device: torch.device) -> None:
        _, DTensor, Shard = _fsdp_api()
        self.params = dict(params)
        self.group = group
        self.device = device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.refused = False  # a pass since the last successful one was refused on some rank
        self.last_refused = False  # the last pass was refused on some rank
        self._layouts: dict[int, _Layout] = {}
        self._buckets: dict[torch.dtype, list[nn.Parameter]] = {}
        mesh = None
        for name, p in self.params.items():
            placements = tuple(p.placements) if isinstance(p, DTensor) else ()
            if not isinstance(p, DTensor) or len(placements) != 1 or not isinstance(placements[0], Shard):
                raise DistributedSetupError(
                    f"Parameter {name!r} is not sharded on a 1-D mesh ({type(p).__name__}, placements {placements}). "
                    "Call fully_shard on the root module too, so every trainable parameter is a DTensor with one "
                    "Shard placement (HSDP 2-D meshes are not supported)."
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise DistributedSetupError(
                    f"Parameter {name!r} lives on another device mesh than the others; sharded DP training needs "
                    "one mesh for the whole model."
                )
            dim = placements[0].dim % p.dim()
            n = p.shape[dim]
            rows = -(-n // self.world)
            layout = _Layout(dim, tuple(p.shape), rows, max(0, min(rows, n - self.rank * rows)))
            expected = list(p.shape)
            expected[dim] = layout.local_rows
            if tuple(p.to_local().shape) != tuple(expected):
                raise DistributedSetupError(
                    f"Parameter {name!r} of shape {tuple(p.shape)} has local shard {tuple(p.to_local().shape)} on "
                    f"rank {self.rank}, not the torch.chunk layout {tuple(expected)} that groupclip reduce-scatters "
                    "into; this torch version shards differently."
                )
            if p.to_local().device.type != device.type:
                raise DistributedSetupError(
                    f"Parameter {name!r} is stored on {p.to_local().device}, the mesh computes on {device}: CPU "
                    "offload is not supported."
                )
            self._layouts[id(p)] = layout
            self._buckets.setdefault(p.dtype, []).append(p)
        self.mesh = mesh

    def __call__(self, clipped: list[tuple[nn.Parameter, Tensor]] | None) -> bool:
        refused = dp.any_rank(clipped is None, self.group)
        self.last_refused = refused
        if refused:
            self.refused = True
            return True
        self.refused = False
        fresh = all(p.grad is None for p in self.params.values())
        sums = {id(p): t for p, t in clipped}
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        with torch.no_grad():
            for dtype, members in self._buckets.items():
                packed = [
                    self._layouts[id(p)].pack(sums.pop(id(p), None), self.world, dtype, self.device) for p in members
                ]
                flat = torch.cat(packed, dim=1).reshape(-1)
                del packed
                out = flat.new_empty(flat.numel() // self.world)
                reduce_scatter(out, flat, group=self.group)
                del flat
                offset = 0
                for p in members:
                    layout = self._layouts[id(p)]
                    self._accumulate(p, layout.unpack(out[offset : offset + layout.chunk_numel]))
                    offset += layout.chunk_numel
        return fresh

    @staticmethod
    def _accumulate(p: nn.Parameter, local: Tensor) -> None:
        _, DTensor, _ = _fsdp_api()
        if p.grad is None:
            p.grad = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        else:
            p.grad.to_local().add_(local)


class ShardedPrivateTraining(PrivateTraining):
    """:class:`~groupclip.PrivateTraining` for an FSDP2 model (build it with :func:`make_private_sharded`).

    Differences from data-parallel training: the clipped sums are reduce-scattered into the sharded ``.grad`` at
    the end of each backward pass (``gradients``, a :class:`ShardedGradientWriter`); at ``step()`` each rank adds
    noise to the shard it owns only, from its own noise stream. ``.grad`` holds DTensors; read a full gradient with
    ``p.grad.full_tensor()`` (a collective).
    """

    def __init__(self, *args: Any, gradients: ShardedGradientWriter, **kwargs: Any) -> None:
        self.gradients = gradients
        self._leak_checked: dict[int, Tensor] = {}
        super().__init__(*args, **kwargs)
        self._handles.append(self.model.register_forward_hook(self._check_unsharded_leaks))

    def _check_unsharded_leaks(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Hook a leak check on FSDP2's unsharded parameters (they exist from the first all-gather on)."""
        names = {id(p): n for n, p in self.gradients.params.items()}
        for record in _fsdp_params(self.model):
            unsharded = getattr(record, "_unsharded_param", None)
            name = names.get(id(record.sharded_param))
            if unsharded is None or name is None or self._leak_checked.get(id(unsharded)) is unsharded:
                continue
            self._leak_checked[id(unsharded)] = unsharded
            self._handles.append(unsharded.register_hook(self.engine._make_leak_check(name, [])))

    def _on_report(self, report: ClipReport) -> None:
        if self.gradients.last_refused:  # another rank refused this pass: nothing was written here either
            return
        super()._on_report(report)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = list(self.gradients.params.values())
        failed = (
            self.gradients.refused
            or self.engine.nonfinite_passes != self._nonfinite_seen
            or any(p.grad is not None and not bool(torch.isfinite(p.grad.to_local()).all()) for p in params)
        )
        if dp.any_rank(failed, self.process_group):
            self.gradients.refused = False
            self._reset_batch_stats()
            if self.tracker is not None:
                self.tracker.counts = {}
            raise NonFiniteNormError(
                "The last backward pass on some rank had non-finite per-sample norms (or a clipped sum is not "
                "finite); the step was not taken and nothing was updated (parameters, optimizer state, "
                "accountant). Call optimizer.zero_grad() and continue with the next batch."
            )
        std = self.gradient_noise_multiplier * self.engine.sensitivity
        self._noise_std = std
        with torch.no_grad():
            for p in params:  # each rank: the coordinates it owns, once
                local = p.to_local()
                noise = self.noise.sample(local.shape, std, dtype=p.dtype, device=local.device)
                self.gradients._accumulate(p, noise)
                p.grad.to_local().div_(self.expected_batch_size)


def _noise_seed(seed: int, rank: int) -> int:
    """An independent per-rank noise seed derived from the shared seed (not the sampler's ``seed + 1``)."""
    digest = hashlib.blake2b(f"groupclip-shard-noise:{seed}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_private_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grouping: GroupingSpec = "all-layer",
    max_grad_norm: float | Mapping[str, float] = 1.0,
    clip_fn: str | ClipFunction = "abadi",
    clip_options: Mapping[str, float] | None = None,
    loss_reduction: LossReduction = "mean",
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
    adaptive: AdaptiveClipping | None = None,
    seed: int | None = None,
    secure_noise: bool = False,
) -> ShardedPrivateTraining:
    """Make an FSDP2 (``fully_shard``-ed) model + its optimizer train with DP; call on every rank.

    The arguments mean what they mean for :func:`groupclip.make_private` with ``distributed=True``:
    ``data_size`` and ``batch_size`` are the GLOBAL ones, and every rank must pass the same settings (checked: all
    ranks raise together otherwise). The process group is the one of the parameters' device mesh. See the module
    docstring for what happens where.

    Args:
        model: the root module, after ``fully_shard`` was applied to it (and to any submodules first).
        optimizer: built on ``model.parameters()`` after sharding (the sharded DTensor parameters).

    Returns:
        the :class:`ShardedPrivateTraining` owning the hooks (``detach()`` removes them).

    Raises:
        DistributedSetupError: the model is not ``fully_shard``-ed at its root, a trainable parameter is not a
            1-D-mesh sharded DTensor, or the ranks disagree on the grouping, thresholds, clip function, privacy
            settings or parameter shapes -- raised on every rank.
        PrivacySetupError, UnreachableEpsilonError, ValueError: as :func:`groupclip.make_private`.
    """
    FSDPModule, _, _ = _fsdp_api()
    if not isinstance(model, FSDPModule):
        raise DistributedSetupError(
            f"make_private_sharded needs the root module after fully_shard (got {type(model).__name__}): apply "
            "fully_shard to the submodules you want as units, then to the root module."
        )
    if not dist.is_initialized():
        raise DistributedSetupError("make_private_sharded needs an initialised torch.distributed process group.")
    for module in model.modules():  # rest state: the sharded parameters registered on every module
        if isinstance(module, FSDPModule):
            module.reshard()
    params = trainable_parameters(model)
    if not params:
        raise DistributedSetupError("The model has no trainable parameters.")
    first = next(iter(params.values()))
    mesh = getattr(first, "device_mesh", None)
    if mesh is None or mesh.ndim != 1:
        raise DistributedSetupError(
            "make_private_sharded needs every trainable parameter sharded by fully_shard on a 1-D device mesh "
            f"(parameter {next(iter(params))!r} is not)."
        )
    group = mesh.get_group()
    gradients = ShardedGradientWriter(params, group, _mesh_device(mesh))
    _check_optimizer(model, optimizer)
    settings = resolve_privacy_settings(
        noise_multiplier, target_epsilon, target_delta, epochs, steps, sample_rate, batch_size, data_size, accountant
    )
    engine = ClippingEngine(
        model,
        grouping=grouping,
        max_grad_norm=max_grad_norm,
        clip_fn=clip_fn,
        clip_options=clip_options,
        loss_reduction=loss_reduction,
        norm_mode=norm_mode,
    )
    engine.parameter_alias = fsdp_parameter_alias(model)
    engine.grad_sink = gradients
    engine.before_generic_rerun = fsdp_rerun_unshard(model)
    if adaptive is not None and engine.grouping is None:
        raise PrivacySetupError(
            "Adaptive clipping needs the groups up front; use a grouping other than an int, or explicit groups."
        )
    seed = dp.shared_seed(seed, group)
    check_agreement(
        agreement_settings(engine, clip_fn, clip_options, loss_reduction, norm_mode, settings, adaptive)
        | {
            "seed": seed,
            "secure_noise": secure_noise,
            "placements": [repr(tuple(p.placements)) for p in params.values()],
        },
        what="grouping, privacy and sharding settings",
        group=group,
    )
    engine.attach()
    try:
        return ShardedPrivateTraining(
            model,
            optimizer,
            engine,
            gradients=gradients,
            noise_multiplier=settings["noise_multiplier"],
            sample_rate=settings["sample_rate"],
            expected_batch_size=settings["sample_rate"] * settings["data_size"],
            delta=settings["delta"],
            accountant=PrivacyAccountant(accountant),
            noise=GaussianNoise(seed=_noise_seed(seed, gradients.rank), secure=secure_noise),
            adaptive=adaptive,
            planned_steps=settings["planned_steps"],
            seed=seed,
            process_group=group,
            distributed=True,
        )
    except BaseException:
        engine.detach()
        raise
