"""Sharded DP training with FSDP2 (``torch.distributed.fsdp.fully_shard``): :func:`make_private_sharded`.

Each rank clips its own samples with per-sample norms of the FULL parameters (the layer inputs and output gradients
of its samples are whole on every rank, so no norm crosses ranks); at the end of each backward pass the full-shape
clipped sums are reduce-scattered into the sharded ``.grad`` (FSDP2's own reduce-scatter never runs: Book-Keeping
leaves it no autograd gradient); at ``optimizer.step()`` each rank adds noise to the coordinates it owns, from its
own noise stream, and divides by the global expected batch size. Sampling, statistics and accounting are those of
data-parallel training.

Requirements (``fully_shard`` on the units and the root, one 1-D mesh, identical initialisation, every rank runs
every forward and backward), memory, mixed precision and an example: ``docs/DISTRIBUTED.md``, section
"Sharded: FSDP2".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine import ClippingEngine
from ..errors import DistributedSetupError
from ..grouping import trainable_parameters
from ..noise import derive_seed
from ..private import PrivateTraining, make_private
from .agreement import check_agreement
from .data_parallel import DataParallel

__all__ = [
    "Sharded",
    "ShardedGradientWriter",
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

    Called at the end of every backward pass on every rank (a collective) with ``[(sharded param, full-shape
    clipped sum of this rank's samples)]``. Returns whether every ``.grad`` was None before the write (a new
    logical batch).

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

    def __call__(self, clipped: list[tuple[nn.Parameter, Tensor]]) -> bool:
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


class Sharded(DataParallel):
    """FSDP2 topology: clipped sums reduce-scattered into the sharded ``.grad`` at the end of each backward pass;
    at ``step()`` each rank adds noise to the coordinates it owns, from its own noise stream. ``.grad`` holds
    DTensors; read a full gradient with ``p.grad.full_tensor()`` (a collective)."""

    name = "sharded"

    def __init__(self, model: nn.Module) -> None:
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
        super().__init__(mesh.get_group())
        self.model = model
        self.gradients = ShardedGradientWriter(params, self.group, _mesh_device(mesh))
        self._leak_checked: dict[int, Tensor] = {}
        self._handles: list = []

    def prepare(self, model: nn.Module, engine: ClippingEngine, settings: dict[str, Any]) -> None:
        # (an int M grouping may resolve at the first forward pass: every rank runs every FSDP2 forward)
        engine.parameter_alias = fsdp_parameter_alias(model)
        engine.grad_sink = self.gradients
        engine.before_generic_rerun = fsdp_rerun_unshard(model)
        placements = [repr(tuple(p.placements)) for p in self.gradients.params.values()]
        check_agreement(
            settings | {"placements": placements}, what="grouping, privacy and sharding settings", group=self.group
        )

    def noise_seed(self, seed: int | None) -> int | None:
        return None if seed is None else derive_seed(seed, f"shard-noise-rank{self.rank}")

    def bind(self, engine: ClippingEngine, params: list[nn.Parameter]) -> None:
        super().bind(engine, params)
        self._handles.append(self.model.register_forward_hook(self._check_unsharded_leaks))

    def unbind(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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

    def finish_gradients(self, noise: Any, std: float, expected_batch_size: float) -> None:
        params = list(self.gradients.params.values())
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    self.gradients._accumulate(p, torch.zeros_like(p.to_local()))
            shards = [p.grad.to_local() for p in params]  # each rank: the coordinates it owns, once
            noise.add_(shards, std)
            torch._foreach_mul_(shards, 1.0 / expected_batch_size)


def make_private_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, **settings: Any) -> PrivateTraining:
    """Make an FSDP2 (``fully_shard``-ed) model + its optimizer train with DP; call on every rank.

    ``make_private(model, optimizer, topology=Sharded(model), **settings)``: the settings are those of
    :func:`groupclip.make_private` (``data_size`` and ``batch_size`` GLOBAL), the same on every rank (checked:
    all ranks raise together otherwise). The process group is the one of the parameters' device mesh. See
    ``docs/DISTRIBUTED.md`` (section "Sharded: FSDP2") for what happens where.

    Args:
        model: the root module, after ``fully_shard`` was applied to it (and to any submodules first).
        optimizer: built on ``model.parameters()`` after sharding (the sharded DTensor parameters).

    Raises:
        DistributedSetupError: the model is not ``fully_shard``-ed at its root, a trainable parameter is not a
            1-D-mesh sharded DTensor, or the ranks disagree on the grouping, thresholds, clip function, privacy
            settings or parameter shapes -- raised on every rank.
        PrivacySetupError, UnreachableEpsilonError, ValueError: as :func:`groupclip.make_private`.
    """
    for name in ("distributed", "process_group", "topology"):
        if settings.get(name):
            raise DistributedSetupError(f"make_private_sharded sets the topology itself; drop {name}=.")
    return make_private(model, optimizer, topology=Sharded(model), **settings)
