"""Canaries: inclusion, grouping coverage, the per-sample gradients they produce, training sets and scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from groupclip import resolve_grouping
from groupclip.audit import NOT_A_CANARY, DiracCanaries, InputCanaries, draw_inclusion


def body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_inclusion_is_seeded_and_fair():
    assert torch.equal(draw_inclusion(500, seed=1), draw_inclusion(500, seed=1))
    assert not torch.equal(draw_inclusion(500, seed=1), draw_inclusion(500, seed=2))
    assert 200 < int(draw_inclusion(500, seed=1).sum()) < 300


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise", "param-wise"])
def test_every_group_gets_one_audit_parameter(grouping):
    canaries = DiracCanaries(10, body(), grouping=grouping, seed=0)
    resolved = resolve_grouping(canaries.model, canaries.grouping).groups  # a valid partition of the model
    assert list(resolved) == canaries.groups
    for k, group in enumerate(canaries.groups):
        audit = [name for name in resolved[group] if name.startswith("audit.")]
        assert audit == [f"audit.{k}.table.weight"]


def per_sample_grads(canaries: DiracCanaries, canary: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = canaries.model
    model.zero_grad()
    index = torch.tensor([canary])
    out, audit = model(index, x[None])
    canaries.loss(F.cross_entropy(out, y[None], reduction="none"), audit, index).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_canary_gradient_is_its_direction_and_nothing_else():
    canaries = DiracCanaries(6, body(), grouping="layer-wise", boost=10.0, seed=0)
    canaries.use_thresholds({"0": 0.3, "2": 0.4})
    grads = per_sample_grads(canaries, 4, torch.randn(3), torch.tensor(1))
    for k, r in enumerate((0.3, 0.4)):
        expected = torch.zeros(7, 1)
        expected[4, 0] = 10.0 * r  # boost * R_k on coordinate j only: norm above the threshold
        assert torch.allclose(grads[f"audit.{k}.table.weight"], expected)
    assert all(float(g.abs().sum()) == 0.0 for n, g in grads.items() if n.startswith("body."))


def test_an_ordinary_example_never_touches_the_audit_parameters():
    canaries = DiracCanaries(6, body(), grouping="layer-wise", seed=0)
    grads = per_sample_grads(canaries, NOT_A_CANARY, torch.randn(3), torch.tensor(1))
    assert all(float(g.abs().sum()) == 0.0 for n, g in grads.items() if n.startswith("audit."))
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith("body."))


def test_training_set_holds_base_and_included_canaries():
    canaries = DiracCanaries(40, body(), seed=3)
    base = TensorDataset(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    train = canaries.training_set(base)
    assert len(train) == 5 + int(canaries.included.sum())
    assert int(train[0][0]) == NOT_A_CANARY
    indices = [int(train[i][0]) for i in range(5, len(train))]
    assert indices == torch.nonzero(canaries.included).flatten().tolist()


def test_scores_are_the_decrease_along_the_canary_direction():
    canaries = DiracCanaries(4, body(), grouping="layer-wise", seed=0)
    canaries.use_thresholds({"0": 1.0, "2": 1.0})
    canaries.snapshot()
    with torch.no_grad():
        canaries.model.audit[0].table.weight[2, 0] -= 3.0
        canaries.model.audit[1].table.weight[2, 0] -= 1.0
    scores = canaries.scores()
    assert scores.tolist() == pytest.approx([0.0, 0.0, 4.0 / 2**0.5, 0.0])
    assert canaries.group_scores()[2].tolist() == pytest.approx([3.0, 1.0])


def test_input_canaries_mislabel_and_score_by_loss_decrease():
    x, y = torch.randn(30, 3), torch.randint(0, 3, (30,))
    canaries = InputCanaries.mislabeled(x, y, num_classes=3, seed=0)
    assert bool((canaries.targets != y).all())
    base = TensorDataset(torch.randn(7, 3), torch.zeros(7, dtype=torch.long))
    assert len(canaries.training_set(base)) == 7 + int(canaries.included.sum())
    model = nn.Linear(3, 3)
    canaries.snapshot(model)
    before = canaries.losses(model)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    after = canaries.losses(model)
    assert after.tolist() == pytest.approx([torch.log(torch.tensor(3.0)).item()] * 30)
    assert torch.allclose(canaries.scores(model), before - after)


def test_scores_need_a_snapshot():
    with pytest.raises(RuntimeError):
        DiracCanaries(4, body(), seed=0).scores()
    with pytest.raises(ValueError):
        DiracCanaries(4, body(), boost=0.5)
