"""Overhead benchmark: ops dispatched and time per training step, per clipping style, against non-private training.

The model is overhead-bound on purpose -- a GPT-2-shaped LM with 12 layers of width 64, batch 4, sequence 32, one
thread -- so a step's time is dominated by the ops dispatched and the Python around them, as on a GPU at moderate
sizes where every op is a kernel launch. Per style, in ONE process:

* compute ops per step: aten ops seen by a ``TorchDispatchMode``, without views and allocations (``empty*``), with
  host synchronisations (``item``: ``_local_scalar_dense``) counted apart;
* time per step (forward, backward, optimizer step, ``zero_grad``), medians over interleaved rounds: every round
  times every style once, in a rotated order, so a slow period of the machine hits all styles alike; and the same
  split into the forward pass, the backward pass and the optimizer, to show where a style's extra time goes;
* the Python share of a step: wall time minus the self time of aten ops in a ``torch.profiler`` trace, over wall
  time (profiled separately, over ``min(5, steps)`` steps; the profiler's own overhead inflates both);
* two variants: ``clip`` (the engine alone: clipped gradients) and ``dp`` (``make_private`` with noise multiplier 1:
  clipping, noise, accounting, as users train), each against the same non-private step.

Run: ``python benchmarks/overhead.py --rounds 7 --out benchmarks/results/cpu_overhead`` (writes ``.json`` and
``.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STYLES = ("non-private", "all-layer", "4 groups", "layer-wise", "param-wise")
GROUPINGS = {"all-layer": "all-layer", "4 groups": 4, "layer-wise": "layer-wise", "param-wise": "param-wise"}
_NOT_COMPUTE = ("empty", "empty_strided", "empty.memory_format", "_local_scalar_dense")


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name: compute ops (no views, no allocations) and host synchronisations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().removeprefix("aten::")
        if name == "_local_scalar_dense":
            self.syncs += 1
        elif not func.is_view and not name.startswith(_NOT_COMPUTE):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=12, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=999, eos_token_id=999,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(seed))
    return model, ids


class Runner:
    """One model, one optimizer, and the style attached now (engine or private training; none: non-private)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.model, self.ids = build()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.attached = None

    def attach(self, style: str) -> None:
        self.detach()
        if style == "non-private":
            return
        grouping = GROUPINGS[style]
        if self.variant == "clip":
            from groupclip import ClippingEngine

            self.attached = ClippingEngine(self.model, grouping=grouping, max_grad_norm=1.0).attach()
        else:
            from groupclip import make_private

            self.attached = make_private(
                self.model, self.optimizer, grouping=grouping, max_grad_norm=1.0, noise_multiplier=1.0,
                sample_rate=0.01, data_size=400,
            )  # fmt: skip
        for _ in range(2):  # plan, warm caches
            self.step()

    def detach(self) -> None:
        if self.attached is not None:
            self.attached.detach()
            self.attached = None

    def step(self) -> None:
        self.timed_step()

    def timed_step(self) -> tuple[float, float, float]:
        """One step; seconds spent in the forward pass, the backward pass, and the optimizer (step, zero_grad)."""
        start = time.perf_counter()
        out = self.model(self.ids, labels=self.ids)
        forward = time.perf_counter()
        out.loss.backward()
        backward = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return forward - start, backward - forward, end - backward


def count_ops(runner: Runner) -> OpCounter:
    counter = OpCounter()
    with counter:
        runner.step()
    return counter


PHASES = ("forward", "backward", "optimizer")


def time_steps(runner: Runner, steps: int) -> tuple[float, list[float]]:
    """Mean seconds per step, and per phase (forward, backward, optimizer)."""
    runner.step()
    start = time.perf_counter()
    phases = [0.0, 0.0, 0.0]
    for _ in range(steps):
        for i, seconds in enumerate(runner.timed_step()):
            phases[i] += seconds
    return (time.perf_counter() - start) / steps, [p / steps for p in phases]


def python_share(runner: Runner, steps: int = 5) -> float:
    """1 - (self time of aten ops) / (wall time of the profiled steps)."""
    from torch.profiler import ProfilerActivity, profile

    runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        wall = time.perf_counter() - start
    aten = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return max(0.0, 1.0 - aten / wall)


def measure(variant: str, rounds: int, steps: int) -> dict:
    runner = Runner(variant)
    results: dict[str, dict] = {s: {"times_ms": [], "phases_ms": {p: [] for p in PHASES}} for s in STYLES}
    for style in STYLES:
        runner.attach(style)
        counter = count_ops(runner)
        results[style].update(ops=counter.total, syncs=counter.syncs, op_names=dict(counter.ops.most_common()))
        results[style]["python_share"] = python_share(runner, min(5, steps))
    for r in range(rounds):
        order = STYLES[r % len(STYLES) :] + STYLES[: r % len(STYLES)]
        for style in order:
            runner.attach(style)
            total, phases = time_steps(runner, steps)
            results[style]["times_ms"].append(1e3 * total)
            for phase, seconds in zip(PHASES, phases, strict=True):
                results[style]["phases_ms"][phase].append(1e3 * seconds)
    runner.detach()
    base = results["non-private"]
    for row in results.values():
        row["median_ms"] = statistics.median(row["times_ms"])
        row["phase_median_ms"] = {p: statistics.median(v) for p, v in row["phases_ms"].items()}
        row["time_ratio"] = row["median_ms"] / statistics.median(base["times_ms"])
        row["ops_ratio"] = row["ops"] / base["ops"]
    return results


def report(all_results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Overhead benchmark (GPT-2-shaped, 12 layers x 64, batch 4 x 32, 1 thread)",
        "",
        f"Command: `python benchmarks/overhead.py --rounds {args.rounds} --steps {args.steps} --out {args.out}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, torch "
        f"{torch.__version__}, Python {sys.version.split()[0]}; medians of {args.rounds} interleaved rounds of "
        f"{args.steps} steps.",
        "",
        "Targets (issue #13): every style <= 1.3x non-private time and <= 1.6x compute ops; layer-wise and "
        "param-wise within 10% of all-layer's time.",
        "",
    ]
    for variant, results in all_results.items():
        what = "the engine alone (clipped gradients)" if variant == "clip" else "make_private, noise multiplier 1"
        lines += [
            f"## `{variant}`: {what}",
            "",
            "| style | ms / step | time x | forward / backward / optimizer ms | compute ops | ops x | host syncs | "
            "Python share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for style, row in results.items():
            phases = " / ".join(f"{row['phase_median_ms'][p]:.1f}" for p in PHASES)
            lines.append(
                f"| {style} | {row['median_ms']:.1f} | {row['time_ratio']:.2f} | {phases} | {row['ops']} | "
                f"{row['ops_ratio']:.2f} | {row['syncs']} | {100 * row['python_share']:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per style and round (default: 10)")
    parser.add_argument("--variants", default="clip,dp", help="comma-separated: clip, dp (default: both)")
    parser.add_argument("--out", default="benchmarks/results/cpu_overhead", help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    all_results = {v: measure(v, args.rounds, args.steps) for v in args.variants.split(",")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(all_results, indent=1))
    text = report(all_results, args)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
