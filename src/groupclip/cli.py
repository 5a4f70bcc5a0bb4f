"""The ``groupclip`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .datasets import DatasetMissingError
from .errors import GroupClipError
from .training.recipe import RecipeError, parse_override

# Shortcut flags of `groupclip train`: flag -> (recipe field, type, help).
TRAIN_SHORTCUTS: dict[str, tuple[str, type, str]] = {
    "--grouping": ("clipping.grouping", str, "all-layer | layer-wise | param-wise | M (blocks)"),
    "--clip-fn": ("clipping.clip_fn", str, "abadi | automatic"),
    "--max-grad-norm": ("clipping.max_grad_norm", float, "total clipping threshold R"),
    "--norm-mode": ("clipping.norm_mode", str, "auto | ghost | instantiate"),
    "--epsilon": ("privacy.epsilon", float, "target epsilon (calibrates the noise multiplier)"),
    "--noise-multiplier": ("privacy.noise_multiplier", float, "fixed noise multiplier (instead of --epsilon)"),
    "--delta": ("privacy.delta", float, "target delta"),
    "--epochs": ("schedule.epochs", float, "passes over the data"),
    "--batch-size": ("schedule.batch_size", int, "expected (Poisson) batch size"),
    "--physical-batch-size": ("schedule.physical_batch_size", int, "largest batch per backward pass"),
    "--lr": ("optimizer.lr", float, "learning rate"),
    "--momentum": ("optimizer.momentum", float, "SGD momentum"),
    "--optimizer": ("optimizer.name", str, "sgd | adam | adamw"),
    "--seed": ("run.seed", int, "seed of the model, data order and Poisson sampler (not of the DP noise)"),
    "--noise-seed": (
        "privacy.noise_seed",
        int,
        "seed the DP noise: reproducible, and removable by anyone who knows the seed -- for tests, not releases "
        "(default: secret noise from OS entropy)",
    ),
    "--checkpoint-every": (
        "run.checkpoint_every",
        int,
        "steps between checkpoints in the run folder (0: once per epoch, the default; -1: none)",
    ),
    "--collective-timeout": (
        "run.collective_timeout",
        float,
        "seconds a rank of a torchrun launch waits for the others before stopping with an error (default 600)",
    ),
    "--threads": ("run.threads", int, "torch threads (0: default)"),
    "--device": ("run.device", str, "cpu, cuda, cuda:N or auto (CUDA when available)"),
    "--max-steps": ("schedule.max_steps", int, "stop after this many steps (privacy still planned for all)"),
    "--limit": ("data.limit", int, "use only the first N training examples"),
}


def _train_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="run a training recipe (default: the embedded CNN on the MNIST 5k subset)",
        description="Train a recipe (a TOML file or a bundled name) with DP; flags and --set override any field.",
    )
    parser.add_argument("--recipe", default=None, help="bundled recipe name or path to a .toml (default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
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
    overrides: dict = {}
    for flag, (key, _, _) in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[key] = value
    if args.epsilon is not None and args.noise_multiplier is None:
        overrides["privacy.noise_multiplier"] = None  # a target epsilon replaces a recipe's fixed multiplier
    if args.adaptive:
        overrides["clipping.adaptive"] = True
    if args.non_private:
        overrides["privacy.private"] = False
    if args.keep_checkpoint:
        overrides["run.keep_checkpoint"] = True
    overrides.update(parse_override(text) for text in args.set)
    if "clipping.grouping" in overrides and isinstance(overrides["clipping.grouping"], str):
        grouping = overrides["clipping.grouping"]
        overrides["clipping.grouping"] = int(grouping) if grouping.isdigit() else grouping
    return overrides


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
        print(recipe_to_toml(recipe), end="")
        return 0
    result = train(recipe, run_dir, progress=not args.no_progress, resume=bool(args.resume))
    if result.get("rank", 0) != 0:  # a torchrun launch: rank 0 reports
        return 0
    _print_result(result, run_dir)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


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


def _sweep_parser(sub) -> None:
    parser = sub.add_parser(
        "sweep",
        help="run a grid of a recipe with overrides (resumable) and tabulate the results",
        description="Run every point of a sweep file (or of --recipe with --axis flags); finished points are skipped.",
    )
    parser.add_argument("spec", nargs="?", help="sweep file (.toml); or give --recipe and --axis")
    parser.add_argument("--recipe", help="recipe for a sweep given by flags")
    parser.add_argument("--axis", action="append", default=[], metavar="SECTION.FIELD=V1,V2", help="a grid axis")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="shared override")
    parser.add_argument("--repeat", help="axis averaged over in the table (e.g. seed)")
    parser.add_argument("--name", default="sweep", help="sweep name (flags form)")
    parser.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2", help="run a subset")
    parser.add_argument("--table", action="store_true", help="only rebuild the results table from finished runs")


def _sweep(args) -> int:
    from .training.sweep import load_sweep, render_table, run_sweep, summarise, sweep_from_flags, write_table

    if args.spec:
        spec = load_sweep(args.spec)
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


def _accounting_parsers(sub) -> None:
    eps = sub.add_parser("epsilon", help="epsilon of Poisson-subsampled Gaussian steps (dp-accounting)")
    eps.add_argument("--noise-multiplier", "--sigma", type=float, required=True)
    calib = sub.add_parser("calibrate", help="noise multiplier that reaches a target epsilon (dp-accounting)")
    calib.add_argument("--target-epsilon", type=float, required=True)
    for p in (eps, calib):
        p.add_argument("--sample-rate", "-q", type=float, required=True, help="Poisson sampling rate q")
        p.add_argument("--steps", type=int, required=True)
        p.add_argument("--delta", type=float, required=True)
        p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")


def _accounting(args) -> int:
    try:
        return _accounting_command(args)
    except ValueError as exc:  # bad numbers: an error line and exit code 2, like argparse
        print(f"groupclip {args.command}: error: {exc}", file=sys.stderr)
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    eps = compute_epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant)
    print(
        f"noise multiplier = {sigma:.6g} -> epsilon = {eps:.6g} at delta = {args.delta:g} "
        f"({args.accountant.upper()}; sample rate {args.sample_rate:g}, {args.steps} steps)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sweep_parser(sub)
    _accounting_parsers(sub)
    from .bench.commands import add_parsers, run_bench, run_plan

    add_parsers(sub)
    from .audit import cli as audit_cli

    audit_cli.add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
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
            return _train(args) if args.command == "train" else _sweep(args)
        except PeerFailureError as exc:  # a dead or hung rank of a distributed launch: a runtime failure
            print(f"groupclip {args.command}: error: {exc}", file=sys.stderr)
            return 1
        except (GroupClipError, DatasetMissingError) as exc:  # recipes, privacy settings, missing data
            print(f"groupclip {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
