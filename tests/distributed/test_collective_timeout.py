"""A rank of a data-parallel `groupclip train` launch dies (SIGKILL) or hangs (SIGSTOP): the other stops with a
clear one-line error within the configured collective timeout, instead of waiting forever.

Two real `groupclip train` processes joined as torchrun would join them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), on
gloo. torchrun itself is not used: its agent would tear the survivor down before it could report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spawn import free_port

TIMEOUT = 4.0  # --collective-timeout, seconds
MARGIN = 25.0  # process exit, the error path and a loaded 2-core machine
ARGS = [
    "--recipe", "default", "--limit", "512", "--epochs", "200", "--noise-multiplier", "4",
    "--set", "data.test_limit=50", "--checkpoint-every", "-1", "--no-progress", "--device", "cpu",
    "--collective-timeout", str(TIMEOUT),
]  # fmt: skip


def _launch(out: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        command = [sys.executable, "-m", "groupclip.cli", "train", *ARGS, "--out", str(out)]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"step_time_s"') if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_surviving_rank_stops_with_an_error_within_the_timeout(tmp_path, failure):
    rank0, rank1 = _launch(tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while _steps_logged(tmp_path / "run") < 3:  # training is under way on both ranks
            assert rank0.poll() is None and rank1.poll() is None, rank0.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the launch did not start training"
            time.sleep(0.02)
        rank1.send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        began = time.monotonic()
        try:
            _, err = rank0.communicate(timeout=TIMEOUT + MARGIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT + MARGIN:.0f} s after rank 1 was {failure}")
        waited = time.monotonic() - began
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert rank0.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("groupclip train: error: rank 0 stopped: another rank died or did not answer"), err
    assert f"within the {TIMEOUT:g} s collective timeout" in last and "--resume" in last
    assert "Traceback" not in err
    if failure == "hung":  # a stopped peer keeps its sockets open: only the timeout can end the wait
        assert "timed out" in last.lower()
    assert waited < TIMEOUT + MARGIN
    assert not (tmp_path / "run" / "final.json").exists()
