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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
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
