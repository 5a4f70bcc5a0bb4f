"""The `groupclip audit` subcommand: options, output files, verdict exit status, one-line usage errors."""

from __future__ import annotations

import argparse
import json

import pytest

from groupclip.audit import cli


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="groupclip")
    cli.add_parser(root.add_subparsers(dest="command"))
    return root


def run(argv: list[str]) -> int:
    return cli.run(parser().parse_args(["audit", *argv]))


def test_every_option_has_help():
    root = argparse.ArgumentParser(prog="groupclip")
    audit = cli.add_parser(root.add_subparsers(dest="command"))
    options = {flag for action in audit._actions for flag in action.option_strings}
    for flag in ("--canaries", "--steps", "--noise-multiplier", "--epsilon", "--grouping", "--max-grad-norm",
                 "--seed", "--alpha", "--delta", "--plant", "--out", "--kind"):  # fmt: skip
        assert flag in options
    assert all(action.help for action in audit._actions)
    assert audit.description


def test_honest_run_prints_the_verdict_and_writes_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status = run(["--canaries", "200", "--steps", "2", "--noise-multiplier", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "claimed epsilon" in out and "one-run lower bound" in out and "not contradicted" in out
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["report"]["contradicted"] is False and data["config"]["canaries"] == 200
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_planted_bug_is_caught_with_status_zero(capsys):
    assert run(["--canaries", "300", "--steps", "2", "--plant", "no-clipping", "--grouping", "all-layer"]) == 0
    assert "CONTRADICTED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--canaries", "1"], ["--alpha", "2"], ["--delta", "0"], ["--max-grad-norm", "-1"], ["--epsilon", "-3"]]
)
def test_bad_values_give_one_line_and_status_two(argv, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("groupclip audit: error:")


@pytest.mark.parametrize(
    "argv", [["--plant", "typo"], ["--noise-multiplier", "1", "--epsilon", "2"], ["--canaries", "many"]]
)
def test_usage_errors_exit_two_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["audit", *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run(["--canaries", "50", "--steps", "1", "--out", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
