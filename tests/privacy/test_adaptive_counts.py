"""Adaptive thresholds' released counts, threshold normalisation, and the randomness of the noise.

* The centered counts ``c_k = sum_i (1[||g_ik|| <= R_k] - 1/2)`` that a step releases (before their noise) have L2
  sensitivity ``sqrt(M)/2`` under adding or removing one sample -- the value the budget split
  ``z1 = (sigma^-2 - M / (4 sigma_b^2))^-1/2`` assumes. Checked by construction on a real engine: two neighbouring
  batches through the same run, the difference of the counts it accumulated is at most ``sqrt(M)/2`` and every
  neighbour attains it (each count moves by exactly 1/2). The counts as released (with their noise, drawn from two
  equal generators, so the noise cancels) differ by the same vector.
* ``rescale="total"`` keeps ``sqrt(sum_k R_k^2)`` (the sensitivity) at its initial value across updates while the
  thresholds move; ``rescale="none"`` lets it drift.
* The noise is unpredictable by default (two runs without ``noise_seed`` draw different noise, and no warning);
  ``noise_seed`` makes it reproducible and warns with :class:`ReproducibleNoiseWarning`.

The model is three bias-free linear blocks on disjoint slices of the input: under ``loss = out.sum()`` the
per-sample gradient of block k is sample i's slice, whatever the weights, so every per-sample norm is known.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import groupclip.noise as noise_module
from groupclip import AdaptiveClipping, GaussianNoise, ReproducibleNoiseWarning, make_private

DTYPE = torch.float64
SLICES = {"a": slice(0, 2), "b": slice(2, 5), "c": slice(5, 9)}
M = len(SLICES)


class ThreeBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(2, 1, bias=False).to(DTYPE)
        self.b = nn.Linear(3, 1, bias=False).to(DTYPE)
        self.c = nn.Linear(4, 1, bias=False).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, SLICES["a"]]) + self.b(x[:, SLICES["b"]]) + self.c(x[:, SLICES["c"]])


def rows_with_block_norms(norms: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows whose slice k has L2 norm ``norms[:, k]`` (random directions)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(norms), 9, generator=g, dtype=DTYPE)
    for k, part in enumerate(SLICES.values()):
        x[:, part] *= (norms[:, k] / x[:, part].norm(dim=1))[:, None]
    return x


def adaptive_run(adaptive: AdaptiveClipping, data_size: int = 16, **kwargs):
    model = ThreeBlocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model, opt, grouping="layer-wise", max_grad_norm={"a": 1.0, "b": 1.0, "c": 1.0}, loss_reduction="sum",
        noise_multiplier=1.0, sample_rate=1.0, data_size=data_size, adaptive=adaptive, **kwargs,
    )  # fmt: skip
    return model, opt, private


def centered_counts(model, opt, private, x: torch.Tensor) -> torch.Tensor:
    """The run's centered counts of one logical batch ``x`` (before their noise), after its backward pass."""
    opt.zero_grad(set_to_none=True)  # a new logical batch: the counts start from zero
    private.backward(model(x).sum())
    return private.tracker.centered.clone()


def released(private, expected_batch_size: float) -> torch.Tensor:
    return torch.tensor(private.tracker.released_counts(GaussianNoise(seed=5), expected_batch_size), dtype=DTYPE)


# ---------------------------------------------------------------------- sensitivity of the released counts
def test_centered_counts_have_sensitivity_sqrt_m_over_two_and_attain_it():
    model, opt, private = adaptive_run(AdaptiveClipping(count_noise_std=2.0), data_size=40)
    assert list(private.engine.thresholds) == list(SLICES)
    g = torch.Generator().manual_seed(3)
    norms = 0.2 + 2.0 * torch.rand(12, M, generator=g, dtype=DTYPE)  # around the thresholds 1.0
    batch = rows_with_block_norms(norms, seed=4)
    base = centered_counts(model, opt, private, batch)
    within = (norms <= 1.0).to(DTYPE)
    assert torch.equal(base, (within - 0.5).sum(0))  # the count is what it says
    assert 0 < within.sum() < within.numel()  # some samples inside a threshold, some outside
    base_released = released(private, private.expected_batch_size)
    bound = math.sqrt(M) / 2
    moves = set()
    for seed in range(8):  # add one sample: every group's count moves by +-1/2
        extra_norms = 0.2 + 2.0 * torch.rand(1, M, generator=g, dtype=DTYPE)
        extra = rows_with_block_norms(extra_norms, seed=100 + seed)
        bigger = centered_counts(model, opt, private, torch.cat([batch, extra]))
        diff = bigger - base
        assert float(diff.norm()) <= bound + 1e-12
        assert float(diff.norm()) == pytest.approx(bound, abs=1e-12)  # attained
        moves.add(tuple(diff.tolist()))
        noisy = released(private, private.expected_batch_size) - base_released  # same noise draws: they cancel
        assert float(noisy.norm()) == pytest.approx(bound, abs=1e-9)
    for drop in range(len(batch)):  # remove one sample
        keep = torch.arange(len(batch)) != drop
        diff = centered_counts(model, opt, private, batch[keep]) - base
        assert float(diff.norm()) == pytest.approx(bound, abs=1e-12)
    assert len(moves) > 1  # the added samples fell on different sides of different thresholds


# ---------------------------------------------------------------------- normalisation of the thresholds
def _train_steps(model, opt, private, x: torch.Tensor, steps: int) -> list[dict[str, float]]:
    history = [dict(private.engine.thresholds)]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        private.backward(model(x).sum())
        opt.step()
        history.append(dict(private.engine.thresholds))
    return history


def _total(thresholds: dict[str, float]) -> float:
    return math.sqrt(sum(r * r for r in thresholds.values()))


@pytest.mark.parametrize("rescale", ["total", "none"])
def test_rescale_total_keeps_the_sensitivity_and_none_lets_it_drift(rescale):
    # group a's norms are tiny (all under its threshold), b's large (all over), c's around 1
    norms = torch.tensor([[0.01, 20.0, 0.5], [0.02, 30.0, 2.0]] * 8, dtype=DTYPE)
    x = rows_with_block_norms(norms, seed=6)
    settings = AdaptiveClipping(target_quantile=0.5, learning_rate=0.5, count_noise_std=1.0, rescale=rescale)
    model, opt, private = adaptive_run(settings)
    history = _train_steps(model, opt, private, x, steps=6)
    initial = _total(history[0])
    for before, after in itertools.pairwise(history):
        assert after["b"] / after["a"] > before["b"] / before["a"]  # the thresholds do move, apart
        assert max(abs(after[g] - before[g]) for g in SLICES) > 1e-3
        if rescale == "total":
            assert _total(after) == pytest.approx(initial, rel=1e-12)
            assert private.sensitivity == pytest.approx(initial, rel=1e-12)
    if rescale == "none":
        assert abs(_total(history[-1]) / initial - 1) > 0.5


def test_rescale_none_drifts_when_every_group_shrinks_and_total_does_not():
    norms = torch.full((16, M), 0.01, dtype=DTYPE)  # every sample far under every threshold
    x = rows_with_block_norms(norms, seed=7)
    totals = {}
    for rescale in ("none", "total"):
        settings = AdaptiveClipping(learning_rate=0.5, count_noise_std=1.0, rescale=rescale)
        model, opt, private = adaptive_run(settings)
        history = _train_steps(model, opt, private, x, steps=5)
        totals[rescale] = [_total(t) for t in history]
    assert all(b < a for a, b in itertools.pairwise(totals["none"]))
    assert totals["none"][-1] < 0.5 * totals["none"][0]
    assert totals["total"] == pytest.approx([totals["total"][0]] * 6, rel=1e-12)


# ---------------------------------------------------------------------- randomness of the noise
def _noise_of_one_step(**kwargs) -> torch.Tensor:
    """The gradient after one step whose clipped sum is exactly 0: pure noise."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80, **kwargs)
    x = torch.randn(8, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    (model(x) * 0.0).mean().backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    private.detach()
    return noise


def test_noise_is_unpredictable_by_default(monkeypatch):
    monkeypatch.setattr(noise_module, "_warned", False)  # the warning is once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReproducibleNoiseWarning)
        first, second = _noise_of_one_step(), _noise_of_one_step()
    assert first.abs().min() > 0 and second.abs().min() > 0
    assert not torch.equal(first, second)
    assert (first - second).abs().min() > 0  # every coordinate differs


def test_noise_seed_makes_the_noise_reproducible_and_warns(monkeypatch):
    monkeypatch.setattr(noise_module, "_warned", False)
    with pytest.warns(ReproducibleNoiseWarning, match="noise_seed=11"):
        first = _noise_of_one_step(noise_seed=11)
    second = _noise_of_one_step(noise_seed=11)
    other = _noise_of_one_step(noise_seed=12)
    assert first.abs().min() > 0
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
