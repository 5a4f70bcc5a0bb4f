"""`groupclip train` under torchrun (2 gloo ranks) trains like one process on the same Poisson batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from spawn import free_port

TINY = [
    "--recipe",
    "default",
    "--limit",
    "512",
    "--max-steps",
    "3",
    "--no-progress",
    "--device",
    "cpu",
    "--noise-seed",
    "0",
]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") != "eval"]


def _run(command: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "final.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("private", [True, False])
def test_torchrun_launch_matches_one_process(tmp_path, private):
    flags = TINY if private else [*TINY, "--non-private"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    launched = _run([*torchrun, "-m", "groupclip.cli", "train", *flags], tmp_path / "two")
    single = _run([sys.executable, "-m", "groupclip.cli", "train", *flags], tmp_path / "one")
    assert launched["world_size"] == 2 and single["world_size"] == 1
    assert launched["steps"] == single["steps"] == 3
    assert not (tmp_path / "two").joinpath("rank1").exists()
    steps_two, steps_one = _records(tmp_path / "two"), _records(tmp_path / "one")
    if private:
        # one global Poisson sample split between the ranks, the same noise drawn once: the same run
        assert [r["batch_size"] for r in steps_two] == [r["batch_size"] for r in steps_one]
        assert launched["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
        for a, b in zip(steps_two, steps_one, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert launched["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.01)
    else:
        # DDP with DistributedSampler shuffles differently from one process: same sizes, a finite loss
        assert [r["batch_size"] for r in steps_two] == [r["batch_size"] for r in steps_one]
        assert all(r["loss"] > 0 for r in steps_two)
