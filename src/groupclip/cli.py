"""The ``groupclip`` command."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .quickstart import QuickConfig, run


def _grouping(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _train_parser(sub) -> None:
    parser = sub.add_parser("train", help="run a DP training job (default: CNN on the MNIST 5k subset)")
    defaults = QuickConfig()
    for f in fields(QuickConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = _grouping if f.name == "grouping" else type(default)
        parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    parser.add_argument("--json", metavar="PATH", help="also write the final metrics as JSON")


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
    _accounting_parsers(sub)
    from .bench.commands import add_parsers, run_bench, run_plan

    add_parsers(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command in ("epsilon", "calibrate"):
        return _accounting(args)
    if args.command == "bench":
        return run_bench(args, argv[1:])
    if args.command == "plan":
        return run_plan(args)
    if args.command == "train":
        config = QuickConfig(**{f.name: getattr(args, f.name) for f in fields(QuickConfig)})
        result = run(config)
        eps = result["epsilon"]
        eps_text = "n/a (pip install dp-accounting)" if eps is None else f"{eps:.3f}"
        print(f"test accuracy : {result['test_accuracy']:.4f}")
        print(
            f"epsilon       : {eps_text} at delta={result['delta']:g} (RDP, Poisson rate "
            f"{result['sample_rate']:.4f}, {result['steps']} steps, noise multiplier {config.noise_multiplier})"
        )
        print(f"wall time     : {result['wall_time_s']:.1f} s")
        print(f"peak memory   : {result['peak_rss_mb']:.0f} MB (peak RSS)")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
