"""The ``groupclip`` command: DP training recipes, privacy accounting, memory planning, benchmarks and audits.

A mistake in what the user typed (a bad flag value, a malformed recipe or override, settings that contradict each
other) ends the command with ONE line on stderr, ``groupclip <command>: error: <message>``, and exit status 2;
argparse ``type=`` checks catch bad flag values before anything is loaded, and :func:`main` turns the library's
user errors (:class:`~groupclip.errors.GroupClipError`) into that line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from .errors import GroupClipError
from .training import sweep_cli
from .training.datasets import DatasetMissingError
from .training.recipe import PRIVACY_BUDGET_FIELDS, RecipeError, parse_override

DESCRIPTION = (
    "Differentially private training with group-wise per-sample gradient clipping: train a recipe with DP "
    "(train, sweep), compute or calibrate a privacy budget (epsilon, calibrate), plan and benchmark the memory of "
    "clipping (plan, bench), and audit a DP guarantee empirically (audit). Run `groupclip COMMAND --help` for a "
    "command's options."
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (``PROG: error: MESSAGE``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _number(
    kind: type,
    low: float,
    *,
    inclusive: bool = False,
    high: float | None = None,
    closed: bool = False,
    what: str = "",
):
    """An argparse ``type=``: ``kind`` (int or float), finite, above ``low`` (``>=`` if ``inclusive``) and below
    ``high`` (``<=`` if ``closed``); a failure is argparse's one-line error naming the flag, the value given and
    (``what``) what the value is."""
    if high is None:
        expected = f"{'>=' if inclusive else '>'} {low:g}"
    else:
        expected = f"in {'[' if inclusive else '('}{low:g}, {high:g}{']' if closed else ')'}"
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; expected {noun} {expected}.") from None
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if high is not None:
            ok = ok and (value <= high if closed else value < high)
        if not ok:
            raise argparse.ArgumentTypeError(f"got {text}{f' for {what}' if what else ''}; expected {noun} {expected}.")
        return value

    parse.__name__ = kind.__name__
    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    """An argparse ``type=`` accepting one of ``allowed`` (the error names them)."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r}; expected one of: {', '.join(allowed)}.")
        return text

    return parse


def _grouping(text: str) -> str | int:
    """``--grouping``: a named grouping, or a number of blocks M >= 1."""
    from .grouping import NAMED_GROUPINGS

    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text in NAMED_GROUPINGS:
        return text
    raise argparse.ArgumentTypeError(
        f"invalid grouping {text!r}; expected one of: {', '.join(NAMED_GROUPINGS)}, or a number of blocks M >= 1."
    )


_POSITIVE = _number(float, 0)
_NON_NEGATIVE = _number(float, 0, inclusive=True)
_POSITIVE_INT = _number(int, 1, inclusive=True)
_NON_NEGATIVE_INT = _number(int, 0, inclusive=True)
_DELTA = _number(float, 0, high=1)
_SAMPLE_RATE = _number(float, 0, high=1, closed=True)

# Shortcut flags of `groupclip train`: flag -> (recipe field, argparse type (checks the value), help).
TRAIN_SHORTCUTS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "--grouping": ("clipping.grouping", _grouping, "all-layer | layer-wise | param-wise | M (blocks)"),
    "--clip-fn": ("clipping.clip_fn", _choice("abadi", "automatic"), "abadi | automatic"),
    "--max-grad-norm": (
        "clipping.max_grad_norm",
        _number(float, 0, what="the total clipping threshold R (each of M groups gets R / sqrt(M))"),
        "total clipping threshold R (> 0; each of M groups gets R / sqrt(M))",
    ),
    "--norm-mode": ("clipping.norm_mode", _choice("auto", "ghost", "instantiate"), "auto | ghost | instantiate"),
    "--epsilon": (
        "privacy.epsilon",
        _POSITIVE,
        "target epsilon (> 0): the noise multiplier is calibrated to reach it; replaces the recipe's noise_multiplier",
    ),
    "--noise-multiplier": (
        "privacy.noise_multiplier",
        _NON_NEGATIVE,
        "fixed noise multiplier (>= 0): epsilon is computed from it; replaces the recipe's target epsilon "
        "(give it or --epsilon, not both)",
    ),
    "--delta": ("privacy.delta", _DELTA, "target delta, in (0, 1)"),
    "--epochs": ("schedule.epochs", _POSITIVE, "passes over the data (> 0)"),
    "--batch-size": ("schedule.batch_size", _POSITIVE_INT, "expected (Poisson) batch size (>= 1)"),
    "--physical-batch-size": ("schedule.physical_batch_size", _POSITIVE_INT, "largest batch per backward pass"),
    "--lr": ("optimizer.lr", _NON_NEGATIVE, "learning rate"),
    "--momentum": ("optimizer.momentum", _NON_NEGATIVE, "SGD momentum"),
    "--optimizer": ("optimizer.name", _choice("sgd", "adam", "adamw"), "sgd | adam | adamw"),
    "--seed": ("run.seed", int, "seed of the model, data order and Poisson sampler (not of the DP noise)"),
    "--noise-seed": (
        "privacy.noise_seed",
        int,
        "seed the DP noise: reproducible, and removable by anyone who knows the seed -- for tests, not releases "
        "(default: secret noise from OS entropy)",
    ),
    "--checkpoint-every": (
        "run.checkpoint_every",
        _number(int, -1, inclusive=True),
        "steps between checkpoints in the run folder (0: once per epoch, the default; -1: none)",
    ),
    "--collective-timeout": (
        "run.collective_timeout",
        _POSITIVE,
        "seconds a rank of a torchrun launch waits for the others before stopping with an error (default 600)",
    ),
    "--threads": ("run.threads", _NON_NEGATIVE_INT, "torch threads (0: default)"),
    "--device": ("run.device", str, "cpu, cuda, cuda:N or auto (CUDA when available)"),
    "--max-steps": (
        "schedule.max_steps",
        _NON_NEGATIVE_INT,
        "stop after this many steps (privacy still planned for all; 0: no limit)",
    ),
    "--limit": ("data.limit", _NON_NEGATIVE_INT, "use only the first N training examples (0: all)"),
}


def _train_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="run a training recipe (default: the embedded CNN on the MNIST 5k subset)",
        description="Train a recipe (a TOML file or a bundled name) with DP; flags and --set override any field. "
        "The privacy budget is stated once: privacy.epsilon (a target; the noise multiplier is calibrated to reach "
        "it) or privacy.noise_multiplier (fixed; epsilon is computed). Setting one (--epsilon, --noise-multiplier "
        "or --set) replaces the recipe's other; --show prints which applies and what it implies.",
    )
    parser.add_argument("--recipe", default=None, help="bundled recipe name or path to a .toml (default: default)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field (repeatable; 'none' unsets an optional one, e.g. privacy.noise_multiplier=none)",
    )
    for flag, (key, kind, text) in TRAIN_SHORTCUTS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (sets {key})")
    parser.add_argument("--adaptive", action="store_true", default=None, help="adaptive per-group thresholds")
    parser.add_argument("--non-private", action="store_true", help="train without DP (the baseline)")
    parser.add_argument("--out", help="run folder (default: runs/<recipe>/<time>-seed<seed>); 'none' writes nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", metavar="PATH", help="also write the final metrics as JSON here")
    parser.add_argument("--list", action="store_true", help="list the bundled recipes and exit")
    parser.add_argument("--show", action="store_true", help="print the resolved recipe (TOML) and exit")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the killed run in RUN_DIR from its latest checkpoint, with the run's saved config "
        "(other flags must agree with it; --checkpoint-every, --keep-checkpoint, --collective-timeout may change)",
    )
    parser.add_argument(
        "--keep-checkpoint",
        action="store_true",
        default=None,
        help="keep the last checkpoint when the run ends (keep it private: it holds the noise generator state)",
    )


def _train_overrides(args) -> list[str] | dict:
    """The recipe overrides of the flags and ``--set``s. Setting ``privacy.epsilon`` (a target) or
    ``privacy.noise_multiplier`` (fixed) unsets the other (see :func:`~groupclip.training.recipe.apply_overrides`);
    setting both is a RecipeError naming the two flags."""
    overrides: dict = {}
    given_as: dict[str, str] = {}  # recipe field -> how the command line set it
    for flag, (key, _, _) in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[key] = value
            given_as[key] = f"{flag} {value}"
    if args.adaptive:
        overrides["clipping.adaptive"] = True
    if args.non_private:
        overrides["privacy.private"] = False
    if args.keep_checkpoint:
        overrides["run.keep_checkpoint"] = True
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
        given_as[key] = f"--set {text}"
    stated = [key for key in PRIVACY_BUDGET_FIELDS if overrides.get(key) is not None and not _unsets(overrides[key])]
    if len(stated) == 2:
        raise RecipeError(
            f"{given_as[stated[0]]} and {given_as[stated[1]]} both state the privacy budget; give one: a target "
            "epsilon (the noise multiplier is calibrated to reach it) or a fixed noise multiplier (epsilon is "
            "computed from it)."
        )
    if "clipping.grouping" in overrides and isinstance(overrides["clipping.grouping"], str):
        grouping = overrides["clipping.grouping"]
        overrides["clipping.grouping"] = int(grouping) if grouping.isdigit() else grouping
    return overrides


def _unsets(value: object) -> bool:
    """``--set section.field=none`` (or ``null``) unsets an optional field."""
    return isinstance(value, str) and value.lower() in ("none", "null")


def _train(args) -> int:
    import time

    from .training import apply_overrides, bundled_recipes, load_recipe, recipe_to_toml, train

    if args.list:
        for name in bundled_recipes():
            description = load_recipe(name).description.split(". ")[0]
            print(f"{name:24s} {description}")
        return 0
    if args.resume:
        recipe, run_dir = _resumed_recipe(args)
    else:
        recipe = apply_overrides(load_recipe(args.recipe or "default"), _train_overrides(args))
        out = args.out or os.path.join("runs", recipe.name, time.strftime("%Y%m%d-%H%M%S") + f"-seed{recipe.run.seed}")
        run_dir = None if out == "none" else out
    if args.show:
        print(recipe_to_toml(recipe, _budget_comments(recipe)), end="")
        return 0
    result = train(recipe, run_dir, progress=not args.no_progress, resume=bool(args.resume))
    if result.get("rank", 0) != 0:  # a torchrun launch: rank 0 reports
        return 0
    _print_result(result, run_dir)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


def _budget_comments(recipe) -> dict[str, str]:
    """``--show``'s comment on the privacy budget: whether ``privacy.epsilon`` (a target) or
    ``privacy.noise_multiplier`` (fixed) applies, and the noise multiplier or epsilon it implies for the recipe's
    training set (built for its size; without the numbers when the data is not available here)."""
    import warnings

    from .training.recipe import privacy_budget_note
    from .training.tasks import build_task

    if not recipe.privacy.private:
        return {}
    try:
        data_size = len(build_task(recipe.task, recipe.data, recipe.model, recipe.run.seed).train)
    except (DatasetMissingError, ImportError, OSError):
        data_size = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself warns (a delta >= 1/N, a noise multiplier of 0)
        note = privacy_budget_note(recipe, data_size)
    return dict([note]) if note else {}


def _resumed_recipe(args):
    """``(the run's saved recipe with the flags applied, RUN_DIR)`` for ``--resume RUN_DIR``; a RecipeError when a
    flag contradicts the saved config (only the fields in RESUMABLE_CHANGES may change)."""
    from .training import apply_overrides, load_recipe
    from .training.checkpoint import CheckpointError, checkpoint_path
    from .training.recipe import RESUMABLE_CHANGES, recipe_differences, recipe_to_dict

    run_dir = args.resume
    if args.recipe is not None:
        raise RecipeError(f"--resume {run_dir} uses the run's saved config ({run_dir}/config.toml); drop --recipe.")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(run_dir):
        raise RecipeError(f"--resume {run_dir} continues in that folder; drop --out {args.out}.")
    config = os.path.join(run_dir, "config.toml")
    if not os.path.isfile(config) or not os.path.isfile(checkpoint_path(run_dir)):
        if os.path.isfile(os.path.join(run_dir, "final.json")):
            raise CheckpointError(f"{run_dir} has finished (final.json): nothing to resume.")
        raise CheckpointError(f"{run_dir} has no checkpoint (checkpoint.pt and config.toml): nothing to resume.")
    saved = load_recipe(config)
    recipe = apply_overrides(saved, _train_overrides(args))
    for key, before, after in recipe_differences(recipe_to_dict(saved), recipe_to_dict(recipe)):
        if key not in RESUMABLE_CHANGES:
            raise RecipeError(
                f"--resume {run_dir}: {key} = {after!r} conflicts with the run's saved config ({key} = {before!r})."
            )
    return recipe, run_dir


def _print_result(result: dict, run_dir: str | None) -> None:
    headline = result["headline"]
    value = result[headline]
    print(f"{headline:14s}: {value:.4f}" if value is not None else f"{headline:14s}: n/a")
    if result["private"]:
        eps = result["epsilon"]
        eps_text = "n/a (pip install dp-accounting)" if eps is None else f"{eps:.3f}"
        print(
            f"{'epsilon':14s}: {eps_text} at delta={result['delta']:g} ({result['accountant'].upper()}; Poisson rate "
            f"{result['sample_rate']:.4g}, {result['steps']} steps, noise multiplier {result['noise_multiplier']:.4g})"
        )
        print(f"{'clipping':14s}: {result['grouping']} ({result['groups']} groups), {result['clip_fn']}")
        if result.get("noise_seed") is not None:
            print(
                f"{'noise':14s}: {result['noise']}, noise_seed={result['noise_seed']}: anyone who knows the seed can "
                "remove the noise; not for a release"
            )
        elif result.get("noise"):
            print(f"{'noise':14s}: {result['noise']}")
        if result.get("extra_ledger_steps"):
            print(f"{'ledger':14s}: +{result['extra_ledger_steps']} steps charged for replays with fresh noise")
    else:
        print(f"{'epsilon':14s}: inf (non-private)")
    if result.get("resumed_from"):
        print(f"{'resumed':14s}: from step(s) {', '.join(map(str, result['resumed_from']))}")
    print(f"{'wall time':14s}: {result['wall_time_s']:.1f} s")
    print(f"{'peak memory':14s}: {result['peak_rss_mb']:.0f} MB (peak RSS)")
    if run_dir:
        print(f"{'run folder':14s}: {run_dir}")


def _accounting_parsers(sub) -> None:
    eps = sub.add_parser(
        "epsilon",
        help="epsilon of Poisson-subsampled Gaussian steps (dp-accounting)",
        description="Print the epsilon at --delta after --steps DP-SGD steps with Poisson sampling at rate q and "
        "Gaussian noise of the given noise multiplier (dp-accounting's RDP or PLD accountant).",
    )
    eps.add_argument(
        "--noise-multiplier",
        "--sigma",
        type=_NON_NEGATIVE,
        required=True,
        help="noise multiplier sigma: noise std / sensitivity (>= 0; 0 gives an infinite epsilon)",
    )
    calib = sub.add_parser(
        "calibrate",
        help="noise multiplier that reaches a target epsilon (dp-accounting)",
        description="Print the smallest noise multiplier (within 0.5%) whose epsilon at --delta after --steps "
        "Poisson-subsampled Gaussian steps does not exceed --target-epsilon.",
    )
    calib.add_argument("--target-epsilon", type=_POSITIVE, required=True, help="the epsilon to reach (> 0)")
    for p, min_steps in ((eps, 0), (calib, 1)):
        p.add_argument(
            "--sample-rate", "-q", type=_SAMPLE_RATE, required=True, help="Poisson sampling rate q, in (0, 1]"
        )
        p.add_argument(
            "--steps",
            type=_number(int, min_steps, inclusive=True),
            required=True,
            help=f"number of DP-SGD steps (>= {min_steps})",
        )
        p.add_argument("--delta", type=_DELTA, required=True, help="delta of the (epsilon, delta) guarantee, in (0, 1)")
        p.add_argument(
            "--accountant", choices=("rdp", "pld"), default="rdp", help="privacy accountant (default: %(default)s)"
        )


def _accounting(args) -> int:
    try:
        return _accounting_command(args)
    except ValueError as exc:  # numbers the accountant rejects (an unreachable epsilon, ...): a user error
        return _user_error(args.command, exc)


def _user_error(command: str, exc: BaseException) -> int:
    """Print ``groupclip COMMAND: error: MESSAGE`` as one line on stderr; returns the exit status 2."""
    print(f"groupclip {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def _accounting_command(args) -> int:
    from .accounting import UnreachableEpsilonError, calibrate_noise_multiplier, compute_epsilon

    if args.command == "epsilon":
        eps = compute_epsilon(args.noise_multiplier, args.sample_rate, args.steps, args.delta, args.accountant)
        print(
            f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant.upper()}; noise multiplier "
            f"{args.noise_multiplier:g}, sample rate {args.sample_rate:g}, {args.steps} steps)"
        )
        return 0
    try:
        sigma = calibrate_noise_multiplier(
            args.target_epsilon, args.delta, args.sample_rate, args.steps, args.accountant
        )
    except UnreachableEpsilonError as exc:
        return _user_error(args.command, exc)
    eps = compute_epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant)
    print(
        f"noise multiplier = {sigma:.6g} -> epsilon = {eps:.6g} at delta = {args.delta:g} "
        f"({args.accountant.upper()}; sample rate {args.sample_rate:g}, {args.steps} steps)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="groupclip", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sweep_cli.add_parser(sub, _POSITIVE_INT)
    _accounting_parsers(sub)
    from .harness import add_parsers, run_bench, run_plan

    add_parsers(sub)
    from .audit import cli as audit_cli

    audit_cli.add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser: `groupclip train: error: unrecognized arguments: ...`
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("epsilon", "calibrate"):
        return _accounting(args)
    if args.command == "bench":
        return run_bench(args, argv[1:])
    if args.command == "plan":
        return run_plan(args)
    if args.command == "audit":
        return audit_cli.run(args)
    if args.command in ("train", "sweep"):
        from .distributed.data_parallel import PeerFailureError

        try:
            return _train(args) if args.command == "train" else sweep_cli.run(args)
        except PeerFailureError as exc:  # a dead or hung rank of a distributed launch: a runtime failure
            print(f"groupclip {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        except (GroupClipError, DatasetMissingError) as exc:  # recipes, privacy settings, missing data
            return _user_error(args.command, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
