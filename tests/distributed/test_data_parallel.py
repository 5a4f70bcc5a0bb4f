"""Data-parallel DP (make_private(distributed=True)) on 2 gloo processes equals one process on the union batch."""

from __future__ import annotations

import pytest
import torch
from spawn import RankFailures, run_ranks
from torch import nn

from groupclip import make_private
from groupclip.errors import DistributedSetupError
from groupclip.grouping import resolve_grouping
from groupclip.sampling import PoissonBatchSampler

SAMPLES, PER_RANK = 8, 4


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [
        (torch.randn(SAMPLES, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (SAMPLES,), generator=gen))
        for _ in range(2)
    ]


def _train(rank: int, world: int, grouping, distributed: bool, noise: float = 0.0, lr: float = 0.1) -> dict:
    """Two DP steps; rank r sees samples [4r, 4r+4) of each batch (all 8 when world == 1)."""
    model = _model(seed=rank)  # rank 1 starts different: make_private broadcasts rank 0's parameters
    if grouping == "2 blocks":  # M blocks in execution order, resolved up front (data parallel needs that)
        grouping = {g: list(names) for g, names in resolve_grouping(model, 2, _order(model)).groups.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    private = make_private(
        model,
        optimizer,
        grouping=grouping,
        max_grad_norm=0.5,
        loss_reduction="sum",
        noise_multiplier=noise,
        sample_rate=0.5,
        data_size=2 * SAMPLES,
        seed=7,
        distributed=distributed,
    )
    try:
        grads = []
        for x, y in _batches():
            take = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world > 1 else slice(None)
            nn.functional.cross_entropy(model(x[take]), y[take], reduction="sum").backward()
            optimizer.step()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.zero_grad()
        return {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": grads,
            "samples": private.last_metrics["samples"],
            "epsilon": private.epsilon() if noise > 0 else None,
        }
    finally:
        private.detach()


def _order(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]  # a Sequential runs in registration order


def _close(got: dict, want: dict, rel: float = 1e-6) -> None:
    for name, value in want.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((got[name] - value).abs().max() / scale) < rel, name


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise", "param-wise", "2 blocks"])
def test_two_ranks_of_four_equal_one_process_of_eight(grouping):
    ranks = run_ranks(_train, 2, (grouping, True), timeout=120)
    single = _train(0, 1, grouping, False)
    for result in ranks:
        assert result["samples"] == SAMPLES  # the step's metrics count the global batch
        for got, want in zip(result["grads"], single["grads"], strict=True):
            _close(got, want)
        _close(result["params"], single["params"])


@pytest.mark.slow
def test_noise_is_added_once_with_the_stated_variance():
    """sigma = 1, R = 1 (all-layer: S = 1): grad * qN - clipped sum ~ N(0, 1) per coordinate, identical on ranks."""
    ranks = run_ranks(_noise_worker, 2, (1.0,), timeout=120)
    clean = _noise_worker(0, 1, 0.0)
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    noise = (ranks[0]["grad"] - clean["grad"]) * ranks[0]["expected"]
    variance = float(noise.var())
    # 4160 coordinates: the sample variance of N(0, 1) is within 1 +- 0.1 with probability > 0.99999; noise added
    # by both ranks would give 2, none 0
    assert abs(variance - 1.0) < 0.1, variance
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] > 0


def _noise_worker(rank: int, world: int, noise: float) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(64, 64).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    private = make_private(
        model,
        optimizer,
        max_grad_norm=1.0,
        loss_reduction="sum",
        noise_multiplier=noise,
        batch_size=8,
        data_size=100,
        seed=3,
        distributed=world > 1,
    )
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    take = slice(rank * 4, rank * 4 + 4) if world > 1 else slice(None)
    model(x[take]).square().sum().backward()
    optimizer.step()
    grad = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])
    out = {"grad": grad, "expected": private.expected_batch_size, "epsilon": private.epsilon() if noise else None}
    private.detach()
    return out


def test_sharded_poisson_batches_form_one_poisson_sample():
    full = PoissonBatchSampler(50, 0.3, steps=5, seed=11)
    shards = [PoissonBatchSampler(50, 0.3, steps=5, seed=11, shard=(r, 2)) for r in range(2)]
    for whole, part0, part1 in zip(full, *shards, strict=True):
        assert not set(part0) & set(part1)
        assert sorted(part0 + part1) == whole
    with pytest.raises(ValueError, match="shard"):
        PoissonBatchSampler(50, 0.3, shard=(2, 2))


def _disagree(rank: int, world: int, what: str) -> str:
    model = _model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = {"grouping": "all-layer", "noise_multiplier": 1.0}
    if what == "unresolved":
        settings["grouping"] = 2
    elif rank == 1:
        settings["grouping" if what == "grouping" else "noise_multiplier"] = "layer-wise" if what == "grouping" else 1.5
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    try:
        make_private(model, optimizer, batch_size=4, data_size=100, seed=0, distributed=True, **settings)
    except DistributedSetupError:
        hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        assert hooks_after == hooks_before  # nothing half-applied
        assert not optimizer._optimizer_step_pre_hooks
        raise
    return "no error"


@pytest.mark.slow
@pytest.mark.parametrize("what", ["grouping", "noise_multiplier", "unresolved"])
def test_ranks_that_disagree_all_fail_loudly(what):
    """Disagreeing ranks, or an M-blocks grouping not resolved up front, fail on every rank with nothing applied."""
    with pytest.raises(RankFailures) as caught:
        run_ranks(_disagree, 2, (what,), timeout=60)
    errors = caught.value.errors()
    assert sorted(errors) == [0, 1], caught.value
    for message in errors.values():
        assert "DistributedSetupError" in message
        assert (what in message) if what != "unresolved" else ("Resolve it up front" in message)


def _one_rank_nonfinite(rank: int, world: int) -> dict:
    model = _model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model, optimizer, noise_multiplier=1.0, batch_size=4, data_size=100, distributed=True, noise_seed=5
    )
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[2] = float("nan")
    try:
        nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()  # no rank raises
        optimizer.step()
        return {
            "params": [p.detach().clone() for p in model.parameters()],
            "steps": private.steps,
            "charged": private.accountant.steps,
            "dropped": private.last_metrics["dropped_samples"],
        }
    finally:
        private.detach()


@pytest.mark.slow
def test_a_non_finite_norm_on_one_rank_drops_that_sample_and_every_rank_steps():
    """A sample whose norm is not finite cannot stop the step (that would reveal it): it is dropped, every rank
    takes the same step, and the round is charged."""
    ranks = run_ranks(_one_rank_nonfinite, 2, timeout=60)
    for result in ranks:
        assert result["steps"] == result["charged"] == 1
        assert result["dropped"] == {"all": 1}  # summed over ranks
        assert all(torch.isfinite(p).all() for p in result["params"])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))


def test_ddp_wrapped_models_and_missing_process_groups_are_refused():
    model = _model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DistributedSetupError, match="init_process_group"):
        make_private(model, optimizer, noise_multiplier=1.0, batch_size=4, data_size=100, distributed=True)
    assert not optimizer._optimizer_step_pre_hooks


def _adaptive(rank: int, world: int) -> dict:
    from groupclip.adaptive import AdaptiveClipping

    model = _model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model,
        optimizer,
        grouping="layer-wise",
        max_grad_norm=0.5,
        loss_reduction="sum",
        noise_multiplier=1.0,
        sample_rate=0.5,
        data_size=2 * SAMPLES,
        adaptive=AdaptiveClipping(target_quantile=0.5, learning_rate=0.5, count_noise_std=1.0),
        seed=7,
        distributed=world > 1,
    )
    thresholds = []
    for x, y in _batches():
        take = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world > 1 else slice(None)
        nn.functional.cross_entropy(model(x[take]), y[take], reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
        thresholds.append(dict(private.engine.thresholds))
    private.detach()
    return {"thresholds": thresholds, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.slow
def test_adaptive_thresholds_and_noisy_steps_match_one_process():
    """Global counts, rank 0's count and gradient noise (the single process' draws, in its order): the same run."""
    ranks = run_ranks(_adaptive, 2, timeout=120)
    single = _adaptive(0, 1)
    for result in ranks:
        for got, want in zip(result["thresholds"], single["thresholds"], strict=True):
            assert got == pytest.approx(want, rel=1e-9)
        _close(result["params"], single["params"])
    assert single["thresholds"][0] != single["thresholds"][1]  # the thresholds did move
