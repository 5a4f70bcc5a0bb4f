"""The floor of a Python hook-based engine on the overhead benchmark's model: what the scaffolding alone costs.

Issue #13 asks every style for <= 1.3x the non-private step on the overhead-bound GPT-2-shaped model of
``benchmarks/overhead.py``. Book-Keeping in Python needs, whatever it computes, three pieces of scaffolding:

* a ``TorchFunctionMode`` that sees every torch call of the forward pass (here: one that does nothing but call the
  op), to tell from data flow which tensors are per-sample;
* a forward pre-hook and post-hook on every module owning parameters (here: doing nothing but return);
* a Python autograd node per module use (here: an identity ``autograd.Function`` saving the module's input, whose
  backward does nothing), where the backward pass hands over the output gradient.

This script times the non-private step with each piece added, and with all three, next to the engine's clip step
(all-layer and layer-wise) -- medians of interleaved rounds, in one process. The scaffolding leaves out what any
engine adds on top: switching ``requires_grad`` off during each module call and computing the weight gradients
itself from the taps (the same arithmetic autograd does, but dispatched from Python), the per-sample norms, clip
factors and clipped sums. So the last scaffolding row is a floor, not an engine.

Run: ``python benchmarks/overhead_floor.py --rounds 7 --steps 10 --out benchmarks/results/cpu_overhead_floor``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from overhead import build


class PassThroughMode(TorchFunctionMode):
    """Sees every torch call and runs it unchanged: the cost of being called, nothing else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class IdentityTap(torch.autograd.Function):
    """An identity node that saves the module input (as an engine's tap must) and hands back the gradient."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, saved: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(saved)
        return output.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 -- an engine reads them
        return None, None, grad


class Scaffolding:
    """The pieces above on one model; ``configure`` swaps them."""

    def __init__(self) -> None:
        self.model, self.ids = build()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.owners = [m for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None]
        self.mode: TorchFunctionMode | None = None
        self.handles: list = []
        self.engine = None

    def configure(self, mode: bool, hooks: bool, engine: str | None = None) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.engine is not None:
            self.engine.detach()
            self.engine = None
        self.mode = PassThroughMode() if mode else None
        if engine is not None:
            from groupclip import ClippingEngine

            self.engine = ClippingEngine(self.model, grouping=engine, max_grad_norm=1.0).attach()
        if hooks:
            for module in self.owners:
                self.handles.append(module.register_forward_pre_hook(_pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(_post, with_kwargs=True))
        for _ in range(2):
            self.step()

    def loss(self) -> torch.Tensor:
        """The forward pass (under the mode when configured) and its loss."""
        if self.mode is None:
            return self.model(self.ids, labels=self.ids).loss
        with self.mode:
            return self.model(self.ids, labels=self.ids).loss

    def step(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
    return None


# Passed to every tap, as an engine's anchor is (an engine switches parameters off, and a first layer's output
# would then need it to require grad).
ANCHOR = torch.zeros((), requires_grad=True)


def _post(module: nn.Module, args: tuple, kwargs: dict, output):
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return IdentityTap.apply(ANCHOR, x.detach(), output)


CONFIGS: dict[str, dict] = {
    "non-private": {"mode": False, "hooks": False},
    "+ mode": {"mode": True, "hooks": False},
    "+ hooks and taps": {"mode": False, "hooks": True},
    "+ mode, hooks and taps (the floor)": {"mode": True, "hooks": True},
    "engine, all-layer (clip)": {"mode": False, "hooks": False, "engine": "all-layer"},
    "engine, layer-wise (clip)": {"mode": False, "hooks": False, "engine": "layer-wise"},
}


def measure(rounds: int, steps: int) -> dict:
    bench = Scaffolding()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            bench.configure(**CONFIGS[name])
            start = time.perf_counter()
            for _ in range(steps):
                bench.step()
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    bench.configure(mode=False, hooks=False)
    base = statistics.median(times["non-private"])
    return {
        name: {"times_ms": t, "median_ms": statistics.median(t), "time_ratio": statistics.median(t) / base}
        for name, t in times.items()
    }


def report(results: dict, args: argparse.Namespace, owners: int) -> str:
    lines = [
        "# The floor of a Python hook-based engine (overhead benchmark model, 1 thread)",
        "",
        f"Command: `python benchmarks/overhead_floor.py --rounds {args.rounds} --steps {args.steps} --out {args.out}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}; medians of {args.rounds} interleaved rounds of {args.steps} steps (forward, "
        f"backward, SGD step, zero_grad). GPT-2-shaped 12 layers x 64, batch 4 x 32; {owners} modules own parameters.",
        "",
        "| configuration | ms / step | time x |",
        "|---|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row['time_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round (default: 10)")
    parser.add_argument("--out", default="benchmarks/results/cpu_overhead_floor", help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.rounds, args.steps)
    text = report(results, args, len(Scaffolding().owners))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
