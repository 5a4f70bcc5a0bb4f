"""`groupclip train` and `groupclip sweep` as a user calls them: shortcuts, --set, --show, errors (exit code 2)."""

from __future__ import annotations

import json

import pytest

from groupclip.cli import main
from groupclip.training.recipe import load_recipe


def test_list_names_every_bundled_recipe(capsys):
    assert main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist-cnn" in out and "default" in out


def test_show_applies_shortcuts_and_set(capsys, tmp_path):
    argv = ["train", "--recipe", "fashion-mnist-cnn", "--grouping", "4", "--epsilon", "8", "--adaptive"]
    assert main([*argv, "--set", "model.width=2", "--show"]) == 0
    path = tmp_path / "shown.toml"
    path.write_text(capsys.readouterr().out)
    recipe = load_recipe(str(path))
    assert recipe.clipping.grouping == 4 and recipe.clipping.adaptive is True
    assert recipe.privacy.epsilon == 8.0 and recipe.model["width"] == 2


def test_epsilon_flag_replaces_a_fixed_noise_multiplier(capsys, tmp_path):
    assert main(["train", "--epsilon", "2", "--show"]) == 0  # the default recipe fixes noise_multiplier = 1
    path = tmp_path / "shown.toml"
    path.write_text(capsys.readouterr().out)
    assert load_recipe(str(path)).privacy.noise_multiplier is None


def test_short_run_prints_the_summary_and_writes_json(capsys, tmp_path):
    out_json = tmp_path / "final.json"
    argv = [
        "train",
        "--limit",
        "128",
        "--batch-size",
        "64",
        "--max-steps",
        "2",
        "--set",
        "data.test_limit=50",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path / "run"), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for label in ("test_accuracy", "epsilon", "wall time", "peak memory", "run folder"):
        assert label in out
    assert json.loads(out_json.read_text())["steps"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--recipe", "nope"], "not a bundled recipe"),
        (["train", "--set", "clipping.grouping_typo=1"], "has no field 'grouping_typo'"),
        (["train", "--set", "novalue"], "expected section.field=value"),
        (["train", "--limit", "100", "--no-progress"], "schedule.batch_size = 256 exceeds the training set (100"),
        (["train", "--epsilon", "0.001", "--no-progress", "--out", "none"], "epsilon"),
        (["sweep"], "Give a sweep file"),
        (["sweep", "--recipe", "default", "--axis", "run.seed"], "expected section.field=value1,value2"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
