"""groupclip in an Accelerate loop: make_private before or after ``accelerator.prepare``.

* make_private then prepare, and prepare then make_private_accelerated, both take exactly the steps of the plain
  loop (same seeds, Poisson batches, physical batches, noise), on CPU;
* prepare then the core make_private: make_private unwraps the AcceleratedOptimizer itself and takes the same steps;
* gradient accumulation in the accelerator, fp16 loss scaling and several processes are refused with the fix.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

accelerate = pytest.importorskip("accelerate")

from tiny_hf import seed_kwargs  # noqa: E402

from groupclip import make_private, physical_batches  # noqa: E402
from groupclip.integrations.accelerate import (  # noqa: E402
    AccelerateSetupError,
    check_accelerator,
    make_private_accelerated,
    unwrap_optimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore:noise_seed=:UserWarning")  # seeded on purpose

STEPS = 3
PRIVACY = dict(grouping="layer-wise", max_grad_norm=0.3, noise_multiplier=0.8, batch_size=8, data_size=32)


def _problem() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    g = torch.Generator().manual_seed(1)
    return model, TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))


def _train(private, model, optimizer, data, device=None) -> None:
    """Poisson batches, physical batches of 3, one step per Poisson batch."""
    loader = private.poisson_loader(data)
    for step, (x, y) in enumerate(loader):
        if step == STEPS:
            break
        if device is not None:
            x, y = x.to(device), y.to(device)
        for xb, yb in physical_batches((x, y), 3):
            private.backward(F.cross_entropy(model(xb), yb))
        optimizer.step()
        optimizer.zero_grad()


def _plain() -> dict[str, torch.Tensor]:
    model, data = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    private = make_private(model, optimizer, **PRIVACY, **seed_kwargs(3))
    _train(private, model, optimizer, data)
    assert private.steps == STEPS
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _accelerated(order: str) -> dict[str, torch.Tensor]:
    accelerator = accelerate.Accelerator(cpu=True)
    model, data = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    settings = {**PRIVACY, **seed_kwargs(3)}
    if order == "make_private, then prepare":
        private = make_private(model, optimizer, **settings)
        model, optimizer = accelerator.prepare(model, optimizer)
    elif order == "prepare, then make_private_accelerated":
        model, optimizer = accelerator.prepare(model, optimizer)
        private = make_private_accelerated(accelerator, model, optimizer, **settings)
    else:  # "prepare, then make_private": the core's own make_private on the AcceleratedOptimizer
        model, optimizer = accelerator.prepare(model, optimizer)
        private = make_private(model, optimizer, **settings)
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    _train(private, model, optimizer, data, accelerator.device)
    assert private.steps == STEPS and len(private.accountant.ledger) == 1
    return {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}


@pytest.mark.parametrize("order", ["make_private, then prepare", "prepare, then make_private_accelerated"])
def test_both_orders_take_the_plain_loops_steps(order):
    want, got = _plain(), _accelerated(order)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_prepare_then_the_core_make_private():
    want, got = _plain(), _accelerated("prepare, then make_private")
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_unwrap_optimizer():
    model, _ = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert unwrap_optimizer(optimizer) is optimizer
    wrapped = accelerate.optimizer.AcceleratedOptimizer(optimizer, device_placement=False)
    assert unwrap_optimizer(wrapped) is optimizer
    scaled = accelerate.optimizer.AcceleratedOptimizer(
        optimizer, device_placement=False, scaler=torch.amp.GradScaler("cpu")
    )
    with pytest.raises(AccelerateSetupError, match="bf16"):
        unwrap_optimizer(scaled)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"gradient_accumulation_steps": 2}, "physical_batches"),
        ({"mixed_precision": "fp16"}, "bf16"),
        ({"num_processes": 2}, "distributed=True"),
    ],
)
def test_accelerator_settings_that_break_dp_are_refused(setting, message):
    accelerator = SimpleNamespace(**{"num_processes": 1, "gradient_accumulation_steps": 1, "mixed_precision": "no"})
    vars(accelerator).update(setting)
    with pytest.raises(AccelerateSetupError, match=message):
        check_accelerator(accelerator)
    model, _ = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AccelerateSetupError, match=message):
        make_private_accelerated(accelerator, model, optimizer, **PRIVACY)
    assert not any(module._forward_hooks for module in model.modules())  # nothing attached


def test_a_real_accelerator_with_gradient_accumulation_is_refused():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, _ = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AccelerateSetupError, match="gradient_accumulation_steps=2"):
        make_private_accelerated(accelerator, model, optimizer, **PRIVACY)
