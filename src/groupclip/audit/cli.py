"""The ``groupclip audit`` subcommand: :func:`add_parser` builds it, :func:`run` executes it.

Wiring into the main CLI::

    sub = parser.add_subparsers(dest="command")
    from groupclip.audit import cli as audit_cli
    audit_cli.add_parser(sub)
    ...
    if args.command == "audit":
        return audit_cli.run(args)

Exit status of :func:`run`: 0 when the verdict is the expected one (an honest run not contradicted, a planted bug
caught), 1 when it is not (or a plant could not be planted), 2 on a usage error (one line, no traceback).

``--recipe NAME_OR_PATH`` audits a training recipe instead of the built-in small model: its model, data, grouping,
clipping and noise, with black-box (mislabeled input) canaries (:mod:`groupclip.audit.recipe`); ``--set`` overrides
recipe fields as in ``groupclip train``, and the flags that the recipe decides (noise, grouping, threshold, delta,
plant, kind) are refused with it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from .. import GroupClipError
from .experiment import KINDS, AuditConfig, AuditConfigError, AuditResult, run_audit
from .plants import PLANTS, PlantError

DEFAULT_NOISE_MULTIPLIER = 4.0
DEFAULT_STEPS = 4
DEFAULT_GROUPING = "layer-wise"
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_DELTA = 1e-5
GROUPINGS = ("all-layer", "layer-wise", "param-wise")
# Flags a recipe decides for itself: refused with --recipe (the recipe's own fields are set with --set).
_RECIPE_DECIDES = {
    "noise_multiplier": ("--noise-multiplier", "privacy.noise_multiplier"),
    "epsilon": ("--epsilon", "privacy.epsilon"),
    "grouping": ("--grouping", "clipping.grouping"),
    "max_grad_norm": ("--max-grad-norm", "clipping.max_grad_norm"),
    "delta": ("--delta", "privacy.delta"),
    "plant": ("--plant", None),
}

_DESCRIPTION = (
    "Train a small model with groupclip and canaries, then compare the accountant's epsilon with empirical lower "
    "bounds (the one-run bound of Steinke, Nasr & Jagielski 2023, a Clopper-Pearson bound and a Gaussian-DP "
    "estimate). A certified lower bound above the claimed epsilon proves a privacy bug; --plant plants one on "
    "purpose to check that the audit catches it."
)
_EPILOG = (
    "Exit status: 0 if the verdict is the expected one (honest run not contradicted, planted bug caught), "
    "1 otherwise, 2 on a usage error."
)


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` sub-parser to ``subparsers`` (from ``parser.add_subparsers()``) and return it."""
    parser = subparsers.add_parser(
        "audit",
        help="audit the DP guarantee empirically with canaries (lower bounds on epsilon)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    parser.error = functools.partial(_one_line_error, parser)  # a usage error is one line, exit status 2
    parser.add_argument(
        "--canaries",
        type=int,
        default=1000,
        help="number of canaries m, each included with probability 1/2 (default: 1000)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps T (default: {DEFAULT_STEPS}; the recipe's with --recipe)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help=f"noise multiplier sigma (default: {DEFAULT_NOISE_MULTIPLIER} unless --epsilon is given)",
    )
    noise.add_argument(
        "--epsilon", type=float, default=None, help="target epsilon at --delta over --steps (calibrates sigma)"
    )
    parser.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default=None,
        help=f"clipping groups (default: {DEFAULT_GROUPING}); every group gets audit coordinates",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"total clipping threshold R (default: {DEFAULT_MAX_GRAD_NORM})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of model, data, canaries, sampler, noise (default: 0); with --recipe: of the canaries' coin "
        "flips and wrong labels (the recipe's run.seed seeds the rest, its noise is secret unless seeded)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="significance level of the certified bounds (default: 0.05)"
    )
    parser.add_argument(
        "--delta", type=float, default=None, help=f"delta of the claim and the bounds (default: {DEFAULT_DELTA:g})"
    )
    parser.add_argument(
        "--plant",
        choices=PLANTS,
        default=None,
        help="plant a bug in the real pipeline: no-clipping, low-noise (noise x0.1) or unclipped-group "
        "(default: none, an honest run)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for audit.json and scores.png (default: write nothing)"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="white-box: Dirac gradient canaries; black-box: input canaries scored by loss decrease "
        "(default: white-box; --recipe audits are black-box)",
    )
    parser.add_argument(
        "--recipe",
        metavar="NAME_OR_PATH",
        default=None,
        help="audit a training recipe (bundled name or .toml): its model, data, grouping and noise, with black-box "
        "mislabeled-input canaries; prints the claimed epsilon and the lower bound, --out gets the score plot",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="with --recipe: override a recipe field, as in groupclip train (repeatable)",
    )
    return parser


def _config(args: argparse.Namespace) -> AuditConfig:
    sigma = args.noise_multiplier
    if sigma is None and args.epsilon is None:
        sigma = DEFAULT_NOISE_MULTIPLIER
    return AuditConfig(
        canaries=args.canaries,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        noise_multiplier=sigma,
        epsilon=args.epsilon,
        grouping=DEFAULT_GROUPING if args.grouping is None else args.grouping,
        max_grad_norm=DEFAULT_MAX_GRAD_NORM if args.max_grad_norm is None else args.max_grad_norm,
        seed=args.seed,
        alpha=args.alpha,
        delta=DEFAULT_DELTA if args.delta is None else args.delta,
        plant="none" if args.plant is None else args.plant,
        kind="white-box" if args.kind is None else args.kind,
    )


def _print_result(result: AuditResult) -> None:
    c, report = result.config, result.report
    print(
        f"groupclip audit: {c.kind}, {report.canaries} canaries ({report.included} included), {c.steps} steps, "
        f"sigma={result.noise_multiplier:.4g}, grouping={c.grouping}, R={c.max_grad_norm:g}, plant={c.plant}"
    )
    print(report.summary())
    if result.expected_mu is not None:
        print(f"honest mu            {result.expected_mu:.4g}  (sqrt(T) / sigma for Dirac canaries at q = 1)")
    if result.group_bounds:
        parts = ", ".join(f"{g}: {eps:.3g}" for g, eps in result.group_bounds.items())
        print(f"per-group bounds     {parts}")


def _write(result: Any, out: Path, title: str) -> list[Path]:
    """``out/audit.json`` and ``out/scores.png`` (when matplotlib is there) of an audit or a recipe audit."""
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "audit.json"
    report_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written = [report_path]
    try:
        from .plot import plot_scores

        written.append(plot_scores(result.scores, result.included, out / "scores.png", title=title))
    except ImportError as err:
        print(f"groupclip audit: no plot ({err})", file=sys.stderr)
    return written


def _fail(message: object, status: int) -> int:
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"groupclip audit: error: {text}", file=sys.stderr)
    return status


def _run_recipe(args: argparse.Namespace) -> int:
    """``--recipe``: audit a training recipe with black-box canaries; returns the exit status."""
    from ..training.datasets import DatasetMissingError
    from ..training.recipe import apply_overrides, load_recipe, parse_override
    from .recipe import run_recipe_audit

    for name, (flag, field) in _RECIPE_DECIDES.items():
        if getattr(args, name) is not None:
            where = f" (set {field} with --set)" if field else ""
            return _fail(f"{flag} does not apply with --recipe: the recipe decides it{where}.", 2)
    if args.kind not in (None, "black-box"):
        return _fail("--recipe audits are black-box (input canaries); drop --kind white-box.", 2)
    try:
        recipe = apply_overrides(load_recipe(args.recipe), dict(parse_override(text) for text in args.set))
        result = run_recipe_audit(recipe, canaries=args.canaries, steps=args.steps, seed=args.seed, alpha=args.alpha)
    except (AuditConfigError, GroupClipError, DatasetMissingError) as err:
        return _fail(err, 2)
    privacy, report = result.privacy, result.report
    noise = privacy.get("noise") or ""
    print(
        f"groupclip audit: recipe {result.recipe} (black-box: {result.canaries} mislabeled-input canaries, "
        f"{report.included} included), {result.steps} steps, sigma={privacy['noise_multiplier']:.4g}, "
        f"grouping={privacy['grouping']}, q={privacy['sample_rate']:.4g}, noise {noise}"
    )
    print(report.summary())
    if args.out is not None:
        try:
            written = _write(result, args.out, f"black-box audit of recipe {result.recipe}")
        except OSError as err:
            return _fail(f"cannot write to {args.out}: {err.strerror or err}", 2)
        print("wrote " + ", ".join(str(p) for p in written))
    return 1 if report.contradicted else 0


def run(args: argparse.Namespace) -> int:
    """Run the audit experiment of ``args`` (from :func:`add_parser`), print the verdict; returns the exit status."""
    if getattr(args, "recipe", None) is not None:
        return _run_recipe(args)
    if getattr(args, "set", None):
        return _fail("--set overrides recipe fields: give --recipe too.", 2)
    try:
        result = run_audit(_config(args))
    except (AuditConfigError, GroupClipError) as err:
        return _fail(err, 2)
    except PlantError as err:
        return _fail(err, 1)
    _print_result(result)
    if args.out is not None:
        try:
            paths = _write(result, args.out, f"{result.config.kind} audit, plant={result.config.plant}")
        except OSError as err:
            return _fail(f"cannot write to {args.out}: {err.strerror or err}", 2)
        print("wrote " + ", ".join(str(p) for p in paths))
    expected = result.config.plant != "none"
    return 0 if result.report.contradicted == expected else 1
