"""`groupclip --help` and every subcommand's help: a description for the command and each subcommand, and a
help text for every option (a new option without one fails here)."""

from __future__ import annotations

import argparse

import pytest

from groupclip import cli

COMMANDS = ("train", "sweep", "epsilon", "calibrate", "plan", "bench", "audit")


class _Captured(Exception):
    pass


@pytest.fixture
def parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser ``groupclip.cli.main`` builds, taken as it starts parsing."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(cli._Parser, "parse_known_args", capture)
    with pytest.raises(_Captured):
        cli.main(["--help"])
    return seen[0]


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """``({name: subparser}, {name: its one-line help})``."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return dict(action.choices), helps


def test_the_top_level_parser_describes_the_command(parser):
    assert parser.description and "The ``groupclip`` command." not in parser.description
    assert "train" in parser.description and "audit" in parser.description


def test_every_subcommand_has_a_description_and_a_help_line(parser):
    subparsers, helps = _subcommands(parser)
    assert set(COMMANDS) <= set(subparsers)
    for name, sub in subparsers.items():
        assert sub.description and sub.description.strip(), f"groupclip {name} has no description"
        assert helps.get(name) and helps[name].strip(), f"groupclip {name} has no help line in groupclip --help"


def test_every_option_has_a_help_text(parser):
    missing = []
    stack = [("groupclip", parser)]
    while stack:
        prog, current = stack.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += [(f"{prog} {name}", sub) for name, sub in action.choices.items()]
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help and action.help.strip()):
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without a help text: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_subcommand_prints_and_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: groupclip {command}")
