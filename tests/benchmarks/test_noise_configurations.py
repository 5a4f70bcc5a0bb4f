"""The suite's noisy configurations draw the noise they claim to: the DP step under ``make_private`` (noise and
accounting) and the non-private step plus the noise alone (the floor the DP step is judged against)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness.presets import build_workload
from benchmarks.harness.worker import RunSpec, _Trainer


def _update(style: str, noise: bool, lr: float = 1.0) -> tuple[torch.Tensor, _Trainer]:
    work = build_workload("cnn-tiny", seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in work.model.parameters()])
    trainer = _Trainer(RunSpec(model="cnn-tiny", style=style, noise=noise, lr=lr), work)
    try:
        trainer.step()
    finally:
        trainer.close()
    after = torch.cat([p.detach().flatten() for p in work.model.parameters()])
    return after - before, trainer


def test_noise_alone_adds_gaussian_noise_of_the_dp_step_scale_to_the_non_private_update() -> None:
    plain, _ = _update("non-private", noise=False)
    noisy, trainer = _update("non-private", noise=True)
    std = trainer.noise_alone.std
    assert std == pytest.approx(1.0 / trainer.work.batch_size)  # R / B with noise multiplier 1
    extra = noisy - plain
    assert extra.numel() > 1000
    assert extra.std().item() == pytest.approx(std, rel=0.1)
    assert extra.mean().abs().item() < 5 * std / extra.numel() ** 0.5


def test_the_noisy_groupclip_step_is_private_training_charged_by_its_accountant() -> None:
    clipped, _ = _update("layer-wise", noise=False)
    noisy, trainer = _update("layer-wise", noise=True)
    assert trainer.private is not None and trainer.engine is trainer.private.engine
    assert trainer.private.steps == 1 and trainer.private.epsilon() > 0
    extra = noisy - clipped
    assert extra.std().item() == pytest.approx(1.0 / trainer.work.batch_size, rel=0.1)


def test_opacus_is_not_run_with_noise() -> None:
    with pytest.raises(ValueError, match="opacus-ghost"):
        RunSpec(model="cnn-tiny", style="opacus-ghost", noise=True)
    assert RunSpec(model="m", style="all-layer", noise=True).label == "all-layer+noise"
