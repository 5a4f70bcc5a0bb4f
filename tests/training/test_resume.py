"""Fault tolerance of `groupclip train`: SIGKILL a real run (at a random step, and in the middle of a checkpoint
write), `--resume` it, and get the uninterrupted run's parameters bit for bit and its epsilon.

The killed runs are the default recipe shrunk to 9 steps (a few seconds each), in subprocesses like a user's (the
uninterrupted reference runs the same command in this process); the secret-noise, data-order, dropout and ledger
checks resume copies of in-process runs' checkpoints.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from groupclip.accounting import compute_epsilon
from groupclip.cli import main
from groupclip.training import apply_overrides, load_recipe, plots, recipe_to_toml, train
from groupclip.training import loop as loop_module
from groupclip.training.checkpoint import PAUSE_ENV, load_checkpoint, remove_stale_temporaries
from groupclip.training.launch import Launch
from groupclip.training.private_loop import PrivateLoop
from groupclip.training.tasks import build_task

TOTAL, EVERY = 9, 3
TRAIN = [sys.executable, "-m", "groupclip.cli", "train"]
TINY = [
    "--limit", "256", "--batch-size", "32", "--set", "data.test_limit=50", "--max-steps", str(TOTAL),
    "--noise-multiplier", "4", "--checkpoint-every", str(EVERY), "--keep-checkpoint",
    "--no-progress", "--device", "cpu", "--threads", "1",
]  # fmt: skip
SEEDED = [*TINY, "--noise-seed", "7"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    while _LAUNCHED:  # a failed test may leave a run going (e.g. one paused in a checkpoint write)
        proc = _LAUNCHED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})}
    )
    _LAUNCHED.append(proc)
    return proc


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}") and '"kind": "eval"' not in line)


def _wait(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _final_parameters(run_dir: Path, steps: int = TOTAL) -> dict[str, torch.Tensor]:
    state = load_checkpoint(str(run_dir))  # --keep-checkpoint: the state after the last step
    assert state["step"] == steps
    loop = state["loop"]
    return loop["private"]["model"] if "private" in loop else loop["model"]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _step_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in records]


def test_killed_at_a_random_step_and_during_a_checkpoint_write_resumes_bit_identically(tmp_path, capsys):
    run = tmp_path / "killed"
    # A checkpoint exists from step EVERY + 1 on; stopping before TOTAL - 1 leaves time to kill before the end.
    kill_at = random.Random().randrange(EVERY + 1, TOTAL - 1)
    note = f"(first kill after step {kill_at})"

    # 1. SIGKILL at a random step.
    first = _start([*SEEDED, "--out", str(run)])
    _wait(first, lambda: _steps_logged(run) >= kill_at, f"step {kill_at} {note}")
    _kill(first)
    resumed_at = load_checkpoint(str(run))["step"]
    assert EVERY <= resumed_at < TOTAL and resumed_at % EVERY == 0, note
    assert not (run / "final.json").exists()
    # A kill between a save's last write and its rename leaves a whole temporary file behind. The resumed run
    # removes it when it starts, but step 2 watches for the temporary file of the resumed run's own save, so clear
    # it now rather than race the new process' start.
    remove_stale_temporaries(str(run))

    # 2. Resume, and SIGKILL it in the middle of writing its first checkpoint: the temporary file is half written.
    pause_at = resumed_at + EVERY
    second = _start(["--resume", str(run)], env={PAUSE_ENV: f"900@{pause_at}"})  # the kill ends the wait
    # Meanwhile (the save waits for the kill, however slow the reference run), the uninterrupted run, in this process.
    assert torch.get_default_dtype() == torch.float32, "a test left the default dtype changed"
    assert main(["train", *SEEDED, "--out", str(tmp_path / "reference")]) == 0
    capsys.readouterr()
    temporaries = lambda: glob.glob(str(run / ".checkpoint-*.tmp"))  # noqa: E731
    _wait(second, lambda: temporaries() and os.path.getsize(temporaries()[0]) > 0, f"the save of step {pause_at}")
    _kill(second)
    (half_written,) = temporaries()
    with pytest.raises(Exception):  # noqa: B017 - a truncated zip: any error of torch.load will do
        torch.load(half_written, weights_only=True)
    assert load_checkpoint(str(run))["step"] == resumed_at, note  # the latest checkpoint is still the whole old one

    # 3. Resume again, to the end.
    out = _finish(_start(["--resume", str(run)]))
    assert "resumed" in out and not temporaries()

    _assert_identical(_final_parameters(run), _final_parameters(tmp_path / "reference"))
    final, expected = (json.loads((d / "final.json").read_text()) for d in (run, tmp_path / "reference"))
    assert final["epsilon"] == expected["epsilon"] and final["steps"] == expected["steps"] == TOTAL
    # the killed resume wrote no checkpoint, so the run's history is one resume, from the first kill's checkpoint
    assert final["resumed_from"] == [resumed_at] and expected["resumed_from"] == []
    assert final["noise"] == "reproducible (seeded)" and final["noise_seed"] == 7
    assert final["extra_ledger_steps"] == 0
    # metrics.jsonl was cut back at each resume: every step and evaluation once, with the same values
    assert _step_records(run) == _step_records(tmp_path / "reference")


def _tiny_recipe(**extra):
    overrides = {
        "data.limit": 128,
        "data.test_limit": 20,
        "schedule.batch_size": 32,
        "schedule.max_steps": 8,
        "privacy.noise_multiplier": 4.0,
        "run.checkpoint_every": 4,
        "run.keep_checkpoint": True,
        "run.device": "cpu",
        **extra,
    }
    return apply_overrides(load_recipe("default"), overrides)


@pytest.fixture(autouse=True)
def _no_plots_in_this_process(monkeypatch):
    """The in-process runs skip curves.png / epsilon.png (about a second each); the subprocess runs draw them."""
    monkeypatch.setattr(plots, "plot_run", lambda run_dir, headline: [])


def _run_keeping_every_checkpoint(recipe, run_dir: Path) -> dict:
    """``train`` in this process, with a copy ``copy-<step>.pt`` of every checkpoint it writes."""
    real_save = loop_module.save_checkpoint

    def save_and_copy(state, folder):
        path = real_save(state, folder)
        shutil.copy(path, os.path.join(folder, f"copy-{state['step']}.pt"))
        return path

    loop_module.save_checkpoint = save_and_copy
    try:
        return train(recipe, str(run_dir), progress=False, log=lambda _: None)
    finally:
        loop_module.save_checkpoint = real_save


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """An uninterrupted 8-step run in this process with secret noise (no noise seed), its checkpoints copied:
    ``(run folder, final metrics, final parameters)``."""
    run_dir = tmp_path_factory.mktemp("secret")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "plot_run", lambda run_dir, headline: [])
        final = _run_keeping_every_checkpoint(_tiny_recipe(), run_dir)
    return run_dir, final, _final_parameters(run_dir, steps=8)


def _as_if_killed_after(run_dir: Path, step: int, into: Path, edit=None) -> Path:
    """A copy of the run folder as a kill would have left it: the checkpoint of ``step`` as the latest, no
    final.json (metrics.jsonl still holds the records of the later steps)."""
    shutil.copytree(run_dir, into)
    state = torch.load(into / f"copy-{step}.pt", weights_only=True)
    if edit is not None:
        edit(state)
    torch.save(state, into / "checkpoint.pt")
    (into / "final.json").unlink()
    return into


def test_secret_noise_resumes_on_the_same_noise_stream(secret_run, tmp_path):
    run_dir, full, parameters = secret_run
    assert full["noise"] == "secret (OS entropy)" and full["noise_seed"] is None
    folder = _as_if_killed_after(run_dir, 4, tmp_path / "resumed")
    resumed = train(_tiny_recipe(), str(folder), progress=False, log=lambda _: None, resume=True)
    # The noise generator state in the checkpoint, not fresh entropy, drives the steps after it.
    _assert_identical(_final_parameters(folder, steps=8), parameters)
    assert resumed["epsilon"] == full["epsilon"] and resumed["resumed_from"] == [4]
    assert resumed["extra_ledger_steps"] == 0


def test_non_private_run_resumes_mid_epoch_and_at_an_epoch_end(tmp_path):
    recipe = _tiny_recipe(**{"privacy.private": False, "run.checkpoint_every": 2})  # 4 batches an epoch
    full = _run_keeping_every_checkpoint(recipe, tmp_path / "full")
    for step in (2, 4):  # in the middle of the first epoch's shuffled order, and at its end
        folder = _as_if_killed_after(tmp_path / "full", step, tmp_path / f"from{step}")
        resumed = train(recipe, str(folder), progress=False, log=lambda _: None, resume=True)
        _assert_identical(_final_parameters(folder, steps=8), _final_parameters(tmp_path / "full", steps=8))
        assert resumed["resumed_from"] == [step] and resumed["test_accuracy"] == full["test_accuracy"]


def test_dropout_resumes_on_the_same_global_rng_stream(tmp_path):
    """A GPT with dropout draws its masks from the global torch RNG: the checkpoint's RNG state continues it."""
    pytest.importorskip("transformers")
    tiny_gpt = {"data.plays": 1, "data.train_chars": 3000, "data.val_chars": 1000, "data.block_size": 16}
    tiny_gpt |= {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "model.dropout": 0.2}
    overrides = {**tiny_gpt, "schedule.batch_size": 16, "schedule.physical_batch_size": 16}
    overrides |= {"schedule.warmup_steps": 0, "schedule.max_steps": 4, "run.checkpoint_every": 2}
    overrides |= {"privacy.noise_multiplier": 4.0, "run.keep_checkpoint": True}
    recipe = apply_overrides(load_recipe("shakespeare-gpt"), overrides)
    _run_keeping_every_checkpoint(recipe, tmp_path / "full")
    folder = _as_if_killed_after(tmp_path / "full", 2, tmp_path / "resumed")
    train(recipe, str(folder), progress=False, log=lambda _: None, resume=True)
    _assert_identical(_final_parameters(folder, steps=4), _final_parameters(tmp_path / "full", steps=4))


def test_secret_noise_is_not_seeded_from_run_seed():
    recipe = _tiny_recipe()
    states = []
    for _ in range(2):
        setup = build_task(recipe.task, recipe.data, recipe.model, recipe.run.seed)
        loop = PrivateLoop(recipe, setup, Launch())
        try:
            states.append(loop.private.noise.generator("cpu").get_state())
        finally:
            loop.close()
    assert not torch.equal(states[0], states[1])  # the same run.seed, different noise generators


def test_noise_that_cannot_be_replayed_charges_the_lost_steps(secret_run, tmp_path):
    """A checkpoint without a noise generator state (OS CSPRNG noise): the steps logged after it, plus one that
    may have been in flight, are charged again when they are taken with fresh noise."""
    run_dir, full, _ = secret_run

    def unreplayable(state):
        state["loop"]["private"]["noise"] = {"secure": True, "base": None, "generators": {}}

    folder = _as_if_killed_after(run_dir, 4, tmp_path / "resumed", edit=unreplayable)
    resumed = train(_tiny_recipe(), str(folder), progress=False, log=lambda _: None, resume=True)
    assert resumed["extra_ledger_steps"] == 4 + 1  # steps 5-8 were logged after the checkpoint of step 4
    expected = compute_epsilon(full["noise_multiplier"], full["sample_rate"], 8 + 5, full["delta"])
    assert resumed["epsilon"] == pytest.approx(expected, rel=1e-12) and resumed["epsilon"] > full["epsilon"]


def test_resume_mistakes_are_one_line_and_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint" in err and len(err.strip().splitlines()) == 1

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(recipe_to_toml(_tiny_recipe()))
    (run / "checkpoint.pt").write_bytes(b"not read before the flags are checked")
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "schedule.epochs = 3.0 conflicts with the run's saved config" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(run), "--recipe", "default"]) == 2
    assert "drop --recipe" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 2  # a damaged checkpoint
    err = capsys.readouterr().err
    assert "cannot be read" in err and len(err.strip().splitlines()) == 1

    (run / "final.json").write_text("{}")
    assert main(["train", "--resume", str(run)]) == 2
    assert "has finished" in capsys.readouterr().err


def test_weight_average_resumes_with_the_run(tmp_path):
    """schedule.ema_decay: the average is checkpointed, and a resumed run ends with the same average and metrics."""
    recipe = _tiny_recipe(**{"privacy.noise_seed": 3, "schedule.ema_decay": 0.8, "run.checkpoint_every": 2})
    full = _run_keeping_every_checkpoint(recipe, tmp_path / "full")
    assert "last_iterate_test_accuracy" in full["final_eval"]
    folder = _as_if_killed_after(tmp_path / "full", 4, tmp_path / "from4")
    resumed = train(recipe, str(folder), progress=False, log=lambda _: None, resume=True)
    assert resumed["final_eval"] == full["final_eval"]
    averages = [load_checkpoint(str(d))["average"] for d in (folder, tmp_path / "full")]
    assert averages[0]["updates"] == averages[1]["updates"] == 8
    for a, b in zip(averages[0]["average"], averages[1]["average"], strict=True):
        assert torch.equal(a, b)
