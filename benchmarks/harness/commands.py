"""The ``groupclip bench`` subcommand: its arguments and what it runs.

``groupclip bench`` (from a source checkout: the command finds this package, see :mod:`groupclip.harness`) and
``python -m benchmarks.harness`` (in the repository root) take the same arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from groupclip.planning.planner import parse_bytes

from .presets import PRESETS
from .suite import CPU_SUITE, DEFAULT_STYLES, GPU_SUITE, SuiteConfig

SMOKE_MODELS = ["cnn-tiny"]
SMOKE_STYLES = ["non-private", "all-layer", "layer-wise"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


HELP = "time / memory / max batch of every clipping style vs non-private training and Opacus"
DESCRIPTION = "Each configuration runs in its own process; results go to OUT_DIR/NAME.{json,md,png}."


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``bench`` to the subcommands ``sub`` of the ``groupclip`` command."""
    bench = sub.add_parser("bench", help=HELP, description=DESCRIPTION)
    configure(bench)
    return bench


def configure(bench: argparse.ArgumentParser) -> None:
    """The arguments of ``groupclip bench``."""
    bench.add_argument(
        "--suite",
        choices=("cpu", "gpu", "overhead"),
        help=f"model list: cpu={CPU_SUITE}, gpu={GPU_SUITE}; overhead: compute ops and time per step of every style "
        "on an overhead-bound GPT-2-shaped model, one thread (benchmarks/overhead.py; takes --rounds, --steps, "
        "--out-dir, --name)",
    )
    bench.add_argument("--models", type=_csv, help=f"comma-separated presets ({', '.join(PRESETS)}) or module:fn")
    bench.add_argument("--styles", type=_csv, default=DEFAULT_STYLES, help="comma-separated (default: %(default)s)")
    bench.add_argument("--no-norm-modes", action="store_true", help="skip the ghost/instantiate variants")
    bench.add_argument("--no-opacus", action="store_true", help="skip Opacus' modes")
    bench.add_argument(
        "--opacus-explicit-positions",
        action="store_true",
        help="also run Opacus' modes with [B, T] position ids passed explicitly (its workaround for HF models)",
    )
    bench.add_argument(
        "--noise",
        action="store_true",
        help="also the DP step as users run it (make_private, noise multiplier 1) per groupclip style, and the "
        "non-private step plus the noise drawn alone (the floor)",
    )
    bench.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch measurement")
    bench.add_argument("--batch-size", type=int, help="batch size (default: each preset's)")
    bench.add_argument("--seq-len", type=int, help="sequence length (default: each preset's)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps per process (default: %(default)s)")
    bench.add_argument(
        "--steps", type=int, help="timed steps per process, median (default: 3; --suite overhead: 10 per round)"
    )
    bench.add_argument(
        "--rounds", type=int, help="interleaved repetitions of every configuration (default: 2; --suite overhead: 7)"
    )
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --suite gpu, else cpu)")
    bench.add_argument("--threads", type=int, help="torch threads per worker")
    bench.add_argument("--memory-cap", help="memory cap for the largest batch, e.g. 16GiB (default: all memory)")
    bench.add_argument("--grouping-file", type=Path, help="a `groupclip plan --out` file: also measure its grouping")
    bench.add_argument(
        "--out-dir", type=Path, default=Path("benchmarks/results"), help="results folder (default: %(default)s)"
    )
    bench.add_argument("--name", help="results file stem (default: bench_<suite or models>)")
    bench.add_argument(
        "--smoke",
        action="store_true",
        help=f"quick check: {', '.join(SMOKE_MODELS)}, {', '.join(SMOKE_STYLES)}, one step",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.add_argument(
        "--resummarise",
        type=Path,
        metavar="JSON",
        help="rebuild the summary, tables and plots of an earlier result from its raw runs (no new runs)",
    )


def run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``groupclip bench`` with parsed ``args``; ``argv`` (its arguments) is recorded in the results."""
    from .suite import command_line, machine_info, run_suite, write_results

    if args.resummarise:
        return _resummarise(args.resummarise)
    if args.suite == "overhead":
        return _overhead(args)
    args.steps = 3 if args.steps is None else args.steps
    args.rounds = 2 if args.rounds is None else args.rounds

    if args.smoke:
        models = args.models or SMOKE_MODELS
        args.warmup, args.steps, args.rounds, args.no_norm_modes = 1, 1, 1, True
        if args.styles == DEFAULT_STYLES:
            args.styles = SMOKE_STYLES
    elif args.models:
        models = args.models
    else:
        models = GPU_SUITE if args.suite == "gpu" else CPU_SUITE
    device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("groupclip bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    unknown = [m for m in models if m not in PRESETS and ":" not in m]
    if unknown:
        print(f"groupclip bench: error: unknown model(s) {unknown}; presets: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        cap = parse_bytes(args.memory_cap) if args.memory_cap else None
    except ValueError as exc:
        print(f"groupclip bench: error: --memory-cap: {exc}", file=sys.stderr)
        return 2
    planned = None
    if args.grouping_file:
        try:
            planned = json.loads(args.grouping_file.read_text())["grouping"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(
                f"groupclip bench: error: --grouping-file {args.grouping_file}: not a `groupclip plan --out` file "
                f"({type(exc).__name__}: {exc})",
                file=sys.stderr,
            )
            return 2
        if not planned:
            print(f"groupclip bench: error: {args.grouping_file} holds no grouping (nothing fit)", file=sys.stderr)
            return 2
    cfg = SuiteConfig(
        models=models,
        styles=args.styles,
        norm_modes=not args.no_norm_modes,
        opacus=not args.no_opacus and _has_opacus(),
        opacus_explicit_positions=args.opacus_explicit_positions,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        device=device,
        threads=args.threads,
        memory_cap_bytes=cap,
        max_batch=not args.no_max_batch,
        planned_grouping=planned,
        noise=args.noise,
    )
    name = args.name or ("bench_smoke" if args.smoke else f"bench_{args.suite or '_'.join(models)}_{device}")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result = run_suite(cfg, quiet=args.quiet)
    result.update(
        name=name,
        command=command_line(argv),
        started=started,
        machine=machine_info(device),
        config={k: v for k, v in asdict(cfg).items() if k != "planned_grouping"},
    )
    if not cfg.opacus and not args.no_opacus:
        result["notes"] = ["Opacus is not installed (pip install 'groupclip[bench]'): its modes were skipped."]
    paths = write_results(result, args.out_dir, name)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


# Options of the model suites that the overhead benchmark (a fixed model, styles and thread count) does not take,
# with their defaults.
_NOT_OVERHEAD = {
    "models": None, "styles": DEFAULT_STYLES, "smoke": False, "noise": False, "device": None, "threads": None,
    "batch_size": None, "seq_len": None, "grouping_file": None, "memory_cap": None, "warmup": 1,
    "no_norm_modes": False, "no_opacus": False, "opacus_explicit_positions": False, "no_max_batch": False,
}  # fmt: skip


def _overhead(args: argparse.Namespace) -> int:
    """``--suite overhead``: the overhead benchmark (:mod:`benchmarks.overhead`), written to OUT_DIR/NAME.{json,md}."""
    from ..overhead import main as overhead_main

    given = ["--" + name.replace("_", "-") for name, default in _NOT_OVERHEAD.items() if getattr(args, name) != default]
    if given:
        print(
            f"groupclip bench: error: --suite overhead runs a fixed model, styles and thread count; drop "
            f"{', '.join(given)} (it takes --rounds, --steps, --out-dir and --name)",
            file=sys.stderr,
        )
        return 2
    out = args.out_dir / (args.name or "cpu_overhead")
    rounds = 7 if args.rounds is None else args.rounds
    steps = 10 if args.steps is None else args.steps
    if rounds < 1 or steps < 1:
        print("groupclip bench: error: --rounds and --steps must be at least 1", file=sys.stderr)
        return 2
    return overhead_main(["--rounds", str(rounds), "--steps", str(steps), "--out", str(out)])


def _resummarise(path: Path) -> int:
    """Summary, markdown and plots again from the raw runs of a result file, written next to it."""
    from .suite import summarise, write_results

    result = json.loads(path.read_text())
    cfg = SuiteConfig(**{k: v for k, v in result["config"].items() if k in SuiteConfig.__dataclass_fields__})
    result["summary"] = summarise(cfg, result["runs"])
    paths = write_results(result, path.parent, result["name"], stamp_finished=False)
    print(paths["markdown"].read_text())
    return 0


def _has_opacus() -> bool:
    import importlib.util

    return importlib.util.find_spec("opacus") is not None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.harness ARGS`` = ``groupclip bench ARGS``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=f"{HELP}. {DESCRIPTION}")
    configure(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run_bench(parser.parse_args(argv), argv)
