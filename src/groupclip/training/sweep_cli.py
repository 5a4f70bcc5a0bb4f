"""The ``groupclip sweep`` subcommand: :func:`add_parser` builds it, :func:`run` executes it (see :mod:`.sweep`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .recipe import RecipeError
from .sweep import (
    add_shared_overrides,
    load_sweep,
    render_table,
    run_sweep,
    summarise,
    sweep_from_flags,
    write_table,
)


def add_parser(sub, positive_int: Callable[[str], int]) -> None:
    """Add ``groupclip sweep`` to the CLI's subparsers."""
    parser = sub.add_parser(
        "sweep",
        help="run a grid of a recipe with overrides (resumable) and tabulate the results",
        description="Run every point of a sweep file (or of --recipe with --axis flags); finished points are skipped.",
    )
    parser.add_argument("spec", nargs="?", help="sweep file (.toml); or give --recipe and --axis")
    parser.add_argument("--recipe", help="recipe for a sweep given by flags")
    parser.add_argument("--axis", action="append", default=[], metavar="SECTION.FIELD=V1,V2", help="a grid axis")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="shared override (with a sweep file: after the file's own)",
    )
    parser.add_argument("--repeat", help="axis averaged over in the table (e.g. seed)")
    parser.add_argument("--name", default="sweep", help="sweep name (flags form)")
    parser.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (each its own process)")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2", help="run a subset")
    parser.add_argument("--table", action="store_true", help="only rebuild the results table from finished runs")


def run(args: argparse.Namespace) -> int:
    """Run (or tabulate) the sweep the parsed arguments describe; returns the exit status."""
    if args.spec:
        given = [
            flag
            for flag, value in (("--recipe", args.recipe), ("--axis", args.axis), ("--repeat", args.repeat))
            if value
        ]
        if given or args.name != "sweep":
            flags = ", ".join(given + (["--name"] if args.name != "sweep" else []))
            raise RecipeError(f"{flags}: only for a sweep given by flags; the sweep file {args.spec!r} sets these.")
        spec = load_sweep(args.spec)
        add_shared_overrides(spec, args.set)
    elif args.recipe:
        spec = sweep_from_flags(args.name, args.recipe, args.axis, args.set, args.repeat)
    else:
        raise RecipeError("Give a sweep file, or --recipe with --axis section.field=v1,v2.")
    if args.out:
        spec.out = args.out
    only = {}
    for text in args.only:
        axis, _, values = text.partition("=")
        only[axis] = values.split(",")
    if args.table:
        rows = summarise(spec)
        write_table(spec, rows)
    else:
        rows = run_sweep(spec, jobs=args.jobs, only=only)
    print(render_table(spec, rows))
    return 0
