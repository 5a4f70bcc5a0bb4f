"""The training runner: a one-epoch smoke run of every recipe on a tiny subset, run folders, schedules, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from groupclip.accounting import compute_epsilon
from groupclip.training import apply_overrides, load_recipe, train
from groupclip.training.recipe import RecipeError, ScheduleConfig
from groupclip.training.runner import execution_order, lr_factor, resolve_device
from groupclip.training.tasks import build_task, to_device

# Each recipe shrunk to a tiny subset and one epoch (a few steps): the recipe's own code path end to end.
TINY = {
    "default": {"data.limit": 256, "data.test_limit": 200, "schedule.batch_size": 64},
    "fashion-mnist-cnn": {"data.limit": 512, "data.test_limit": 200, "schedule.batch_size": 128},
    "rotten-tomatoes-minilm": {
        "data.limit": 48,
        "data.test_limit": 32,
        "schedule.batch_size": 16,
        "schedule.physical_batch_size": 16,
        "schedule.warmup_steps": 0,
    },
    "shakespeare-gpt": {
        "data.plays": 1,
        "data.train_chars": 4000,
        "data.val_chars": 2000,
        "data.block_size": 32,
        "model.n_layer": 1,
        "model.n_embd": 32,
        "model.n_head": 2,
        "schedule.batch_size": 16,
        "schedule.physical_batch_size": 16,
        "schedule.warmup_steps": 0,
    },
}


def _tiny(name: str, **extra) -> object:
    recipe = load_recipe(name)
    overrides = {**TINY[name], "schedule.epochs": 1, "schedule.eval_every": 0, "privacy.delta": 1e-4, **extra}
    if recipe.privacy.noise_multiplier is None:
        overrides["privacy.epsilon"] = 8.0
    return apply_overrides(recipe, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_one_epoch_smoke_run_of_each_recipe(name, tmp_path):
    recipe = _tiny(name)
    result = train(recipe, str(tmp_path), progress=False, log=lambda _: None)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.toml", "metrics.jsonl", "final.json"} <= files
    # config.toml is the recipe as run: the device resolved ("auto" -> the one used)
    resolved = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, device=result["device"]))
    assert load_recipe(str(tmp_path / "config.toml")) == resolved
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") != "eval"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert len(steps) == result["steps"] == result["planned_steps"] >= 1
    assert evals and evals[-1]["step"] == result["steps"]
    assert math.isfinite(result[result["headline"]])
    # the epsilon reported is the accountant's for the steps actually taken
    expected = compute_epsilon(result["noise_multiplier"], result["sample_rate"], result["steps"], result["delta"])
    assert result["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert steps[-1]["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert json.loads((tmp_path / "final.json").read_text())["steps"] == result["steps"]


@pytest.mark.slow
def test_default_job_learns_and_reports(tmp_path):
    result = train(load_recipe("default"), str(tmp_path), progress=False)
    assert result["steps"] == 125  # ceil(8 epochs / q), q = 256 / 4000
    assert result["test_accuracy"] > 0.8  # ten classes: chance is 0.1
    assert 5 < result["epsilon"] < 6.5
    assert result["groups"] == 6 and result["peak_rss_mb"] > 0 and result["wall_time_s"] > 0
    assert {"curves.png", "epsilon.png"} <= {p.name for p in tmp_path.iterdir()}


def test_non_private_run_uses_every_example_once_per_epoch(tmp_path):
    recipe = _tiny("default", **{"privacy.private": False, "schedule.batch_size": 100})
    result = train(recipe, None, progress=False)
    assert result["private"] is False and result["epsilon"] is None
    assert result["steps"] == 3  # ceil(256 / 100)
    assert 0 <= result["test_accuracy"] <= 1


def test_adaptive_thresholds_with_execution_order_blocks():
    recipe = _tiny("default", **{"clipping.grouping": 3, "clipping.adaptive": True, "schedule.max_steps": 3})
    result = train(recipe, None, progress=False)
    assert result["groups"] == 3 and result["adaptive"] is True
    assert set(result["final_thresholds"]) == {"block0", "block1", "block2"}
    assert result["gradient_noise_multiplier"] > result["noise_multiplier"]  # part of the budget went to the counts


def test_max_steps_stops_early_but_plans_privacy_for_the_whole_run():
    result = train(_tiny("default", **{"schedule.max_steps": 2}), None, progress=False)
    assert result["steps"] == 2 and result["planned_steps"] == 4


def test_execution_order_follows_the_forward_pass():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(2, 2)
            self.second = nn.Linear(2, 2)

        def forward(self, x):
            return self.first(self.second(x))

    model = Reversed()
    assert execution_order(model, lambda: model(torch.zeros(1, 2))) == [
        "second.weight",
        "second.bias",
        "first.weight",
        "first.bias",
    ]


def test_lr_schedules():
    cosine = lr_factor(ScheduleConfig(lr_schedule="cosine", warmup_steps=2), total_steps=12)
    assert [cosine(0), cosine(1)] == [0.5, 1.0]
    assert cosine(2) == 1.0 and cosine(7) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0)
    linear = lr_factor(ScheduleConfig(lr_schedule="linear"), total_steps=10)
    assert linear(5) == pytest.approx(0.5)
    assert lr_factor(ScheduleConfig(), 10)(7) == 1.0
    with pytest.raises(RecipeError, match="lr_schedule = 'step'"):
        lr_factor(ScheduleConfig(lr_schedule="step"), 10)


def test_bad_task_options_are_named():
    with pytest.raises(RecipeError, match=r"Unknown key\(s\) \['widht'\] in \[model\]"):
        build_task("image-classification", {"name": "mnist5k"}, {"widht": 2}, 0)
    with pytest.raises(RecipeError, match="Unknown task 'audio'"):
        build_task("audio", {}, {}, 0)
    with pytest.raises(RecipeError, match="'cifar10'"):
        build_task("image-classification", {"name": "cifar10"}, {}, 0)
    with pytest.raises(RecipeError, match="'resnet'"):
        build_task("image-classification", {"name": "mnist5k"}, {"name": "resnet"}, 0)
    with pytest.raises(RecipeError, match="optimizer] name = 'lamb'"):
        train(_tiny("default", **{"optimizer.name": "lamb"}), None, progress=False)


def test_device_auto_resolves_and_is_recorded(tmp_path):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    recipe = apply_overrides(load_recipe("default"), ["data.limit=256", "schedule.max_steps=2", "run.device=auto"])
    final = train(recipe, str(tmp_path), progress=False, log=lambda _: None)
    assert final["device"].startswith(expected)
    assert f'device = "{final["device"]}"' in (tmp_path / "config.toml").read_text()


def test_bad_devices_are_recipe_errors():
    with pytest.raises(RecipeError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(RecipeError, match="'cpu' or 'cuda'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA device"):
            resolve_device("cuda")


def test_to_device_moves_nested_batches():
    batch = {"x": (torch.ones(2), [torch.zeros(1)]), "n": 3}
    moved = to_device(batch, "cpu")
    assert torch.equal(moved["x"][0], torch.ones(2)) and isinstance(moved["x"][1], list) and moved["n"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_recipe_runs_on_cuda(tmp_path):
    recipe = apply_overrides(load_recipe("default"), ["data.limit=256", "schedule.max_steps=2", "run.device=cuda"])
    final = train(recipe, str(tmp_path), progress=False, log=lambda _: None)
    assert final["device"].startswith("cuda") and final["peak_gpu_memory_mb"] > 0
