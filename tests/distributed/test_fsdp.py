"""Sharded DP training (FSDP2 fully_shard, make_private_sharded) on 2 gloo processes equals one unsharded process.

The model has uneven shards (9 rows over 2 ranks: 5 + 4), parameters whose rank-1 shard is empty (a [1, 9] weight
and a [1] bias), a module with no rule (the generic torch.func fallback) as its own FSDP unit applied first to the
data (so FSDP2 does not all-gather it again in the backward by itself), and units nested in the root.
"""

from __future__ import annotations

import pytest
import torch
from spawn import run_ranks
from torch import nn

from groupclip import ClippingEngine, make_private
from groupclip.errors import AttachError, DistributedSetupError, UnattributedGradientError

SAMPLES, DATA = 8, 16
GROUPINGS = [
    "all-layer",
    "layer-wise",
    "param-wise",
    {"input": ["0.*", "1.weight"], "rest": ["1.bias", "3.*", "4.*"]},  # explicit, across units and parameters
    2,  # two blocks in execution order
]


class Scale(nn.Module):
    """A raw parameter: no per-layer rule, so the generic fallback re-runs it in the backward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Scale(6), nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 1)).double()


def _shard(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root keeps the LayerNorm and the last Linear
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [
        (torch.randn(SAMPLES, 6, generator=gen, dtype=torch.float64), torch.randn(SAMPLES, generator=gen).double())
        for _ in range(2)
    ]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).squeeze(-1) - y) ** 2).sum()


# Step 1: rank r gets samples [4r, 4r + 4) in one pass. Step 2 (gradient accumulation, an empty micro-batch): rank 0
# gets [0, 5) as [0, 2) + [2, 5), rank 1 gets [5, 8) as an empty pass + [5, 8).
SPLITS = {0: [[slice(0, 4)], [slice(0, 2), slice(2, 5)]], 1: [[slice(4, 8)], [slice(5, 5), slice(5, 8)]]}
PRIVACY = dict(max_grad_norm=0.5, loss_reduction="sum", sample_rate=SAMPLES / DATA, data_size=DATA, seed=7)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train_sharded(rank: int, world: int) -> dict:
    from groupclip.distributed.sharded import make_private_sharded

    out = {}
    for grouping in GROUPINGS:
        model = _shard(_model(), world)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        private = make_private_sharded(model, optimizer, grouping=grouping, noise_multiplier=0.0, **PRIVACY)
        grads, norms = [], None
        for step, (x, y) in enumerate(_batches()):
            for part in SPLITS[rank][step]:
                _loss(model, x[part], y[part]).backward()
                if step == 0:
                    norms = private.engine.last_report.per_sample_norms
            optimizer.step()
            grads.append({n: _full(p.grad) for n, p in model.named_parameters()})
            optimizer.zero_grad()
        out[repr(grouping)] = {
            "grads": grads,
            "norms": norms,
            "params": {n: _full(p) for n, p in model.named_parameters()},
            "samples": private.last_metrics["samples"],
        }
        private.detach()
    return out


def _train_reference(grouping) -> dict:
    """One process, the unsharded model, the union of the ranks' samples in one pass per step."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    private = make_private(model, optimizer, grouping=grouping, noise_multiplier=0.0, **PRIVACY)
    grads, norms = [], None
    for step, (x, y) in enumerate(_batches()):
        _loss(model, x, y).backward()
        if step == 0:
            norms = private.engine.last_report.per_sample_norms
        optimizer.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.zero_grad()
    private.detach()
    return {"grads": grads, "norms": norms, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _close(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((got[name] - value).abs().max() / scale) < rel, name


@pytest.mark.slow
def test_fsdp_equals_one_unsharded_process_on_the_union_for_every_grouping():
    ranks = run_ranks(_train_sharded, 2, (), timeout=150)
    for grouping in GROUPINGS:
        want = _train_reference(grouping)
        for rank, result in enumerate(ranks):
            got = result[repr(grouping)]
            assert got["samples"] == SAMPLES  # the step's metrics count the global batch
            for g, w in zip(got["grads"], want["grads"], strict=True):
                _close(g, w)
            _close(got["params"], want["params"])
            # Per-sample norms of the FULL parameters (not of a shard): rank r's samples' norms in the reference.
            mine = {g: w[rank * 4 : rank * 4 + 4] for g, w in want["norms"].items()}
            _close(got["norms"], mine)


def _noise_run(rank: int, world: int) -> dict:
    from groupclip.distributed.sharded import make_private_sharded

    torch.manual_seed(0)
    out = {}
    for kind in ("constant", "gaussian"):
        model = _shard(_model_wide(), world)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        private = make_private_sharded(
            model, optimizer, grouping="layer-wise", max_grad_norm=2.0, noise_multiplier=1.3, loss_reduction="sum",
            batch_size=8, data_size=64, seed=11,
        )  # fmt: skip
        if kind == "constant":  # noise = std everywhere: each coordinate must get it exactly once
            private.noise.add_ = lambda tensors, std: torch._foreach_add_(tensors, std)
        gen = torch.Generator().manual_seed(5 + rank)
        x, y = torch.randn(4, 40, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen).double()
        _loss(model, x, y).backward()
        clean = {n: _full(p.grad) for n, p in model.named_parameters()}  # the summed clipped sums, no noise yet
        optimizer.step()
        std = private.engine.sensitivity * private.noise_multiplier
        noise = {n: _full(p.grad) * private.expected_batch_size - clean[n] for n, p in model.named_parameters()}
        local = {n: p.grad.to_local() * private.expected_batch_size for n, p in model.named_parameters()}
        out[kind] = {
            "noise": {n: v / std for n, v in noise.items()},  # standardised
            "local_rows": {n: v.shape for n, v in local.items()},
            "noise_std": private.last_metrics["noise_std"],
            "std": std,
            "epsilon": private.epsilon(),
        }
        private.detach()
    return out


def _model_wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.LayerNorm(33), nn.Linear(33, 9), nn.Linear(9, 1)).double()


@pytest.mark.slow
def test_noise_is_added_once_per_coordinate_by_the_rank_owning_it():
    ranks = run_ranks(_noise_run, 2, (), timeout=150)
    for result in ranks:
        assert result["gaussian"]["noise_std"] == pytest.approx(result["gaussian"]["std"])
    assert ranks[0]["gaussian"]["epsilon"] == ranks[1]["gaussian"]["epsilon"] > 0
    # Constant noise std on every owned coordinate: the gathered full gradient carries it exactly once everywhere
    # (twice would mean added on every rank; zero, a coordinate nobody owns -- e.g. FSDP2's padding rows).
    for name, value in ranks[0]["constant"]["noise"].items():
        assert torch.allclose(value, torch.ones_like(value), rtol=1e-9, atol=1e-9), name
    # Shards: uneven (33 rows: 17 + 16) and empty on rank 1 for the [1, 9] weight and the [1] bias.
    assert ranks[0]["constant"]["local_rows"]["0.weight"][0] == 17
    assert ranks[1]["constant"]["local_rows"]["0.weight"][0] == 16
    assert ranks[1]["constant"]["local_rows"]["4.weight"][0] == 0
    # Gaussian: standardised noise has variance 1 overall and on each rank's rows (the stated sigma^2 S^2, once),
    # and the ranks' streams are independent.
    gaussian = ranks[0]["gaussian"]["noise"]
    flat = torch.cat([v.flatten() for v in gaussian.values()])
    assert flat.numel() > 1500
    assert abs(flat.mean().item()) < 0.1
    assert 0.85 < flat.var().item() < 1.15
    weight = gaussian["0.weight"]
    first, second = weight[:16].flatten(), weight[17:33].flatten()  # rank 0's rows, rank 1's rows
    for part in (first, second):
        assert 0.8 < part.var().item() < 1.2
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.15


def _failures(rank: int, world: int) -> dict:
    from groupclip.distributed.sharded import make_private_sharded

    outcomes = {}

    def attempt(key, fn):
        try:
            fn()
            outcomes[key] = "ok"
        except Exception as err:  # the test checks type and message
            outcomes[key] = f"{type(err).__name__}: {err}"

    settings = dict(noise_multiplier=0.0, **PRIVACY)
    disagree = {
        "grouping": dict(settings, grouping="all-layer" if rank == 0 else "layer-wise"),
        "noise_multiplier": dict(settings, noise_multiplier=1.0 + rank),
    }
    for key, kwargs in disagree.items():
        model = _shard(_model(), world)
        attempt(key, lambda m=model, k=kwargs: make_private_sharded(m, torch.optim.SGD(m.parameters(), lr=0.1), **k))
    model = _shard(_model(), world)
    attempt("bare_engine", lambda: ClippingEngine(model).attach())

    # A non-finite per-sample norm on rank 1 only: that sample is dropped, every rank takes the step (finite).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    make_private_sharded(model, optimizer, grouping="layer-wise", **settings)
    x, y = _batches()[0]
    x = x[rank * 4 : rank * 4 + 4].clone()
    if rank == 1:
        x[2, 0] = float("nan")
    before = {n: _full(p) for n, p in model.named_parameters()}
    _loss(model, x, y[:4]).backward()
    attempt("nonfinite_step", optimizer.step)
    outcomes["finite"] = all(bool(torch.isfinite(_full(p)).all()) for p in model.parameters())
    before = {n: _full(p) for n, p in model.named_parameters()}
    optimizer.zero_grad()
    _loss(model, torch.nan_to_num(x), y[:4]).backward()
    attempt("next_step", optimizer.step)
    outcomes["changed"] = not all(torch.equal(_full(p), before[n]) for n, p in model.named_parameters())
    optimizer.zero_grad()
    # A parameter used outside its module: autograd computes a gradient of FSDP2's unsharded parameter, which
    # FSDP2 would reduce-scatter, unclipped, into .grad.
    attempt("leak", lambda: (_loss(model, x.nan_to_num(), y[:4]) + (model[4].weight ** 2).sum()).backward())
    return outcomes


@pytest.mark.slow
def test_disagreement_bare_engines_and_leaks_fail_loudly_on_every_rank_non_finite_norms_are_dropped():
    ranks = run_ranks(_failures, 2, (), timeout=150)
    for outcome in ranks:
        for key in ("grouping", "noise_multiplier"):
            assert outcome[key].startswith("DistributedSetupError"), outcome[key]
            assert f"{key}: rank 0 = " in outcome[key]
        assert outcome["bare_engine"].startswith(AttachError.__name__)
        assert "make_private_sharded" in outcome["bare_engine"]
        assert outcome["nonfinite_step"] == "ok" and outcome["finite"]
        assert outcome["next_step"] == "ok" and outcome["changed"]
        assert outcome["leak"].startswith(UnattributedGradientError.__name__), outcome["leak"]


def test_layout_packs_and_unpacks_like_torch_chunk():
    from groupclip.distributed.sharded import _Layout

    for shape, dim, world in [((9, 6), 0, 2), ((1, 9), 0, 2), ((5,), 0, 4), ((3, 8), 1, 4), ((2, 3), 0, 3)]:
        full = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape)
        n = shape[dim]
        rows = -(-n // world)
        chunks = list(torch.chunk(full, world, dim=dim))
        for rank in range(world):
            layout = _Layout(dim, shape, rows, max(0, min(rows, n - rank * rows)))
            packed = layout.pack(full, world, torch.float64, torch.device("cpu"))
            local = layout.unpack(packed[rank])
            want = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
            assert torch.equal(local, want), (shape, dim, world, rank)


def test_models_not_sharded_at_the_root_are_refused():
    from groupclip.distributed.sharded import make_private_sharded

    model = _model()
    with pytest.raises(DistributedSetupError, match="fully_shard"):
        make_private_sharded(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, **PRIVACY)


def test_engine_follows_parameters_a_wrapper_swaps_in_and_out():
    """What FSDP2 does, without processes: another tensor sits in each parameter slot while its module runs."""

    def swapping(model: nn.Module):
        stand_ins, canonical = {}, {}

        def pre(module, args):
            if torch._C._current_graph_task_id() != -1:  # the generic fallback's re-run in the backward: as FSDP2
                return
            for name, p in list(module._parameters.items()):
                stand_in = stand_ins.setdefault(id(p), nn.Parameter(p.detach().clone()))
                canonical[id(stand_in)] = p
                module._parameters[name] = stand_in

        def post(module, args, output):
            if torch._C._current_graph_task_id() != -1:
                return
            for name, p in list(module._parameters.items()):
                module._parameters[name] = canonical[id(p)]

        for module in model.modules():
            if module._parameters:
                module.register_forward_pre_hook(pre, prepend=True)
                module.register_forward_hook(post)  # before the engine's: the slots are restored when it runs
        return lambda p: canonical.get(id(p), p)

    x, y = _batches()[0]
    plain, swapped = _model(), _model()
    alias = swapping(swapped)
    sunk = {}
    reference = ClippingEngine(plain, grouping="layer-wise", max_grad_norm=0.5, loss_reduction="sum")
    engine = ClippingEngine(swapped, grouping="layer-wise", max_grad_norm=0.5, loss_reduction="sum")
    engine.parameter_alias = alias
    engine.grad_sink = lambda clipped: sunk.update({id(p): t for p, t in clipped}) or True
    with reference, engine:
        _loss(plain, x, y).backward()
        _loss(swapped, x, y).backward()
    assert all(p.grad is None for p in swapped.parameters())  # the sink got the sums instead
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters(), strict=True):
        assert torch.allclose(sunk[id(q)], p.grad, rtol=1e-12, atol=1e-12), name
    _close(engine.last_report.per_sample_norms, reference.last_report.per_sample_norms, rel=1e-12)
