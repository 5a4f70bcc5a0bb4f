"""One benchmark configuration, measured in its own process: ``python -m benchmarks.harness.worker '<json spec>'``.

The worker builds the workload, attaches groupclip (or Opacus) for the configuration's style, runs ``warmup``
then ``steps`` timed training steps (forward, loss, backward, ``optimizer.step()``, ``zero_grad``), and prints
one line ``RESULT <json>``. Peak memory is the process' peak RSS over the steps on CPU (the kernel's high-water
mark is reset after the model is built) and ``torch.cuda.max_memory_allocated`` on CUDA. A configuration that
fails (Opacus refusing a model, out of memory) reports its error instead of timings.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_PREFIX = "RESULT "
NOISE_SUFFIX = "+noise"
NOISE_MULTIPLIER = 1.0


@dataclass
class RunSpec:
    """What one worker process measures.

    Attributes:
        model: preset name or ``"module:function"`` factory.
        style: ``non-private``, a grouping (``all-layer``, ``groups-M``, ``layer-wise``, ``param-wise``),
            ``planned`` (uses ``grouping``) or an Opacus mode (``opacus-hooks``, ``opacus-per-layer``,
            ``opacus-ghost``).
        norm_mode: groupclip's norm mode.
        grouping: explicit grouping (list of lists of parameter names) for ``style="planned"``.
        predict: also run the cost model after timing and report its predictions for this configuration.
        search_max_batch: CUDA only: find the largest batch that fits by doubling then bisection.
        noise: the DP step as users run it. A groupclip style runs under ``make_private`` (noise multiplier 1:
            clipping, noise, accounting); ``non-private`` draws the noise alone (N(0, 1) of every trainable
            parameter's size, scaled and added to its gradient): the floor no private step avoids.
    """

    model: str
    style: str
    batch_size: int | None = None
    seq_len: int | None = None
    norm_mode: str = "auto"
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    max_grad_norm: float = 1.0
    lr: float = 1e-3
    grouping: list[list[str]] | None = None
    predict: bool = True
    opacus_explicit_positions: bool = False
    search_max_batch: bool = False
    max_batch_limit: int = 4096
    noise: bool = False

    def __post_init__(self) -> None:
        if self.noise and self.style.startswith("opacus"):
            raise ValueError(f"style {self.style!r} with noise=True: Opacus' modes are measured without noise.")

    @property
    def label(self) -> str:
        if self.style.startswith("opacus"):
            return self.style + ("+positions" if self.opacus_explicit_positions else "")
        label = (
            self.style if self.norm_mode == "auto" or self.style == "non-private" else f"{self.style}/{self.norm_mode}"
        )
        return label + NOISE_SUFFIX if self.noise else label


@dataclass
class StepStats:
    step_times_s: list[float] = field(default_factory=list)
    engine_held_bytes: int | None = None
    engine_activation_bytes: int | None = None
    groups: int | None = None
    losses: list[float] = field(default_factory=list)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Trainer:
    """The step of one style on one workload; ``close()`` removes every hook it installed."""

    def __init__(self, spec: RunSpec, work) -> None:
        import torch

        from groupclip.engine import ClippingEngine
        from groupclip.planning.costmodel import style_grouping

        self.work = work
        self.engine = None
        self.private = None
        self.opacus = None
        self.noise_alone = None
        if spec.style.startswith("opacus"):
            from .opacus_modes import make_opacus_step

            if spec.opacus_explicit_positions:
                work = self.work = work.with_explicit_positions()
            self.opacus = make_opacus_step(work, spec.style, spec.max_grad_norm, spec.lr)
            return
        self.optimizer = torch.optim.SGD(work.model.parameters(), lr=spec.lr)
        if spec.style == "non-private":
            if spec.noise:
                self.noise_alone = NoiseAlone(work.model, spec.max_grad_norm / work.batch_size, spec.seed)
            return
        grouping = spec.grouping if spec.style == "planned" else style_grouping(spec.style)
        if grouping is None:
            raise ValueError("style 'planned' needs an explicit grouping (RunSpec.grouping).")
        if spec.noise:
            from groupclip import make_private

            self.private = make_private(
                work.model,
                self.optimizer,
                grouping=grouping,
                max_grad_norm=spec.max_grad_norm,
                loss_reduction="mean",
                norm_mode=spec.norm_mode,
                noise_multiplier=NOISE_MULTIPLIER,
                batch_size=work.batch_size,
                data_size=100 * work.batch_size,
            )
            self.engine = self.private.engine
            return
        self.engine = ClippingEngine(
            work.model,
            grouping=grouping,
            max_grad_norm=spec.max_grad_norm,
            loss_reduction="mean",
            norm_mode=spec.norm_mode,
        ).attach()

    def step(self) -> float:
        if self.opacus is not None:
            return self.opacus.step()
        loss = self.work.loss()
        loss.backward()
        if self.noise_alone is not None:
            self.noise_alone.add()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def close(self) -> None:
        if self.private is not None:
            self.private.detach()
        elif self.engine is not None:
            self.engine.detach()
        if self.opacus is not None:
            self.opacus.close()


class NoiseAlone:
    """What drawing the noise costs on its own: N(0, std^2) of every trainable parameter's size added to its
    gradient, one draw per parameter from a generator on the parameter's device (no clipping, no accounting)."""

    def __init__(self, model, std: float, seed: int) -> None:
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.std = std * NOISE_MULTIPLIER
        device = self.params[0].device if self.params else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def add(self) -> None:
        import torch

        for p in self.params:
            if p.grad is not None:
                noise = torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.grad.dtype)
                p.grad.add_(noise, alpha=self.std)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(spec: RunSpec, work) -> StepStats:
    stats = StepStats()
    trainer = _Trainer(spec, work)
    try:
        held = []
        for i in range(spec.warmup + spec.steps):
            _sync(spec.device)
            t0 = time.perf_counter()
            stats.losses.append(trainer.step())
            _sync(spec.device)
            if i >= spec.warmup:
                stats.step_times_s.append(time.perf_counter() - t0)
            if trainer.engine is not None:
                report = trainer.engine.last_report
                held.append(report.peak_held_bytes)
                stats.engine_activation_bytes = report.activation_bytes
                stats.groups = len(report.per_sample_norms)
        stats.engine_held_bytes = max(held) if held else None
    finally:
        trainer.close()
    return stats


def _fits(spec: RunSpec, batch: int) -> bool:
    """CUDA: whether ``batch`` samples run two steps of this style without running out of memory."""
    import torch

    from .presets import build_workload

    trial = RunSpec(**{**asdict(spec), "batch_size": batch, "warmup": 1, "steps": 1, "search_max_batch": False})
    try:
        work = build_workload(spec.model, batch, spec.seq_len, spec.seed).to(spec.device)
        _measure(trial, work)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        work = None
        torch.cuda.empty_cache()


def search_max_batch(spec: RunSpec) -> int:
    """Largest batch that fits on the CUDA device: doubling from the spec's batch, then bisection."""
    low, high = 0, spec.batch_size or 1
    while high <= spec.max_batch_limit and _fits(spec, high):
        low, high = high, high * 2
    if high > spec.max_batch_limit:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _fits(spec, mid) else (low, mid)
    return low


def run(spec: RunSpec) -> dict[str, Any]:
    """Measure one configuration in this process (the caller makes it a fresh one)."""
    import torch

    from .presets import build_workload

    if spec.threads:
        torch.set_num_threads(spec.threads)
    result: dict[str, Any] = {"spec": asdict(spec), "label": spec.label, "torch_threads": torch.get_num_threads()}
    cuda = spec.device.startswith("cuda")
    try:
        work = build_workload(spec.model, spec.batch_size, spec.seq_len, spec.seed).to(spec.device)
        result["description"] = work.description
        result["batch_size"] = work.batch_size
        result["n_params"] = sum(p.numel() for p in work.model.parameters() if p.requires_grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result["baseline_bytes"] = torch.cuda.memory_allocated()
        else:
            from groupclip.planning.costmodel import runtime_overhead_bytes

            result["overhead_bytes"] = runtime_overhead_bytes(work)
            result["baseline_bytes"] = _rss_bytes()
        reset_ok = cuda or _reset_peak_rss()
        stats = _measure(spec, work)
        result["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes(reset_ok)
        result["memory_measure"] = "cuda max allocated" if cuda else ("peak RSS" if reset_ok else "ru_maxrss")
        result.update(asdict(stats))
        result["median_step_s"] = statistics.median(stats.step_times_s) if stats.step_times_s else None
        if spec.predict and not spec.style.startswith("non-"):
            result["prediction"] = _predict(spec, work)
        if spec.search_max_batch and cuda:
            del work
            torch.cuda.empty_cache()
            result["max_batch"] = search_max_batch(spec)
    except Exception as exc:  # a failing configuration is a result, not a crash of the suite
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result["traceback"] = traceback.format_exc(limit=8)
    return result


def _predict(spec: RunSpec, work) -> dict[str, Any]:
    from groupclip.planning.costmodel import trace_model

    model_cost = trace_model(work, trace_batch=min(2, work.batch_size))
    pred = model_cost.predict(spec.style, work.batch_size, spec.norm_mode, spec.grouping)  # type: ignore[arg-type]
    base = model_cost.base_peak_bytes(work.batch_size)
    return {
        "time_ratio": pred.time_ratio,
        "kept_bytes": pred.kept_bytes,
        "peak_bytes": pred.peak_bytes,
        "base_peak_bytes": base,
        "param_bytes": model_cost.param_bytes,
        "groups": pred.groups,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = RunSpec(**json.loads(argv[0]))
    result = run(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
