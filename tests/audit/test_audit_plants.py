"""The planted bugs' building blocks: the lying clip functions, the thresholds, and the checks that they took."""

from __future__ import annotations

import math

import pytest
import torch

from groupclip.audit import PlantError, planted_setup
from groupclip.audit.plants import check_planted


def test_honest_setups_split_the_total_threshold():
    setup = planted_setup("none", ["a", "b", "c", "d"], max_grad_norm=2.0)
    assert setup.clip_fn == "abadi" and setup.max_grad_norm == {g: 1.0 for g in "abcd"}
    assert setup.sensitivity == pytest.approx(2.0)


def test_no_clipping_passes_every_gradient_whole():
    setup = planted_setup("no-clipping", ["a"], max_grad_norm=1.0)
    assert setup.clip_fn.bound_proven  # the lie that makes the engine skip its runtime check
    assert setup.clip_fn(torch.tensor([0.5, 10.0, 1e6]), 1.0).tolist() == [1.0, 1.0, 1.0]


def test_unclipped_group_skips_only_the_marked_threshold():
    setup = planted_setup("unclipped-group", ["a", "b"], max_grad_norm=1.0, unclipped_group="b")
    marked, honest = setup.max_grad_norm["b"], setup.max_grad_norm["a"]
    assert marked == pytest.approx(0.75 * honest) and setup.unclipped_group == "b"
    assert setup.sensitivity == pytest.approx(math.sqrt(marked**2 + honest**2))  # the noise still counts it
    norms = torch.tensor([0.1, 5.0], dtype=torch.float32)
    assert setup.clip_fn(norms, marked).tolist() == [1.0, 1.0]
    assert setup.clip_fn(norms, honest).tolist() == pytest.approx([1.0, honest / 5.0])
    with pytest.raises(ValueError):
        planted_setup("unclipped-group", ["a"], unclipped_group="z")


class Finished:
    """What a training run exposes after a step: its metrics only."""

    def __init__(self, noise_std: float, factors: dict[str, float]) -> None:
        self.last_metrics = {"noise_std": noise_std, "mean_clip_factor": factors}


def test_checks_catch_a_plant_that_did_not_take():
    low = planted_setup("low-noise", ["a"], max_grad_norm=1.0)
    check_planted(Finished(0.4, {"a": 0.2}), low, noise_multiplier=4.0)  # 0.1 * 4 * S with S = 1
    with pytest.raises(PlantError, match="noise std"):
        check_planted(Finished(4.0, {"a": 0.2}), low, noise_multiplier=4.0)
    with pytest.raises(PlantError, match="clip factors"):
        check_planted(Finished(4.0, {"a": 0.2}), planted_setup("no-clipping", ["a"]), noise_multiplier=4.0)
    check_planted(object(), planted_setup("no-clipping", ["a"]), noise_multiplier=4.0)  # no metrics: nothing to check
