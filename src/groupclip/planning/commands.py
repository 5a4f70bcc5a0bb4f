"""The ``groupclip plan`` subcommand: the grouping with the fewest groups whose predicted peak fits a budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .workload import Workload, load_factory


def add_parser(sub) -> None:
    """Add ``plan`` to the subcommands ``sub`` of the ``groupclip`` command."""
    plan = sub.add_parser(
        "plan",
        help="the grouping with the fewest groups whose predicted peak memory fits a budget (no training)",
        description="Trace one forward pass of the model and propose the grouping with the fewest groups whose "
        "predicted peak memory fits --budget (candidates: all-layer, M uniform blocks, non-uniform blocks grown "
        "greedily); each layer is costed by the per-sample form its rule declares in the norms registry. Exit "
        "status 1 when nothing fits.",
    )
    plan.add_argument(
        "--model",
        required=True,
        help="package.module:function returning a groupclip.planning.Workload, or a benchmark preset "
        "(cnn-tiny, roberta-base, ...: from a source checkout, benchmarks/harness/presets.py)",
    )
    plan.add_argument("--batch-size", type=int, help="batch size to plan for (default: the model's)")
    plan.add_argument("--seq-len", type=int, help="sequence length (default: the model's)")
    plan.add_argument("--budget", required=True, help="memory budget, e.g. 2GiB (CPU: peak RSS; CUDA: allocated)")
    plan.add_argument(
        "--norm-mode",
        choices=("auto", "ghost", "instantiate"),
        default="auto",
        help="the engine's norm mode (default: %(default)s)",
    )
    plan.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs and what the budget measures: cpu (peak RSS of the process) or cuda "
        "(allocated tensor bytes) (default: %(default)s)",
    )
    plan.add_argument("--optimizer-states", type=int, default=0, help="optimizer tensors per parameter (Adam: 2)")
    plan.add_argument(
        "--margin",
        type=float,
        default=0.03,
        help="plan against (1 - margin) x budget: headroom for what the cost model does not see (allocator, "
        "interpreter); --verify still measures against the whole budget (default: %(default)s)",
    )
    plan.add_argument("--out", type=Path, help="write the plan (with its grouping) as JSON")
    plan.add_argument(
        "--verify",
        action="store_true",
        help="then measure the proposed grouping in a fresh process (needs the source checkout's benchmark harness)",
    )


def build_workload(model: str, batch_size: int | None, seq_len: int | None) -> Workload:
    """``model`` as a factory ``module:function``, else as a preset of the source checkout's benchmark harness.

    Raises:
        ValueError: a factory that cannot be loaded, an unknown preset, or a preset name without the harness.
    """
    if ":" in model:
        cwd = str(Path.cwd())
        if "" not in sys.path and cwd not in sys.path:  # the console script: factories next to the user, too
            sys.path.append(cwd)
        return load_factory(model, batch_size, seq_len)
    from ..harness import WHERE, import_harness

    presets = import_harness("presets")
    if presets is None:
        raise ValueError(f"--model {model!r} is not 'package.module:function', and the named presets ship with {WHERE}")
    return presets.build_workload(model, batch_size, seq_len)


def run_plan(args: argparse.Namespace) -> int:
    from .planner import parse_bytes, plan_grouping, render_plan

    try:
        budget = parse_bytes(args.budget)
        if not 0.0 <= args.margin < 1.0:
            raise ValueError(f"--margin must be in [0, 1); got {args.margin}")
        work = build_workload(args.model, args.batch_size, args.seq_len)
    except ValueError as exc:
        print(f"groupclip plan: error: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        work.to("cuda")
    plan = plan_grouping(work, int(budget * (1.0 - args.margin)), args.norm_mode, args.device, args.optimizer_states)
    print(render_plan(plan, args.model))
    if args.margin:
        whole = budget / 2**20
        print(f"(planned against {1 - args.margin:.0%} of the --budget {whole:,.0f} MB: --margin {args.margin})")
    if args.out:
        payload = {"model": args.model, "seq_len": args.seq_len, **plan.to_json()}
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"written: {args.out}", file=sys.stderr)
    if plan.chosen is None:
        return 1
    if args.verify:
        return _verify(args, work, plan, budget)
    return 0


def _verify(args: argparse.Namespace, work: Workload, plan, budget: int) -> int:
    """Run the proposed grouping in a fresh process of the benchmark harness and compare its peak with the budget."""
    from ..harness import MISSING, import_harness

    suite, worker = import_harness("suite"), import_harness("worker")
    if suite is None or worker is None:
        print(f"groupclip plan: error: --verify: {MISSING}", file=sys.stderr)
        return 2
    spec = worker.RunSpec(
        model=args.model,
        style="planned",
        batch_size=work.batch_size,
        seq_len=args.seq_len,
        norm_mode=args.norm_mode,
        device=args.device,
        grouping=plan.chosen.grouping,
        steps=2,
    )
    measured = suite.run_worker(spec, timeout_s=3600)
    if "error" in measured:
        print(f"verify: the planned run failed: {measured['error']}", file=sys.stderr)
        return 1
    peak = measured["peak_bytes"]
    fits = peak <= budget
    print(
        f"verify: measured peak {peak / 2**20:,.0f} MB ({measured['memory_measure']}) vs budget "
        f"{budget / 2**20:,.0f} MB: {'fits' if fits else 'DOES NOT FIT'}; engine kept "
        f"{(measured.get('engine_held_bytes') or 0) / 2**20:,.0f} MB"
    )
    return 0 if fits else 1
