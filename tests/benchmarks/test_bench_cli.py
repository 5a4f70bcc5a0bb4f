"""``groupclip bench`` and ``groupclip plan`` end to end, in subprocesses like a user runs them.

Structure only: timings on a shared CI machine are noise, so no timing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("psutil")


REPO = Path(__file__).resolve().parents[2]


def _groupclip(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "groupclip.cli", *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env
    )


def test_smoke_benchmark_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    # run from another directory: the command finds the harness of the checkout groupclip is installed from, and
    # its worker processes import it from there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _groupclip("bench", "--smoke", "--out-dir", str(tmp_path), "--name", "smoke", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows = result["summary"]["models"]["cnn-tiny"]["rows"]
    expected = {"non-private", "all-layer", "layer-wise"}
    opacus = pytest.importorskip("opacus", reason="the Opacus rows need opacus") is not None
    if opacus:
        expected |= {"opacus-hooks", "opacus-per-layer", "opacus-ghost"}
    assert set(rows) == expected
    for label in ("all-layer", "layer-wise"):
        row = rows[label]
        assert "error" not in row, row
        assert row["median_step_s"] > 0 and row["time_ratio"] > 0 and row["peak_bytes"] > 0
        assert row["predicted_kept_bytes"] > 0 and abs(row["kept_error"]) < 0.2
    assert rows["non-private"]["time_ratio"] == pytest.approx(1.0)
    max_batch = result["summary"]["models"]["cnn-tiny"]["max_batch"]
    assert set(max_batch) == {"non-private", "all-layer", "layer-wise"}
    assert result["command"].startswith("groupclip bench --smoke")
    assert result["machine"]["usable_cores"] >= 1
    markdown = (tmp_path / "smoke.md").read_text()
    assert "| configuration |" in markdown and "| layer-wise |" in markdown and "Largest batch" in markdown
    for plot in result["plots"].values():
        assert (tmp_path / plot).stat().st_size > 1000
    assert "[  1/" in proc.stderr  # the progress display


def test_overhead_suite_counts_ops_and_splits_time_by_phase(tmp_path: Path) -> None:
    proc = _groupclip("bench", "--suite", "overhead", "--rounds", "1", "--steps", "1", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "cpu_overhead.json").read_text())
    assert set(result) == {"clip", "dp"}
    for variant in result.values():
        assert set(variant) == {"non-private", "all-layer", "4 groups", "layer-wise", "param-wise"}
        base = variant["non-private"]
        assert base["ops_ratio"] == 1.0 and base["syncs"] == 0
        for style, row in variant.items():
            # the engine adds per-sample work to every style: more ops than the plain step, never fewer
            assert style == "non-private" or row["ops"] > base["ops"]
            assert set(row["phase_median_ms"]) == {"forward", "backward", "optimizer"}
            assert 0 < sum(row["phase_median_ms"].values()) <= row["median_ms"] * 1.01
    markdown = (tmp_path / "cpu_overhead.md").read_text()
    assert "forward / backward / optimizer ms" in markdown and "| param-wise |" in markdown


def test_overhead_suite_refuses_options_it_does_not_take(tmp_path: Path) -> None:
    proc = _groupclip("bench", "--suite", "overhead", "--models", "gpt2-small", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--models" in proc.stderr and "--rounds" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _groupclip("bench", "--suite", "overhead", "--rounds", "0", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "--rounds" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bench_refuses_an_unknown_model(tmp_path: Path) -> None:
    proc = _groupclip("bench", "--models", "gpt5", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "gpt2-small" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_plan_writes_a_grouping_the_engine_accepts(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    proc = _groupclip("plan", "--model", "cnn-tiny", "--budget", "64GiB", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "proposed: all-layer" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["groups"] == 1 and plan["model"] == "cnn-tiny"

    from benchmarks.harness.presets import build_workload
    from groupclip import ClippingEngine

    work = build_workload("cnn-tiny")
    with ClippingEngine(work.model, grouping=plan["grouping"], max_grad_norm=1.0):
        work.loss().backward()


def test_plan_says_when_nothing_fits() -> None:
    proc = _groupclip("plan", "--model", "cnn-tiny", "--budget", "1MB")
    assert proc.returncode == 1
    assert "No grouping fits the budget" in proc.stdout


def test_plan_refuses_a_bad_budget() -> None:
    proc = _groupclip("plan", "--model", "cnn-tiny", "--budget", "plenty")
    assert proc.returncode == 2
    assert "memory size" in proc.stderr


def test_planned_grouping_is_measured_near_its_prediction(tmp_path: Path) -> None:
    """minilm at batch 8: a budget halfway between the predicted non-private and all-layer peaks, so the plan
    must split the model; ``--verify`` runs the proposed grouping in a fresh process and measures its peak RSS.

    The window between the two predictions is only +-42 MB here, about the run-to-run spread of a process' peak RSS
    on this machine, and the cost model under-predicts peak RSS by 1-4% at this shape (11% at batch 24): whether
    the measurement lands under the budget is not deterministic, so the test checks the prediction's accuracy
    (within 6%) instead of the verdict, and that the verdict is printed with the measured number.
    """
    pytest.importorskip("transformers")
    shape = ["--model", "minilm", "--batch-size", "8", "--seq-len", "128"]
    probe = _groupclip("plan", *shape, "--budget", "1TiB", "--out", str(tmp_path / "probe.json"))
    assert probe.returncode == 0, probe.stderr[-3000:]
    predicted = json.loads((tmp_path / "probe.json").read_text())
    assert predicted["groups"] == 1
    budget = (predicted["predicted_peak_bytes"] + predicted["non_private_peak_bytes"]) // 2
    # --margin 0: the default 3% headroom (~42 MB here) would use up the whole window, and a second process that
    # measures its own overhead a few MB higher than the probe's would then find no grouping that fits
    verify = ["--budget", str(budget), "--margin", "0", "--verify", "--out", str(tmp_path / "plan.json")]
    proc = _groupclip("plan", *shape, *verify)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: measured over the budget
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["groups"] is not None and plan["groups"] > 1, proc.stdout[-2000:]
    match = re.search(r"verify: measured peak ([\d,]+) MB .*: (fits|DOES NOT FIT)", proc.stdout)
    assert match, proc.stdout[-3000:]
    assert (match.group(2) == "fits") == (proc.returncode == 0)
    measured = int(match.group(1).replace(",", "")) * 2**20
    assert abs(measured - plan["predicted_peak_bytes"]) <= 0.06 * plan["predicted_peak_bytes"], proc.stdout[-2000:]


def test_bench_refuses_a_grouping_file_that_is_not_a_plan(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text('{"something": 1}')
    proc = _groupclip("bench", "--smoke", "--grouping-file", str(bad), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "--grouping-file" in proc.stderr and "groupclip plan --out" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_without_the_source_checkout_says_where_the_harness_is(tmp_path: Path) -> None:
    """An installed groupclip (here: a copy of the package outside any checkout) has no harness: one line, exit 2."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "src" / "groupclip", site / "groupclip", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = _groupclip("bench", "--smoke", "--out-dir", str(tmp_path / "out"), cwd=tmp_path, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "source repository" in lines[0] and "python -m benchmarks.harness" in lines[0], lines
    assert not (tmp_path / "out").exists()
    plan = _groupclip("plan", "--model", "cnn-tiny", "--budget", "1GiB", cwd=tmp_path, env=env)
    assert plan.returncode == 2 and "module:function" in plan.stderr and "source repository" in plan.stderr


def test_python_m_benchmarks_harness_is_the_bench_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--models", "gpt5", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "gpt2-small" in proc.stderr
    assert not list(tmp_path.iterdir())
