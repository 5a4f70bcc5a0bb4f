"""`groupclip audit --recipe`: a training recipe audited end to end with black-box (mislabeled input) canaries."""

from __future__ import annotations

import argparse
import json

import pytest

from groupclip.accounting import compute_epsilon
from groupclip.audit import cli

LIMIT, CANARIES, STEPS, BATCH = 300, 100, 4, 64
TINY = ["--recipe", "default", "--set", f"data.limit={LIMIT}", "--set", "data.test_limit=20"]
TINY += ["--set", f"schedule.batch_size={BATCH}", "--canaries", str(CANARIES), "--steps", str(STEPS)]


def run(argv: list[str]) -> int:
    root = argparse.ArgumentParser(prog="groupclip")
    cli.add_parser(root.add_subparsers(dest="command"))
    return cli.run(root.parse_args(["audit", *argv]))


def test_recipe_audit_prints_the_claim_and_the_bound_and_plots_the_scores(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run([*TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recipe default (black-box" in out and f"{STEPS} steps" in out and "noise secret (OS entropy)" in out
    assert "claimed epsilon" in out and "one-run lower bound" in out and "not contradicted" in out
    data = json.loads((tmp_path / "audit.json").read_text())
    report, privacy = data["report"], data["privacy"]
    assert data["recipe"] == "default" and data["canaries"] == CANARIES and data["steps"] == STEPS
    # The included canaries joined the recipe's ordinary examples: the Poisson rate is B / (ordinary + included).
    assert privacy["sample_rate"] == pytest.approx(BATCH / (LIMIT - CANARIES + report["included"]), rel=1e-12)
    # The claim is the recipe's own accounting: its noise multiplier (1) over the steps taken, at its delta.
    claimed = compute_epsilon(1.0, privacy["sample_rate"], STEPS, 1e-5)
    assert report["claimed_epsilon"] == pytest.approx(claimed, rel=1e-12) == privacy["epsilon"]
    assert 0 <= report["lower_bound"] <= report["claimed_epsilon"] and report["contradicted"] is False
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*TINY, "--grouping", "all-layer"], "--grouping does not apply with --recipe"),
        ([*TINY, "--noise-multiplier", "2"], "set privacy.noise_multiplier with --set"),
        ([*TINY, "--kind", "white-box"], "--recipe audits are black-box"),
        (["--set", "privacy.epsilon=2"], "give --recipe too"),
        (["--recipe", "nope"], "not a bundled recipe"),
        ([*TINY, "--set", "privacy.private=false"], "trains without DP"),
        (["--recipe", "default", "--set", "data.limit=50"], "leave none besides 1000 canaries"),
    ],
)
def test_recipe_mistakes_are_one_line_with_status_two(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("groupclip audit: error:") and message in err
