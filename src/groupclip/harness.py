"""``groupclip bench``: the benchmark harness lives in the source repository, not in the installed package.

The harness (``benchmarks/harness/``: presets, the suite, its worker processes, Opacus' modes, reports) is found in
the repository the imported groupclip comes from (an editable install, ``pip install -e .``) or in the current
directory (a checkout's root). Without it, ``groupclip bench`` says so in one line and exits with code 2;
``groupclip plan`` works on any ``module:function`` model without it and uses it for the named presets and
``--verify``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .planning import commands as planning_commands
from .planning.commands import run_plan

__all__ = ["add_parser", "add_parsers", "harness_root", "import_harness", "run_bench", "run_plan"]

WHERE = (
    "groupclip's source repository (benchmarks/harness/), not with the installed package: run this from a "
    "checkout's root (git clone, then pip install -e .)"
)
MISSING = f"the benchmark harness ships with {WHERE}, or there: python -m benchmarks.harness"


def harness_root() -> Path | None:
    """The repository root holding ``benchmarks/harness/``: the imported groupclip's own, else the current
    directory; None when neither has it."""
    package_repo = Path(__file__).resolve().parents[2]  # src/groupclip/harness.py -> the repository
    for root in (package_repo, Path.cwd()):
        if (root / "benchmarks" / "harness" / "__init__.py").is_file():
            return root
    return None


def import_harness(module: str = "commands") -> ModuleType | None:
    """``benchmarks.harness.<module>`` of the checkout :func:`harness_root` finds, or None without one."""
    name = f"benchmarks.harness.{module}"
    if name in sys.modules:
        return sys.modules[name]
    root = harness_root()
    if root is None:
        return None
    if "benchmarks" not in sys.modules and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def add_parsers(sub) -> None:
    """``bench`` and ``plan`` among the ``groupclip`` subcommands (``plan``: :mod:`groupclip.planning.commands`)."""
    add_parser(sub)
    planning_commands.add_parser(sub)


def add_parser(sub) -> None:
    """``bench`` among the ``groupclip`` subcommands: the harness's arguments, or, without a harness, a stand-in
    that takes any arguments and says where the harness is."""
    harness = import_harness()
    if harness is not None:
        harness.add_parser(sub)
        return
    bench = sub.add_parser(
        "bench",
        help="benchmark suite (needs groupclip's source repository: benchmarks/harness/)",
        add_help=False,
        prefix_chars="\0",  # take every argument as it is: the error below is all this prints
    )
    bench.add_argument("harness_args", nargs="*")


def run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    harness = import_harness()
    if harness is None:
        print(f"groupclip bench: error: {MISSING}", file=sys.stderr)
        return 2
    return harness.run_bench(args, argv)
