"""WeightAverage: the exponential moving average of the trained weights that a recipe's ema_decay evaluates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groupclip.training import apply_overrides, load_recipe
from groupclip.training.recipe import RecipeError
from groupclip.training.weight_average import WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not averaged
    return model


def test_update_is_the_warmed_up_exponential_average() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.9)
    trained = [p for p in model.parameters() if p.requires_grad]
    want = [p.detach().clone().double() for p in trained]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.9, (1 + n) / (10 + n))
        want = [decay * w + (1 - decay) * p.detach().double() for w, p in zip(want, trained, strict=True)]
        average.update()
    assert len(average.average) == 3
    for got, expected in zip(average.average, want, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_applied_swaps_in_the_average_and_restores_the_weights() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update()
    moved = [p.detach().clone() for p in model.parameters()]
    with average.applied():
        inside = [p.detach().clone() for p in model.parameters()]
        assert torch.equal(inside[1], moved[1])  # the frozen bias is not averaged
        torch.testing.assert_close(inside[0], before[0] + 0.9)  # first update: decay min(0.5, 1/10) = 0.1
    for p, m in zip(model.parameters(), moved, strict=True):
        assert torch.equal(p, m)


def test_state_round_trip_and_mismatch() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.99)
    average.update()
    other = WeightAverage(_model(), decay=0.99)
    other.load_state_dict(average.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.average, average.average, strict=True))
    with pytest.raises(ValueError, match="trainable parameters"):
        WeightAverage(nn.Linear(2, 2), decay=0.9).load_state_dict(average.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_interval_is_an_error(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(), decay=decay)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_recipe_ema_decay_is_checked(decay: float) -> None:
    with pytest.raises(RecipeError, match=r"schedule\.ema_decay"):
        apply_overrides(load_recipe("default"), {"schedule.ema_decay": decay})
