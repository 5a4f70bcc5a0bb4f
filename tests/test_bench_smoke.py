"""The CPU benchmark runs end to end in its --smoke mode (tiny model) and writes complete results.

Only structure and positivity are checked: timings on a shared CI machine are noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("psutil")

pytestmark = [pytest.mark.slow, pytest.mark.hf]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_clipping.py"
STYLES = ["non-private", "all-layer", "groups-4", "layer-wise", "param-wise"]
DP_STYLES = [s for s in STYLES if s != "non-private"]


def test_smoke_benchmark_writes_every_style(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--quiet", "--out-dir", str(tmp_path), "--name", "smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    markdown = (tmp_path / "smoke.md").read_text()

    assert result["config"]["styles"] == STYLES
    assert result["config"]["layers"] == 2 and result["config"]["steps"] == 2
    assert set(result["summary"]) == set(STYLES)
    for style in STYLES:
        s = result["summary"][style]
        assert "error" not in s, s
        assert s["params_without_grad"] == [], (style, s["params_without_grad"])
        for key in ("median_step_s", "peak_rss_bytes", "baseline_rss_bytes", "time_ratio", "peak_rss_ratio"):
            assert s[key] > 0, (style, key, s[key])
        assert s["peak_rss_bytes"] >= s["baseline_rss_bytes"]
        runs = result["runs"][style]
        assert len(runs) == 1 and len(runs[0]["step_times_s"]) == 2
        assert all(t > 0 for t in runs[0]["step_times_s"])
        assert f"| {style} |" in markdown
    for style in DP_STYLES:
        s = result["summary"][style]
        assert s["engine_peak_held_bytes"] > 0, style
        assert s["engine_activation_bytes"] > 0, style
        assert s["n_groups"] >= 1
    assert result["summary"]["all-layer"]["n_groups"] == 1
    assert result["summary"]["groups-4"]["n_groups"] == 4
    assert {t["status"] for t in result["targets"]} <= {"pass", "miss"}
    assert result["machine"]["torch_version"] and result["machine"]["cpu_model"]
