"""Every user mistake on the `groupclip` command line is one error line on stderr and exit status 2, never a
traceback; and a recipe states its privacy budget once (epsilon as a target, or a fixed noise multiplier).

The CLI runs in-process through `groupclip.cli.main` (argparse exits with SystemExit); one case runs the installed
entry point in a subprocess. No training runs: errors are caught before any data is loaded, and the successful
cases use `--show` (the resolved recipe as TOML, with the budget it implies for the default recipe's 4000
examples).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from groupclip.accounting import calibrate_noise_multiplier, compute_epsilon
from groupclip.cli import main
from groupclip.sampling import expected_steps
from groupclip.training.recipe import RecipeError, apply_overrides, load_recipe, recipe_to_toml

DEFAULT_N = 4000  # the default recipe's MNIST 5k training split
DEFAULT_RATE = 256 / DEFAULT_N  # its expected batch of 256
DEFAULT_STEPS = expected_steps(DEFAULT_RATE, 8.0)  # its 8 epochs


@functools.cache
def _calibrated(target_epsilon: float) -> float:
    """The reference: dp-accounting's calibration for the default recipe's run."""
    return calibrate_noise_multiplier(target_epsilon, 1e-5, DEFAULT_RATE, DEFAULT_STEPS)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(argv: list[str], capsys, *names: str) -> str:
    code, out, err = _run(argv, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"groupclip {argv[0]}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------- groupclip train
# `--show` ends each command: were the mistake not caught, the recipe would be printed (exit 0), never trained.
@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--epsilon", "-1"], ["--epsilon", "-1", "> 0"]),
        (["--epsilon", "0"], ["--epsilon", "got 0", "> 0"]),
        (["--epsilon", "nan"], ["--epsilon", "nan"]),
        (["--epsilon", "three"], ["--epsilon", "'three'", "not a number"]),
        (["--delta", "2"], ["--delta", "got 2", "in (0, 1)"]),
        (["--delta", "0"], ["--delta", "got 0", "in (0, 1)"]),
        (["--noise-multiplier", "-0.5"], ["--noise-multiplier", "-0.5", ">= 0"]),
        (["--batch-size", "0"], ["--batch-size", "got 0", ">= 1"]),
        (["--batch-size", "2.5"], ["--batch-size", "'2.5'", "whole number"]),
        (["--physical-batch-size", "-4"], ["--physical-batch-size", "-4"]),
        (["--epochs", "0"], ["--epochs", "got 0"]),
        (["--clip-fn", "abadii"], ["--clip-fn", "'abadii'", "abadi, automatic"]),
        (["--set", "clipping.adaptive_rescale=nope"], ["clipping.adaptive_rescale", "'total'", "'none'"]),
        (["--norm-mode", "fast"], ["--norm-mode", "'fast'", "auto, ghost, instantiate"]),
        (["--optimizer", "lamb"], ["--optimizer", "'lamb'", "sgd, adam, adamw"]),
        (["--grouping", "0"], ["--grouping", "'0'", "layer-wise"]),
        (["--grouping", "layerwise"], ["--grouping", "'layerwise'", "layer-wise"]),
        (["--checkpoint-every", "-2"], ["--checkpoint-every", "-2", ">= -1"]),
        (["--collective-timeout", "0"], ["--collective-timeout", "got 0"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ],
)
def test_bad_train_flag_is_one_line_naming_the_flag(flags, names, capsys):
    _one_line_error(["train", *flags, "--show"], capsys, *names)


def test_bad_max_grad_norm_speaks_of_the_total_threshold_given(capsys):
    line = _one_line_error(["train", "--grouping", "6", "--max-grad-norm", "-1", "--show"], capsys)
    assert "--max-grad-norm: got -1 for the total clipping threshold R" in line
    assert "0.408" not in line  # not the per-group threshold -1 / sqrt(6)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("privacy.epsilon=-1", ["privacy.epsilon = -1.0", "> 0"]),
        ("privacy.delta=1.5", ["privacy.delta = 1.5", "in (0, 1)"]),
        ("privacy.accountant=prv", ["privacy.accountant = 'prv'", "'rdp' or 'pld'"]),
        ("schedule.batch_size=0", ["schedule.batch_size = 0", ">= 1"]),
        ("clipping.clip_fn=abadii", ["clipping.clip_fn = 'abadii'", "'abadi' or 'automatic'"]),
        ("clipping.max_grad_norm=0", ["clipping.max_grad_norm = 0.0", "> 0"]),
        ("clipping.target_quantile=2", ["clipping.target_quantile = 2.0", "in (0, 1)"]),
        ("optimizer.betas=[0.9, 1.5]", ["optimizer.betas = [0.9, 1.5]", "[0, 1)"]),
        ("schedule.epochs=abc", ["schedule.epochs = 'abc'", "should be of type float"]),
        ("privacy.epsilon=[3]", ["privacy.epsilon = [3]", "should be of type float | None"]),
        ("clipping.grouping_typo=1", ["'clipping.grouping_typo'", "has no field 'grouping_typo'"]),
        ("nosection.x=1", ["'nosection.x'", "expected section.field"]),
        ("novalue", ["'novalue'", "expected section.field=value"]),
        ("privacy.private=none", ["privacy.private = 'none'", "should be of type bool"]),  # unsets optional fields only
    ],
)
def test_bad_set_is_one_line_naming_the_field(override, names, capsys):
    _one_line_error(["train", "--set", override, "--show"], capsys, *names)


@pytest.mark.parametrize(
    "flags",
    [
        ["--epsilon", "3", "--noise-multiplier", "1"],
        ["--set", "privacy.epsilon=3", "--noise-multiplier", "1"],
        ["--epsilon", "3", "--set", "privacy.noise_multiplier=1"],
        ["--set", "privacy.epsilon=3", "--set", "privacy.noise_multiplier=1"],
    ],
)
def test_epsilon_and_noise_multiplier_together_on_the_command_line_is_an_error(flags, capsys):
    line = _one_line_error(["train", *flags, "--show"], capsys, "both state the privacy budget; give one")
    given = [flags[i] + " " + flags[i + 1] for i in range(0, len(flags), 2)]
    assert all(text in line for text in given), line


def test_a_recipe_file_stating_both_is_an_error(tmp_path, capsys):
    text = recipe_to_toml(load_recipe("default")).replace("[privacy]\n", "[privacy]\nepsilon = 3.0\n")
    path = tmp_path / "both.toml"
    path.write_text(text)
    _one_line_error(["train", "--recipe", str(path), "--show"], capsys, str(path), "epsilon = 3.0", "noise_multiplier")


# ------------------------------------------------------------------ the budget: exactly one of epsilon, noise
def _shown(argv: list[str], capsys, tmp_path) -> tuple[str, object]:
    """``groupclip train ARGV --show``: the printed TOML and the recipe it reads back as."""
    code, out, err = _run(["train", *argv, "--show"], capsys)
    assert code == 0, err
    path = tmp_path / "shown.toml"
    path.write_text(out)
    return out, load_recipe(str(path))


def _line(toml: str, key: str) -> str:
    found = [line for line in toml.splitlines() if line.startswith(f"{key} = ")]
    assert len(found) == 1, toml
    return found[0]


@pytest.mark.parametrize("flags", [["--epsilon", "3"], ["--set", "privacy.epsilon=3"]])
def test_a_target_epsilon_on_the_command_line_replaces_the_recipes_noise_multiplier(flags, capsys, tmp_path):
    """The default recipe fixes noise_multiplier = 1; a target epsilon given on the command line unsets it (it
    used to run at noise multiplier 1, epsilon about 5.6, whatever the target)."""
    toml, recipe = _shown(flags, capsys, tmp_path)
    assert recipe.privacy.epsilon == 3.0 and recipe.privacy.noise_multiplier is None
    assert "noise_multiplier" not in toml
    sigma = _calibrated(3.0)
    assert _line(toml, "epsilon") == (
        f"epsilon = 3.0  # target: noise multiplier calibrated to {sigma:.4g} over {DEFAULT_STEPS} steps "
        f"(sample rate {DEFAULT_RATE:.4g}, N = {DEFAULT_N})"
    )


def test_show_says_the_default_recipes_fixed_noise_multiplier_and_its_epsilon(capsys, tmp_path):
    toml, recipe = _shown([], capsys, tmp_path)
    assert recipe.privacy.noise_multiplier == 1.0 and recipe.privacy.epsilon is None
    eps = compute_epsilon(1.0, DEFAULT_RATE, DEFAULT_STEPS, 1e-5)
    assert 5 < eps < 6  # the epsilon a target of 3 used to silently become
    assert _line(toml, "noise_multiplier") == (
        f"noise_multiplier = 1.0  # fixed: epsilon {eps:.4g} at delta 1e-05 after {DEFAULT_STEPS} steps "
        f"(sample rate {DEFAULT_RATE:.4g}, N = {DEFAULT_N}), computed (RDP)"
    )
    assert not any(line.startswith("epsilon = ") for line in toml.splitlines())


def test_a_noise_multiplier_on_the_command_line_replaces_the_recipes_target(capsys, tmp_path):
    text = recipe_to_toml(load_recipe("default")).replace("noise_multiplier = 1.0\n", "epsilon = 2.0\n")
    path = tmp_path / "target.toml"
    path.write_text(text)
    assert load_recipe(str(path)).privacy.epsilon == 2.0
    toml, recipe = _shown(["--recipe", str(path), "--noise-multiplier", "2"], capsys, tmp_path)
    assert recipe.privacy.noise_multiplier == 2.0 and recipe.privacy.epsilon is None
    assert _line(toml, "noise_multiplier").startswith("noise_multiplier = 2.0  # fixed: epsilon ")


def test_set_none_unsets_the_noise_multiplier(capsys, tmp_path):
    """Unsetting the default recipe's fixed noise multiplier leaves neither: the default target epsilon, shown."""
    toml, recipe = _shown(["--set", "privacy.noise_multiplier=none"], capsys, tmp_path)
    assert recipe.privacy.noise_multiplier is None and recipe.privacy.epsilon == 3.0
    assert _line(toml, "epsilon").startswith(
        f"epsilon = 3.0  # target: noise multiplier calibrated to {_calibrated(3.0):.4g} "
    )
    for word in ("null", "None"):  # the same, in the library (no calibration)
        recipe = apply_overrides(load_recipe("default"), [f"privacy.noise_multiplier={word}", "privacy.epsilon=5"])
        assert recipe.privacy.noise_multiplier is None and recipe.privacy.epsilon == 5.0


def test_overrides_state_the_budget_once():
    """The library rule behind the CLI's: setting one of the two unsets the other; both is an error."""
    default = load_recipe("default")
    assert (default.privacy.epsilon, default.privacy.noise_multiplier) == (None, 1.0)
    target = apply_overrides(default, ["privacy.epsilon=4"])
    assert (target.privacy.epsilon, target.privacy.noise_multiplier) == (4.0, None)
    fixed = apply_overrides(target, {"privacy.noise_multiplier": 2})
    assert (fixed.privacy.epsilon, fixed.privacy.noise_multiplier) == (None, 2.0)
    with pytest.raises(RecipeError, match="set one of them, not both"):
        apply_overrides(default, {"privacy.epsilon": 4.0, "privacy.noise_multiplier": 2.0})
    assert apply_overrides(default, {"privacy.epsilon": 4.0, "privacy.noise_multiplier": None}) == target


def test_no_shipped_recipe_states_both():
    from groupclip.training.recipe import bundled_recipes

    for name in bundled_recipes():
        privacy = load_recipe(name).privacy
        assert (privacy.epsilon is None) != (privacy.noise_multiplier is None), name


# ------------------------------------------------------------------------------- groupclip epsilon / calibrate
EPSILON = ["epsilon", "--sigma", "1", "-q", "0.01", "--steps", "100", "--delta", "1e-5"]
CALIBRATE = ["calibrate", "--target-epsilon", "3", "-q", "0.01", "--steps", "100", "--delta", "1e-5"]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [
        ("--steps", "0", ["argument --steps: got 0", ">= 1"]),
        ("--steps", "-5", ["argument --steps: got -5"]),
        ("--steps", "1.5", ["argument --steps: '1.5' is not a whole number"]),
        ("--target-epsilon", "0", ["argument --target-epsilon: got 0", "> 0"]),
        ("--target-epsilon", "-1", ["argument --target-epsilon: got -1"]),
        ("--target-epsilon", "inf", ["argument --target-epsilon: got inf"]),
        ("--delta", "1", ["argument --delta: got 1", "in (0, 1)"]),
        ("--delta", "0", ["argument --delta: got 0"]),
        ("-q", "0", ["argument --sample-rate/-q: got 0", "in (0, 1]"]),
        ("-q", "1.5", ["argument --sample-rate/-q: got 1.5"]),
    ],
)
def test_bad_calibrate_value_is_one_line(flag, value, names, capsys):
    _one_line_error(_with(CALIBRATE, flag, value), capsys, *names)


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [
        ("--sigma", "-1", ["argument --noise-multiplier/--sigma: got -1", ">= 0"]),
        ("--sigma", "x", ["argument --noise-multiplier/--sigma: 'x' is not a number"]),
        ("--steps", "-1", ["argument --steps: got -1", ">= 0"]),
        ("--delta", "2", ["argument --delta: got 2"]),
        ("-q", "0", ["argument --sample-rate/-q: got 0"]),
    ],
)
def test_bad_epsilon_value_is_one_line(flag, value, names, capsys):
    _one_line_error(_with(EPSILON, flag, value), capsys, *names)


def test_valid_epsilon_values_still_answer(capsys):
    code, out, _ = _run(EPSILON, capsys)
    assert code == 0 and f"epsilon = {compute_epsilon(1.0, 0.01, 100, 1e-5):.6g}" in out
    code, out, _ = _run(_with(EPSILON, "--steps", "0"), capsys)  # no step spends nothing: epsilon 0, not an error
    assert code == 0 and out.startswith("epsilon = 0 at delta = 1e-05")


def test_unreachable_calibration_is_one_line(capsys):
    _one_line_error(_with(CALIBRATE, "--target-epsilon", "1e-6"), capsys, "target_epsilon=1e-06 is unreachable")


def test_missing_command_and_required_flag_are_one_line(capsys):
    code, _, err = _run([], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("groupclip: error: ")
    _one_line_error(["calibrate", "-q", "0.01", "--steps", "10", "--delta", "1e-5"], capsys, "--target-epsilon")


# --------------------------------------------------------------------------------------- the real entry point
def test_installed_entry_point_prints_one_line_and_exits_2():
    script = Path(sys.executable).with_name("groupclip")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "groupclip.cli"]
    done = subprocess.run([*command, "train", "--epsilon", "-1", "--show"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["groupclip train: error: argument --epsilon: got -1; expected a number > 0."], (
        done.stderr
    )
