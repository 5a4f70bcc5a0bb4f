"""Benchmark workloads: presets build, factories import, bad names are refused clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.harness.presets import PRESETS, Workload, build_workload


def tiny_factory(batch_size: int, seq_len: int | None) -> Workload:
    """A factory as users write one (used by the tests below through 'test_presets:tiny_factory')."""
    model = nn.Sequential(nn.Linear(4, 3))
    return Workload(model, {"input": torch.randn(batch_size, 4)}, torch.zeros(batch_size, dtype=torch.long), "classify")


def not_a_workload(batch_size: int, seq_len: int | None):
    return nn.Linear(2, 2)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "cnn-tiny"])
def test_tiny_presets_build_and_give_a_finite_loss(name: str) -> None:
    pytest.importorskip("transformers")
    work = build_workload(name, batch_size=3)
    assert work.batch_size == 3 and work.model.training
    loss = work.loss()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert work.per_sample_loss(work.logits()).shape == (3,)


def test_every_preset_is_documented() -> None:
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.summary and preset.default_batch_size > 0


def test_lm_loss_is_the_mean_of_per_sample_token_means() -> None:
    pytest.importorskip("transformers")
    work = build_workload("gpt2-tiny", batch_size=2, seq_len=8)
    work.model.eval()  # no dropout: both losses see the same logits
    logits = work.logits()
    per_token = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), work.targets[:, 1:].reshape(-1)
    )
    assert torch.allclose(work.loss(), per_token)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_explicit_positions_give_the_same_logits_with_one_row_per_sample(name: str) -> None:
    pytest.importorskip("transformers")
    work = build_workload(name, batch_size=3).with_explicit_positions()
    assert work.inputs["position_ids"].shape == work.inputs["input_ids"].shape
    plain = build_workload(name, batch_size=3)
    work.model.eval()
    plain.model.eval()
    torch.testing.assert_close(work.logits(), plain.logits())


def test_explicit_positions_leave_other_workloads_alone() -> None:
    work = build_workload("cnn-tiny")
    assert work.with_explicit_positions() is work


def test_factories_are_imported_and_checked() -> None:
    work = build_workload("test_presets:tiny_factory", batch_size=5)
    assert work.batch_size == 5
    with pytest.raises(ValueError, match=r"must return a groupclip\.planning\.Workload"):
        build_workload("test_presets:not_a_workload")
    with pytest.raises(ValueError, match="Cannot import the model factory"):
        build_workload("no_such_module_xyz:factory")


def test_unknown_names_list_the_presets() -> None:
    with pytest.raises(ValueError, match="gpt2-small"):
        build_workload("gpt5")
