"""The benchmark suite behind ``groupclip bench``: every configuration in its own process, summarised.

For each model, every configuration (non-private, groupclip's styles, norm-mode variants, Opacus' modes) runs
in a fresh worker process (:mod:`benchmarks.harness.worker`); configurations are interleaved and the whole round is
repeated ``rounds`` times. A configuration's time ratio is the median over rounds of its step time over the
non-private step time of the same round, so slow drift of a noisy machine cancels. With ``noise``, every groupclip
style also runs as users train (``make_private``, noise added) and the non-private step runs with the noise drawn
alone; a noisy style's ``floor_ratio`` is its step over that floor's step in the same round. Memory ratios compare peak
memory (CPU: peak RSS; CUDA: max allocated) with the non-private run. On CPU, a second run of each groupclip style
at half the batch gives the per-sample slope of peak memory, from which the largest batch under a memory cap
follows; on CUDA the worker searches it directly.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .opacus_modes import OPACUS_MODES
from .worker import NOISE_SUFFIX, RESULT_PREFIX, RunSpec

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds benchmarks/harness/
MB = 1024 * 1024
GROUPCLIP_STYLES = ["all-layer", "groups-2", "groups-4", "layer-wise", "param-wise"]
DEFAULT_STYLES = ["non-private", *GROUPCLIP_STYLES]
MODE_VARIANTS = [
    ("all-layer", "ghost"),
    ("all-layer", "instantiate"),
    ("layer-wise", "ghost"),
    ("layer-wise", "instantiate"),
]
OPACUS_STYLES = list(OPACUS_MODES)  # the comparison modes, in opacus_modes order
CPU_SUITE = ["roberta-base", "gpt2-small", "vit-base", "minilm", "cnn"]
GPU_SUITE = ["gpt2-small", "gpt2-medium", "gpt2-large"]
# (issue, models, configuration, measure, limit): the issues' targets, reported as met / missed, never asserted.
# Issue #13: clipping alone against non-private; the DP step with noise against non-private + the noise alone.
TARGET_MODELS_4 = ("roberta-base", "bert-base", "gpt2-small")
TARGET_MODELS_13 = ("roberta-base", "gpt2-small", "vit-base")
TARGETS = [
    (4, TARGET_MODELS_4, "layer-wise", "time_ratio", 1.05),
    (4, TARGET_MODELS_4, "param-wise", "time_ratio", 1.05),
    (4, TARGET_MODELS_4, "layer-wise", "memory_ratio", 1.05),
    (4, TARGET_MODELS_4, "param-wise", "memory_ratio", 1.05),
    (4, TARGET_MODELS_4, "all-layer", "time_ratio", 1.10),
    (13, TARGET_MODELS_13, "layer-wise", "time_ratio", 1.05),
    (13, TARGET_MODELS_13, "param-wise", "time_ratio", 1.05),
    (13, TARGET_MODELS_13, "all-layer", "time_ratio", 1.08),
    *[(13, TARGET_MODELS_13, style + NOISE_SUFFIX, "floor_ratio", 1.05) for style in GROUPCLIP_STYLES],
]
OPACUS_SPEEDUP_TARGET = 1.5


@dataclass
class SuiteConfig:
    """What ``groupclip bench`` runs. ``batch_size``/``seq_len`` None: each preset's default."""

    models: list[str] = field(default_factory=lambda: list(CPU_SUITE))
    styles: list[str] = field(default_factory=lambda: list(DEFAULT_STYLES))
    norm_modes: bool = True
    opacus: bool = True
    batch_size: int | None = None
    seq_len: int | None = None
    warmup: int = 1
    steps: int = 3
    rounds: int = 2
    device: str = "cpu"
    threads: int | None = None
    memory_cap_bytes: int | None = None
    max_batch: bool = True
    worker_timeout_s: int = 1800
    seed: int = 0
    opacus_explicit_positions: bool = False  # also run Opacus with [B, T] position ids (Workload docs)
    planned_grouping: list[list[str]] | None = None  # from ``groupclip plan --out``: measured as style "planned"
    noise: bool = False  # also the DP step with noise per groupclip style, and non-private + the noise alone

    def run_specs(self, model: str) -> list[RunSpec]:
        specs = [self._spec(model, style) for style in self.styles]
        if self.norm_modes:
            specs += [self._spec(model, s, mode) for s, mode in MODE_VARIANTS if s in self.styles]
        if self.planned_grouping is not None:
            specs.append(self._spec(model, "planned", grouping=self.planned_grouping))
        if self.noise:  # no prediction: the cost model does not price the noise
            noisy = [s for s in self.styles if s == "non-private" or s in GROUPCLIP_STYLES]
            specs += [self._spec(model, s, noise=True, predict=False) for s in noisy]
        if self.opacus:
            specs += [self._spec(model, s) for s in OPACUS_STYLES]
            if self.opacus_explicit_positions:
                specs += [self._spec(model, s, opacus_explicit_positions=True) for s in OPACUS_STYLES]
        return specs

    def _spec(self, model: str, style: str, norm_mode: str = "auto", **extra: Any) -> RunSpec:
        return RunSpec(
            model=model,
            style=style,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            norm_mode=norm_mode,
            warmup=self.warmup,
            steps=self.steps,
            seed=self.seed,
            device=self.device,
            threads=self.threads,
            **extra,
        )


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    try:
        import opacus

        info["opacus_version"] = opacus.__version__
    except ImportError:
        pass
    return info


def run_worker(spec: RunSpec, timeout_s: int) -> dict[str, Any]:
    """Run one configuration in a fresh Python process; a crash or timeout is reported as the result's error."""
    cmd = [sys.executable, "-m", "benchmarks.harness.worker", json.dumps(asdict(spec))]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    # the worker imports this package from the repository root, whatever the working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"spec": asdict(spec), "label": spec.label, "error": f"TimeoutExpired: over {timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    how = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"spec": asdict(spec), "label": spec.label, "error": f"WorkerCrashed: {how}: {tail[0]}"}


class Progress:
    """One line per finished run on stderr, with elapsed time and an estimate of what is left."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.perf_counter()

    def update(self, what: str, result: dict[str, Any]) -> None:
        self.done += 1
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        if "error" in result:
            outcome = "FAILED " + result["error"][:90]
        else:
            outcome = f"{result['median_step_s']:.3f} s/step, peak {result['peak_bytes'] / MB:,.0f} MB"
        print(
            f"[{self.done:>3}/{self.total}] {what:<44} {outcome}  ({_clock(elapsed)} elapsed, ~{_clock(eta)} left)",
            file=sys.stderr,
            flush=True,
        )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_suite(cfg: SuiteConfig, quiet: bool = False, on_result: Callable[[dict], None] | None = None) -> dict:
    """Run every configuration of every model; returns the raw runs and the summary (see :func:`summarise`)."""
    plan: list[tuple[str, int, RunSpec]] = []
    for model in cfg.models:
        specs = cfg.run_specs(model)
        for r in range(cfg.rounds):
            rotated = specs[r % len(specs) :] + specs[: r % len(specs)]
            if r > 0:  # the prediction is deterministic: once per configuration
                rotated = [RunSpec(**{**asdict(s), "predict": False}) for s in rotated]
            plan += [("time", r, s) for s in rotated]
        if cfg.max_batch and not cfg.device.startswith("cuda"):
            for style in cfg.styles:
                half = RunSpec(**{**asdict(cfg._spec(model, style)), "warmup": 1, "steps": 1, "predict": False})
                plan.append(("half-batch", 0, half))
    if cfg.max_batch and cfg.device.startswith("cuda"):
        for model in cfg.models:
            for style in cfg.styles:
                plan.append(("max-batch", 0, cfg._spec(model, style, search_max_batch=True, predict=False)))
    progress = Progress(len(plan), quiet)
    runs: list[dict[str, Any]] = []
    half_batch_of: dict[str, int] = {}
    for kind, round_index, spec in plan:
        if kind == "half-batch":
            full = _default_batch(spec, runs)
            spec.batch_size = max(1, full // 2)
            half_batch_of[spec.model] = spec.batch_size
        result = run_worker(spec, cfg.worker_timeout_s)
        result["kind"], result["round"] = kind, round_index
        runs.append(result)
        if on_result:
            on_result(result)
        progress.update(f"{spec.model} {spec.label} ({kind}, round {round_index + 1})", result)
    return {"runs": runs, "summary": summarise(cfg, runs)}


def _default_batch(spec: RunSpec, runs: list[dict]) -> int:
    for r in runs:
        if r["spec"]["model"] == spec.model and "batch_size" in r:
            return r["batch_size"]
    return spec.batch_size or 2


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def summarise(cfg: SuiteConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and configuration: medians, ratios to non-private, predictions and their errors, max batch."""
    cap = cfg.memory_cap_bytes or _default_cap(cfg.device)
    models: dict[str, Any] = {}
    for model in cfg.models:
        timed = [r for r in runs if r["spec"]["model"] == model and r["kind"] == "time"]
        labels = list(dict.fromkeys(r["label"] for r in timed))
        np_by_round = {r["round"]: r for r in timed if r["label"] == "non-private" and "error" not in r}
        floor_by_round = {
            r["round"]: r for r in timed if r["label"] == "non-private" + NOISE_SUFFIX and "error" not in r
        }
        rows: dict[str, Any] = {}
        for label in labels:
            mine = [r for r in timed if r["label"] == label]
            ok = [r for r in mine if "error" not in r]
            if not ok:
                rows[label] = {"label": label, "error": mine[0]["error"]}
                continue
            ratios = [
                r["median_step_s"] / np_by_round[r["round"]]["median_step_s"] for r in ok if r["round"] in np_by_round
            ]
            peak = _median([r["peak_bytes"] for r in ok])
            np_peak = _median([r["peak_bytes"] for r in np_by_round.values()])
            row = {
                "label": label,
                "style": ok[0]["spec"]["style"],
                "norm_mode": ok[0]["spec"]["norm_mode"],
                "batch_size": ok[0]["batch_size"],
                "median_step_s": _median([r["median_step_s"] for r in ok]),
                "time_ratio": _median(ratios),
                "peak_bytes": peak,
                "memory_ratio": peak / np_peak if peak and np_peak else None,
                "baseline_bytes": _median([r["baseline_bytes"] for r in ok]),
                "engine_held_bytes": _median([r["engine_held_bytes"] for r in ok if r.get("engine_held_bytes")]),
                "groups": ok[0].get("groups"),
                "description": ok[0].get("description"),
            }
            pred = next((r["prediction"] for r in ok if r.get("prediction")), None)
            if pred and label.startswith("opacus"):
                row["predicted_time_ratio"] = pred["time_ratio"]  # FLOPs only: Opacus' memory is not modelled
            elif pred:
                row["predicted_time_ratio"] = pred["time_ratio"]
                row["predicted_kept_bytes"] = pred["kept_bytes"]
                held = row["engine_held_bytes"]
                if held and not label.startswith("opacus"):
                    row["kept_error"] = pred["kept_bytes"] / held - 1
                overhead = _median([r.get("overhead_bytes", 0) for r in ok])
                row["predicted_peak_bytes"] = pred["peak_bytes"] + (overhead or 0)
                row["peak_error"] = row["predicted_peak_bytes"] / peak - 1 if peak else None
                if row["time_ratio"]:
                    row["time_ratio_error"] = pred["time_ratio"] / row["time_ratio"] - 1
            if label.endswith(NOISE_SUFFIX) and label != "non-private" + NOISE_SUFFIX:
                row["floor_ratio"] = _median(
                    [
                        r["median_step_s"] / floor_by_round[r["round"]]["median_step_s"]
                        for r in ok
                        if r["round"] in floor_by_round
                    ]
                )
            rows[label] = row
        models[model] = {"rows": rows, "max_batch": _max_batch(cfg, runs, model, rows, cap)}
        models[model]["description"] = next((r["description"] for r in rows.values() if r.get("description")), "")
    return {"models": models, "targets": check_targets(models), "memory_cap_bytes": cap}


def _default_cap(device: str) -> int:
    import psutil

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    return psutil.virtual_memory().total


def _max_batch(cfg: SuiteConfig, runs: list[dict], model: str, rows: dict, cap: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.device.startswith("cuda"):
        for r in runs:
            if r["spec"]["model"] == model and r["kind"] == "max-batch" and "max_batch" in r:
                out[r["label"]] = {"max_batch": r["max_batch"], "method": "search on the device"}
    else:
        for r in runs:
            if r["spec"]["model"] != model or r["kind"] != "half-batch" or "error" in r:
                continue
            full = rows.get(r["label"])
            if not full or "error" in full:
                continue
            b1, b2 = r["batch_size"], full["batch_size"]
            if b2 <= b1:
                continue
            slope = (full["peak_bytes"] - r["peak_bytes"]) / (b2 - b1)
            intercept = full["peak_bytes"] - slope * b2
            entry = {"bytes_per_sample": slope, "intercept_bytes": intercept, "method": "peak-RSS slope"}
            entry["max_batch"] = int((cap - intercept) // slope) if slope > 0 else None
            out[r["label"]] = entry
    base = out.get("non-private", {}).get("max_batch")
    flat = out.get("all-layer", {}).get("max_batch")
    for entry in out.values():
        mb = entry.get("max_batch")
        entry["vs_non_private"] = mb / base if mb and base else None
        entry["vs_all_layer"] = mb / flat if mb and flat else None
    return out


def check_targets(models: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the measured rows (met / missed / not measured)."""
    out = []
    for issue, names, label, measure, limit in TARGETS:
        for model in names:
            if model not in models or (label.endswith(NOISE_SUFFIX) and label not in models[model]["rows"]):
                continue
            row = models[model]["rows"].get(label, {})
            value = row.get(measure)
            out.append(
                {
                    "issue": issue,
                    "model": model,
                    "what": f"{label} {measure.replace('_', ' ')}",
                    "limit": f"<= {limit:.2f}x",
                    "value": value,
                    "met": None if value is None else value <= limit,
                }
            )
    for model, data in models.items():
        rows = data["rows"]
        ours = [
            r
            for k, r in rows.items()
            if k.startswith("all-layer") and not k.endswith(NOISE_SUFFIX) and r.get("median_step_s")
        ]  # Opacus' modes run without noise
        theirs = [r for k, r in rows.items() if k.startswith("opacus") and r.get("median_step_s")]
        if not ours or not theirs:
            continue
        fastest_ours = min(ours, key=lambda r: r["median_step_s"])
        fastest_theirs = min(theirs, key=lambda r: r["median_step_s"])
        speedup = fastest_theirs["time_ratio"] / fastest_ours["time_ratio"]
        out.append(
            {
                "issue": 4,
                "model": model,
                "what": f"speedup of {fastest_ours['label']} over {fastest_theirs['label']} (fastest of each)",
                "limit": f">= {OPACUS_SPEEDUP_TARGET:.1f}x",
                "value": speedup,
                "met": speedup >= OPACUS_SPEEDUP_TARGET,
            }
        )
    return out


def command_line(argv: list[str]) -> str:
    return "groupclip bench " + " ".join(shlex.quote(a) for a in argv)


def write_results(result: dict[str, Any], out_dir: Path, name: str, stamp_finished: bool = True) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and the plots under ``out_dir``; returns the paths written.

    ``stamp_finished``: record now as the time the runs finished (False when only re-summarising old runs).
    """
    from .report import make_plots, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    if stamp_finished:
        result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    paths.update(make_plots(result, out_dir, name))
    result["plots"] = {k: p.name for k, p in paths.items() if k not in ("json", "markdown")}
    paths["markdown"].write_text(render_markdown(result))
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    return paths
