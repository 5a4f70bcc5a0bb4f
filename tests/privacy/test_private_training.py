"""Acceptance tests of the private-training API: :func:`groupclip.make_private` and :class:`PrivateTraining`.

What is checked, end to end on the user's own optimizer (no mocks of groupclip):

* with noise 0 and thresholds nothing reaches, DP training is non-private training (SGD with momentum, AdamW;
  ``loss_reduction`` ``"mean"`` and ``"sum"``), in float64 to 1e-6 over 20 steps;
* the noise: its empirical std is ``z S / B_expected`` within 3% (models whose clipped sum is exactly zero, so the
  gradient after ``step()`` *is* the noise), added once per logical batch however many physical batches;
* adaptive thresholds converge to the target quantile of a known per-sample norm distribution (a bias-free Linear
  under ``loss = out.sum()`` has per-sample gradient ``x_i``, so the norms are the input norms), and the budget
  split ``z1 = (sigma^-2 - M / (4 sigma_b^2))^-1/2`` is both recorded (sigma in the ledger) and used (noise std);
* checkpoint / resume is bit-identical with noise and Poisson sampling (fresh model, optimizer and OS-seeded RNGs);
* LR schedulers keep working, ``clip_grad_norm_`` before step is refused; metrics and epsilon are right;
* bad input is refused with the documented errors, and a non-finite batch touches nothing.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from groupclip import (
    AdaptiveClipping,
    LossReductionError,
    PrivacySetupError,
    UnreachableEpsilonError,
    UnsupportedModuleError,
    compute_epsilon,
    make_private,
    physical_batches,
    replace_batchnorm,
)
from groupclip.accounting import MAX_NOISE_MULTIPLIER, LedgerEntry

DTYPE = torch.float64


# ---------------------------------------------------------------------- small models and data
def mlp(seed: int = 0, d_in: int = 5, hidden: int = 12, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DTYPE)


def classification_data(n: int, seed: int = 1, d_in: int = 5, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randint(0, classes, (n,), generator=g)


def inputs_with_norms(norms: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Rows with the given L2 norms and uniformly random directions."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(len(norms), dim, generator=g, dtype=DTYPE)
    return u / u.norm(dim=1, keepdim=True) * norms.to(DTYPE)[:, None]


class TwoBlocks(nn.Module):
    """``a(x[:, :3]) + b(x[:, 3:])`` without biases: under ``loss = out.sum()`` the per-sample gradient of ``a`` is
    ``x_i[:3]`` and that of ``b`` is ``x_i[3:]``, whatever the weights -- per-sample norms known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.b = nn.Linear(5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def zero_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A mean loss whose every per-sample gradient is exactly zero: the clipped sum is 0, ``.grad`` is pure noise."""
    return (model(x) * 0.0).mean()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def grads_flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------- 1. noise 0 + no clipping == non-private
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_no_noise_no_clipping_equals_non_private_training(opt_name, reduction):
    n, batch, steps = 80, 8, 20
    x, y = classification_data(n)
    batches = [(x[i * batch % n :][:batch], y[i * batch % n :][:batch]) for i in range(steps)]

    plain = mlp()
    start = params_of(plain)
    opt = OPTIMIZERS[opt_name](plain)
    for xb, yb in batches:
        F.cross_entropy(plain(xb), yb).backward()  # the mean gradient: what DP-SGD's update estimates
        opt.step()
        opt.zero_grad()

    model = mlp()
    opt = OPTIMIZERS[opt_name](model)
    private = make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1e6, batch_size=batch, data_size=n, loss_reduction=reduction
    )
    assert private.expected_batch_size == batch
    for xb, yb in batches:
        private.backward(F.cross_entropy(model(xb), yb, reduction=reduction))
        opt.step()
        opt.zero_grad()
        assert private.last_metrics["fraction_clipped"] == {"all": 0.0}

    assert private.steps == steps
    assert max_diff(params_of(model), start) > 1e-2  # it trained
    assert max_diff(params_of(model), params_of(plain)) <= 1e-6


# ---------------------------------------------------------------------- 2. the noise and its scale
@pytest.mark.parametrize(
    ("grouping", "max_grad_norm", "sens"),
    [("all-layer", 2.0, 2.0), ("param-wise", 2.0, 2.0), ("param-wise", {"weight": 3.0, "bias": 4.0}, 5.0)],
)
def test_noise_std_is_sigma_times_sensitivity_over_expected_batch(grouping, max_grad_norm, sens):
    sigma, batch, n = 1.3, 8, 800
    torch.manual_seed(0)
    model = nn.Linear(100, 100).to(DTYPE)  # 10100 noise draws per step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = make_private(
        model,
        opt,
        grouping=grouping,
        max_grad_norm=max_grad_norm,
        noise_multiplier=sigma,
        batch_size=batch,
        data_size=n,
        seed=3,
    )
    assert private.engine.sensitivity == pytest.approx(sens)
    draws = []
    for _ in range(4):
        zero_loss(model, torch.randn(batch, 100, dtype=DTYPE)).backward()
        opt.step()
        draws.append(grads_flat(model))  # after step(): (clipped sum 0 + noise) / B_expected
        opt.zero_grad()
        assert private.last_metrics["noise_std"] == pytest.approx(sigma * sens)
    draws = torch.cat(draws)
    want = sigma * sens / batch
    assert float(draws.std()) == pytest.approx(want, rel=0.03)
    assert abs(float(draws.mean())) < 5 * want / math.sqrt(len(draws))


def _logical_steps(model, opt, private, logical: list, physical: int, loss_fn) -> list[torch.Tensor]:
    """One optimizer step per logical batch, each split into physical batches of at most ``physical`` samples."""
    grads = []
    for batch in logical:
        for xb, yb in physical_batches(batch, physical):
            loss_fn(model, xb, yb).backward()
        opt.step()
        grads.append(grads_flat(model))
        opt.zero_grad()
    return grads


def test_physical_batches_without_noise_give_identical_updates():
    x, y = classification_data(64)
    logical = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    finals = []
    for physical in (16, 4):  # 1 and 4 physical batches per logical batch
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        private = make_private(model, opt, noise_multiplier=0.0, max_grad_norm=0.05, batch_size=16, data_size=64)
        _logical_steps(model, opt, private, logical, physical, lambda m, xb, yb: F.cross_entropy(m(xb), yb))
        assert private.steps == 4 and private.accountant.steps == 4
        assert private.last_metrics["samples"] == 16
        assert private.last_metrics["fraction_clipped"]["all"] > 0.5  # clipping active, so the split matters
        finals.append(params_of(model))
    assert max_diff(*finals) <= 1e-12


def test_physical_batches_add_noise_once_per_logical_batch():
    sigma, batch = 0.9, 16
    g = torch.Generator().manual_seed(5)
    logical = [(torch.randn(batch, 60, generator=g, dtype=DTYPE), torch.zeros(batch)) for _ in range(6)]
    runs = {}
    for physical in (16, 4):
        torch.manual_seed(0)
        model = nn.Linear(60, 100).to(DTYPE)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        private = make_private(
            model, opt, noise_multiplier=sigma, max_grad_norm=1.5, batch_size=batch, data_size=160, seed=11
        )
        runs[physical] = torch.cat(
            _logical_steps(model, opt, private, logical, physical, lambda m, xb, yb: zero_loss(m, xb))
        )
        assert private.steps == 6 and private.accountant.steps == 6
        assert private.last_metrics["samples"] == batch
    want = sigma * 1.5 / batch
    for draws in runs.values():
        assert float(draws.std()) == pytest.approx(want, rel=0.03)  # 4 additions would give twice the std
    assert torch.equal(runs[16], runs[4])  # same seed: the very same single draw per step


# ---------------------------------------------------------------------- 3. adaptive thresholds
@pytest.mark.parametrize(("quantile", "start"), [(0.7, 0.5), (0.3, 6.0)])
def test_adaptive_threshold_converges_to_target_quantile(quantile, start):
    # Per-sample norms ~ Uniform(1, 3); the quantile of a threshold R is measured on the data set itself.
    n, batch, steps = 2048, 128, 150
    norms = 1 + 2 * torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    x = inputs_with_norms(norms, 4, seed=1)
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    private = make_private(
        model,
        opt,
        noise_multiplier=1.0,
        max_grad_norm=start,
        batch_size=batch,
        data_size=n,
        loss_reduction="sum",
        adaptive=AdaptiveClipping(target_quantile=quantile),
        seed=2,
    )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    quantiles = []
    for step in range(steps):
        idx = order[(step * batch) % n :][:batch]
        model(x[idx]).sum().backward()
        opt.step()
        opt.zero_grad()
        quantiles.append(float((norms <= private.engine.thresholds["all"]).double().mean()))  # F(R_t) on the data
        assert "noisy_fraction_under_threshold" in private.last_metrics
    assert abs(quantiles[0] - quantile) > 0.2  # it had to move
    assert abs(sum(quantiles[-50:]) / 50 - quantile) < 0.05  # converged (averaged over the count noise)
    assert max(abs(q - quantile) for q in quantiles[-50:]) < 0.15  # and stays there


def test_adaptive_clipping_spends_the_stated_budget():
    sigma, sigma_b, batch, n, steps = 1.0, 1.0, 8, 400, 16
    torch.manual_seed(0)
    model = nn.Linear(50, 50).to(DTYPE)  # param-wise: M = 2 groups
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = make_private(
        model,
        opt,
        grouping="param-wise",
        max_grad_norm=2.0,
        noise_multiplier=sigma,
        batch_size=batch,
        data_size=n,
        adaptive=AdaptiveClipping(count_noise_std=sigma_b, rescale="none"),
        target_delta=1e-4,
        seed=4,
    )
    z1 = (sigma**-2 - 2 / (4 * sigma_b**2)) ** -0.5  # = sqrt(2)
    assert private.noise_multiplier == sigma
    assert private.gradient_noise_multiplier == pytest.approx(z1, rel=1e-12)
    normalized = []
    for _ in range(steps):
        s = private.engine.sensitivity  # the S this step's noise uses
        zero_loss(model, torch.randn(batch, 50, dtype=DTYPE)).backward()
        opt.step()
        assert private.last_metrics["noise_std"] == pytest.approx(z1 * s, rel=1e-12)
        normalized.append(grads_flat(model) * batch / s)
        opt.zero_grad()
    assert private.engine.sensitivity < 0.5 * 2.0  # all norms 0 <= R: thresholds fell, so S changed each step
    normalized = torch.cat(normalized)
    assert float(normalized.std()) == pytest.approx(z1, rel=0.03)
    assert private.accountant.ledger == [LedgerEntry(sigma, batch / n, steps)]
    assert private.epsilon() == pytest.approx(compute_epsilon(sigma, batch / n, steps, 1e-4), rel=1e-12)


# ---------------------------------------------------------------------- 4. checkpoint and resume
def _resume_setup(seed: int | None, adaptive: bool, model_seed: int):
    x, y = classification_data(40, seed=2)
    dataset = TensorDataset(x, y)
    model = mlp(seed=model_seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    private = make_private(
        model,
        opt,
        noise_multiplier=0.8,
        max_grad_norm=0.5,
        sample_rate=0.25,
        data_size=len(dataset),
        target_delta=1e-3,
        adaptive=AdaptiveClipping() if adaptive else None,
        seed=seed,
    )
    return model, opt, private, private.poisson_loader(dataset)


def _train(model, opt, private, loader, steps: int, on_step=None) -> None:
    done = 0
    while done < steps:  # several passes of round(1/q) = 4 batches: the checkpoint falls mid-pass
        for xb, yb in loader:
            if len(yb):
                private.backward(F.cross_entropy(model(xb), yb))
            opt.step()
            opt.zero_grad()
            done += 1
            if on_step is not None:
                on_step(done)
            if done == steps:
                return


def _roundtrip(state, how: str):
    if how == "deepcopy":
        return copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_resume_from_checkpoint_is_bit_identical(adaptive, how):
    model, opt, private, loader = _resume_setup(seed=7, adaptive=adaptive, model_seed=0)
    saved = {}

    def checkpoint(done: int) -> None:
        if done == 5:
            saved["state"] = _roundtrip(private.state_dict(), how)

    _train(model, opt, private, loader, 10, checkpoint)

    # Fresh everything, RNGs seeded from the OS: only the checkpoint can make the runs agree.
    model2, opt2, private2, loader2 = _resume_setup(seed=None, adaptive=adaptive, model_seed=99)
    private2.load_state_dict(saved["state"])
    assert private2.steps == 5
    _train(model2, opt2, private2, loader2, 5)

    assert private2.steps == private.steps == 10
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
    assert private2.engine.thresholds == private.engine.thresholds
    assert private2.accountant.ledger == private.accountant.ledger
    assert private2.epsilon() == private.epsilon()
    if adaptive:
        assert private.engine.thresholds["all"] != 0.5  # the thresholds did move


def test_resume_refuses_other_settings_and_missing_loader():
    model, opt, private, loader = _resume_setup(seed=1, adaptive=False, model_seed=0)
    _train(model, opt, private, loader, 2)
    state = copy.deepcopy(private.state_dict())

    x, y = classification_data(40, seed=2)
    other = mlp()
    other_private = make_private(
        other,
        torch.optim.Adam(other.parameters()),
        noise_multiplier=1.0,
        max_grad_norm=0.5,
        sample_rate=0.25,
        data_size=40,
        target_delta=1e-3,
    )
    other_private.poisson_loader(TensorDataset(x, y))
    with pytest.raises(PrivacySetupError, match="noise_multiplier"):
        other_private.load_state_dict(state)

    _, _, private3, _ = _resume_setup(seed=None, adaptive=False, model_seed=0)
    private3.sampler = None  # as if poisson_loader() had not been called
    with pytest.raises(PrivacySetupError, match="poisson_loader"):
        private3.load_state_dict(state)


# ---------------------------------------------------------------------- 5. LR schedulers, clip_grad_norm_
def test_lr_scheduler_keeps_working():
    x, y = classification_data(64)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]

    def run(private_too: bool):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        if private_too:
            make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1e6, batch_size=8, data_size=64)
        lrs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for xb, yb in batches:
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad()
                scheduler.step()
                lrs.append(opt.param_groups[0]["lr"])
        assert not [w for w in caught if "lr_scheduler" in str(w.message)]
        return params_of(model), lrs

    plain, plain_lrs = run(False)
    dp, dp_lrs = run(True)
    assert dp_lrs == plain_lrs and dp_lrs[-1] == pytest.approx(0.4 * 0.5**2)
    assert max_diff(dp, plain) <= 1e-9  # the lr each step used is the scheduled one


def test_clip_grad_norm_before_step_is_refused():
    # .grad before step() is the sum of clipped per-sample gradients, before noise: clipping it would shrink the
    # signal and not the noise, so step() refuses it and changes nothing (tests/integrations/test_clip_grad_norm.py).
    from groupclip.private import GradientChangedError

    x, y = classification_data(16)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    private = make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1e6, batch_size=8, data_size=48)
    F.cross_entropy(model(x[:8]), y[:8]).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.3)
    before = params_of(model)
    with pytest.raises(GradientChangedError, match="clip_grad_norm_"):
        opt.step()
    assert max_diff(params_of(model), before) == 0 and private.steps == 0
    opt.zero_grad()
    F.cross_entropy(model(x[8:]), y[8:]).backward()  # the next batch, without it, steps
    opt.step()
    assert private.steps == 1 and max_diff(params_of(model), before) > 0


# ---------------------------------------------------------------------- 6. metrics and epsilon
def test_metrics_and_epsilon():
    sigma, batch, n, delta = 0.7, 16, 320, 1e-4
    thresholds = {"a": 1.5, "b": 2.5}
    norms = 0.5 + 3 * torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    x = torch.cat([inputs_with_norms(norms, 3, seed=1), inputs_with_norms(norms.flip(0) * 1.2, 5, seed=2)], dim=1)
    torch.manual_seed(0)
    model = TwoBlocks().to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model,
        opt,
        grouping="layer-wise",
        max_grad_norm=thresholds,
        noise_multiplier=sigma,
        batch_size=batch,
        data_size=n,
        loss_reduction="sum",
        target_delta=delta,
        seed=0,
    )
    assert private.epsilon() == 0.0
    epsilons = []
    for step in range(3):
        xb = x[step * batch : (step + 1) * batch]
        for chunk in physical_batches(xb, 6):  # 6 + 6 + 4 samples: metrics cover the whole logical batch
            model(chunk).sum().backward()
        opt.step()
        opt.zero_grad()
        m = private.last_metrics
        assert m["step"] == step + 1
        assert m["samples"] == batch
        assert m["thresholds"] == thresholds
        assert m["noise_std"] == pytest.approx(sigma * math.hypot(1.5, 2.5))
        for group, part in (("a", xb[:, :3]), ("b", xb[:, 3:])):
            r, got = thresholds[group], part.norm(dim=1)
            assert m["fraction_clipped"][group] == pytest.approx(float((got > r).double().mean()))
            assert m["mean_clip_factor"][group] == pytest.approx(float((r / got).clamp(max=1).mean()))
        assert 0 < m["fraction_clipped"]["a"] < 1 and 0 < m["fraction_clipped"]["b"] < 1
        epsilons.append(private.epsilon())
        assert epsilons[-1] == pytest.approx(compute_epsilon(sigma, batch / n, step + 1, delta), rel=1e-12)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert private.epsilon(1e-6) == pytest.approx(compute_epsilon(sigma, batch / n, 3, 1e-6), rel=1e-12)
    assert private.epsilon(1e-6) > private.epsilon()


# ---------------------------------------------------------------------- 7. bad input
def test_batchnorm_refused_then_fixed_in_one_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=r"replace_batchnorm") as info:
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, batch_size=8, data_size=80
        )
    assert "BatchNorm1d" in str(info.value)

    replace_batchnorm(model)
    assert isinstance(model[1], nn.GroupNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80, seed=0)
    before = params_of(model)
    F.cross_entropy(model(torch.randn(8, 4, dtype=DTYPE)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert private.steps == 1
    assert max_diff(params_of(model), before) > 0


def test_optimizer_with_foreign_parameters_is_refused():
    model = mlp()
    stray = nn.Parameter(torch.zeros(7, 2, dtype=DTYPE))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(ValueError, match=r"not in the model.*\(7, 2\)"):
        make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80)


def test_optimizer_missing_model_parameters_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="missing from the optimizer") as info:
        make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80)
    assert "2.weight" in str(info.value) and "2.bias" in str(info.value)
    assert "0.weight" not in str(info.value)

    model[2].requires_grad_(False)  # frozen parameters need not be in the optimizer
    make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80)


def test_unreachable_target_epsilon_names_nearest():
    model = mlp()
    with pytest.raises(UnreachableEpsilonError) as info:
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            target_epsilon=0.5,
            target_delta=1e-5,
            steps=1000,
            batch_size=100,
            data_size=100,
        )
    nearest = compute_epsilon(MAX_NOISE_MULTIPLIER, 1.0, 1000, 1e-5)
    assert nearest > 0.5
    assert info.value.nearest_epsilon == pytest.approx(nearest, rel=1e-9)
    assert f"{nearest:.4g}" in str(info.value)


def test_reachable_target_epsilon_is_calibrated():
    model = mlp()
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=2,
        batch_size=50,
        data_size=1000,
    )
    steps = 40  # 2 epochs at q = 0.05
    assert private.plan.planned_steps == steps
    eps = compute_epsilon(private.noise_multiplier, 0.05, steps, 1e-5)
    assert 2.0 * (1 - 0.01) <= eps <= 2.0


def test_delta_at_least_one_over_n_warns():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="1/N"):
        private = make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=100, target_delta=0.01)
    private.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=100, target_delta=1e-3)


def _nan_batch(batch: int = 8):
    x, y = classification_data(batch, seed=9)
    x = x.clone()
    x[3, 1] = float("nan")
    return x, y


def _adam_run():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    private = make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, data_size=80, seed=0)
    x, y = classification_data(8, seed=8)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # one good step, so Adam has state to protect
    opt.zero_grad()
    return model, opt, private


def _snapshot(model, opt, private):
    return (
        params_of(model),
        [opt.state[p]["exp_avg"].clone() for p in model.parameters()],
        [int(opt.state[p]["step"]) for p in model.parameters()],
        copy.deepcopy(private.accountant.ledger),
        private.steps,
    )


def _assert_untouched(model, opt, private, snap) -> None:
    params, exp_avg, adam_steps, ledger, steps = snap
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params, strict=True))
    assert all(torch.equal(opt.state[p]["exp_avg"], e) for p, e in zip(model.parameters(), exp_avg, strict=True))
    assert [int(opt.state[p]["step"]) for p in model.parameters()] == adam_steps
    assert private.accountant.ledger == ledger
    assert private.steps == steps


def _good_step_works(model, opt, private) -> None:
    before = params_of(model)
    x, y = classification_data(8, seed=10)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    assert private.steps == 2 and private.accountant.steps == 2
    assert max_diff(params_of(model), before) > 0
    assert private.last_metrics["samples"] == 8


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise", "param-wise"])
def test_non_finite_sample_is_dropped_and_the_round_is_charged(grouping):
    """A sample with a non-finite norm cannot stop the step (that would reveal it): its contribution is dropped
    (factor 0), the others' are exactly their clipped gradients, the step is taken and charged. Param-wise clips
    the bias groups together at the end of the pass (the gathered path)."""
    x, y = _nan_batch()
    keep = torch.arange(len(x)) != 3
    sums, dropped = [], []
    for inputs, targets in ((x, y), (x[keep], y[keep])):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        private = make_private(
            model, opt, grouping=grouping, noise_multiplier=0.0, batch_size=8, data_size=80, loss_reduction="sum"
        )
        F.cross_entropy(model(inputs), targets, reduction="sum").backward()
        sums.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
        assert private.steps == 1 and private.accountant.steps == 1  # taken and charged
        dropped.append(private.last_metrics["dropped_samples"])
    assert torch.isfinite(sums[0]).all()
    assert torch.allclose(sums[0], sums[1], rtol=1e-12, atol=1e-14)
    assert dropped[0] and all(count == 1 for count in dropped[0].values()) and dropped[1] == {}


def test_non_finite_sample_is_reported_in_the_metrics():
    model, opt, private = _adam_run()
    x, y = _nan_batch()
    F.cross_entropy(model(x), y).backward()
    assert private.engine.last_report.dropped == {"all": [3]}
    opt.step()
    assert private.last_metrics["dropped_samples"] == {"all": 1}
    assert private.steps == 2 and private.accountant.steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.zero_grad()


def test_skipping_empty_poisson_batches_spends_the_same_as_stepping_on_them():
    """The ledger counts rounds drawn: a loop that skips empty batches reports the same epsilon."""
    data = torch.utils.data.TensorDataset(*classification_data(40, seed=2))
    epsilons, skipped = [], []
    for skip in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        private = make_private(model, opt, noise_multiplier=1.0, sample_rate=0.05, data_size=40, noise_seed=7)
        count = 0
        for x, y in private.poisson_loader(data):
            if skip and len(x) == 0:
                count += 1
                continue
            if len(x):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        epsilons.append(private.epsilon())
        skipped.append(count)
        assert private.rounds == private.accountant.steps == 20
    assert skipped[1] > 0  # the seed draws empty rounds at q = 0.05 over 40 samples
    assert epsilons[0] == epsilons[1]


@pytest.mark.parametrize(
    ("declared", "loss_fn"),
    [
        ("mean", lambda out, y: F.cross_entropy(out, y, reduction="none").sum()),
        ("mean", lambda out, y: F.cross_entropy(out, y, reduction="sum")),
        ("sum", lambda out, y: F.cross_entropy(out, y)),
        ("sum", lambda out, y: F.cross_entropy(out, y, reduction="none").mean()),
        ("mean", lambda out, y: F.mse_loss(out, F.one_hot(y, 3).to(out.dtype), reduction="sum")),
    ],
    ids=["mean-vs-.sum()", "mean-vs-ce-sum", "sum-vs-ce-mean", "sum-vs-.mean()", "mean-vs-mse-sum"],
)
def test_misdeclared_loss_reduction_is_caught(declared, loss_fn):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80, loss_reduction=declared)
    x, y = classification_data(8)
    with pytest.raises(LossReductionError, match=f"loss_reduction=.{declared}. was declared"):
        private.backward(loss_fn(model(x), y))
    assert all(p.grad is None for p in model.parameters())
    # the correctly declared loss goes through
    right = F.cross_entropy(model(x), y, reduction=declared)
    private.backward(right)
    opt.step()
    assert private.steps == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 1.0, "batch_size": 8},  # no data_size
        {"batch_size": 8, "data_size": 80},  # neither noise_multiplier nor target_epsilon
        {"target_epsilon": 1.0, "batch_size": 8, "data_size": 80, "epochs": 1},  # no target_delta
        {"target_epsilon": 1.0, "target_delta": 1e-5, "batch_size": 8, "data_size": 80},  # no epochs / steps
        {"noise_multiplier": 1.0, "data_size": 80},  # neither sample_rate nor batch_size
        {
            "noise_multiplier": 1.0,
            "target_epsilon": 1.0,
            "target_delta": 1e-5,
            "epochs": 1,
            "batch_size": 8,
            "data_size": 80,
        },  # both
    ],
)
def test_missing_or_inconsistent_settings(kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacySetupError):
        make_private(model, opt, **kwargs)
    # a refused setup leaves nothing attached: a correct one works on the same model
    make_private(model, opt, noise_multiplier=1.0, batch_size=8, data_size=80)


# ---------------------------------------------------------------------- 8. empty Poisson batches
def test_empty_poisson_batches_still_add_noise_and_count():
    sigma, q, n, r = 1.1, 1e-3, 50, 0.8
    x, y = classification_data(n, d_in=60, classes=50)
    model = mlp(d_in=60, hidden=50, classes=50)  # 5600 parameters: a statistical check of one step's noise
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    private = make_private(model, opt, noise_multiplier=sigma, max_grad_norm=r, sample_rate=q, data_size=n, seed=0)
    loader = private.poisson_loader(TensorDataset(x, y), steps=4)
    empty_draws = []
    for xb, yb in loader:
        before = params_of(model)
        if len(yb):
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
        opt.step()
        assert max_diff(params_of(model), before) > 0
        if not len(yb):
            assert private.last_metrics["samples"] == 0
            empty_draws.append(grads_flat(model))
        opt.zero_grad()
    assert len(empty_draws) >= 3  # nearly every batch is empty at q * N = 0.05
    assert private.steps == 4 and private.accountant.ledger == [LedgerEntry(sigma, q, 4)]
    assert private.last_metrics["noise_std"] == pytest.approx(sigma * r)
    draws = torch.cat(empty_draws)
    assert float(draws.std()) == pytest.approx(sigma * r / (q * n), rel=0.03)


def test_contradicting_sample_rate_and_batch_size_refused():
    model = mlp()
    with pytest.raises(PrivacySetupError):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            sample_rate=0.1,
            batch_size=50,
            data_size=100,
        )


def test_a_failing_set_up_leaves_model_optimizer_and_engine_as_they_were():
    # A topology whose bind fails half-way: nothing make_private installed may stay behind.
    from groupclip.topology import Topology

    class Failing(Topology):
        def bind(self, engine, params):
            super().bind(engine, params)
            raise RuntimeError("bind failed")

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="bind failed"):
        make_private(model, opt, noise_multiplier=1.0, batch_size=4, data_size=40, topology=Failing())
    assert "_call_impl" not in model.__dict__  # the compile shim is undone
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    make_private(model, opt, noise_multiplier=1.0, batch_size=4, data_size=40)  # and it can be attached again
