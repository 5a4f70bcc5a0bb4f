"""CPU benchmark: groupclip's clipping styles against non-private training on a BERT-base-shaped model.

One command::

    .venv/bin/python benchmarks/bench_clipping.py

measures, for a randomly initialised ``BertForSequenceClassification`` (12 layers, hidden 768, 12 heads,
intermediate 3072, vocab 30522, dropout 0, eager attention), sequence length 128, batch 8, on CPU, one training
step -- forward, loss, backward, ``optimizer.step()`` (plain SGD), ``zero_grad(set_to_none=True)`` -- for

* ``non-private``: plain autograd;
* ``all-layer``, ``groups-4`` (``grouping=4``), ``layer-wise``, ``param-wise``: the same step with a
  :class:`groupclip.ClippingEngine` attached.

Each style runs in its own fresh subprocess (so the peak RSS is that style's), styles are interleaved
round-robin and the whole round is repeated ``--rounds`` times; the reported step time of a style is the median
over rounds of the per-round median over ``--steps`` timed steps. Results go to ``<out-dir>/<name>.json`` and
``<out-dir>/<name>.md``. ``--smoke`` runs a tiny model quickly (used by the test suite).

The DP step deliberately does the same optimizer work as the non-private one (no noise, no division by B), so
the comparison isolates the cost of per-sample clipping.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"

# style name -> ClippingEngine grouping (None: no engine, plain autograd)
STYLES: dict[str, str | int | None] = {
    "non-private": None,
    "all-layer": "all-layer",
    "groups-4": 4,
    "layer-wise": "layer-wise",
    "param-wise": "param-wise",
}
STYLE_ALIASES = {"4": "groups-4", "4-groups": "groups-4", "nonprivate": "non-private", "non_private": "non-private"}

# (style, what, limit): the project's targets, reported as pass/miss, never asserted.
TARGETS = [
    ("layer-wise", "time", 1.10),
    ("all-layer", "time", 1.20),
    ("layer-wise", "peak_rss", 1.10),
]
TARGET_LABELS = {"time": "step time", "peak_rss": "peak RSS"}

BERT_BASE = dict(layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522, seq_len=128, batch_size=8)
SMOKE = dict(
    layers=2,
    hidden=64,
    heads=4,
    intermediate=256,
    vocab=1000,
    seq_len=16,
    batch_size=8,
    rounds=1,
    warmup=1,
    steps=2,
    interleaved_iters=2,
)
MB = 1024 * 1024
LEAK_MB_PER_STEP = 16  # RSS growth per step above which a style is flagged as leaking


@dataclass
class Config:
    layers: int = BERT_BASE["layers"]
    hidden: int = BERT_BASE["hidden"]
    heads: int = BERT_BASE["heads"]
    intermediate: int = BERT_BASE["intermediate"]
    vocab: int = BERT_BASE["vocab"]
    seq_len: int = BERT_BASE["seq_len"]
    batch_size: int = BERT_BASE["batch_size"]
    attn_implementation: str = "eager"
    warmup: int = 2
    steps: int = 7
    rounds: int = 2
    norm_mode: str = "auto"
    max_grad_norm: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    threads: int | None = None
    interleaved_iters: int = 8
    styles: list[str] = field(default_factory=lambda: list(STYLES))

    def is_bert_base(self) -> bool:
        return all(getattr(self, k) == v for k, v in BERT_BASE.items())

    def model_label(self) -> str:
        return (
            f"BertForSequenceClassification (random init): {self.layers} layers, hidden {self.hidden}, "
            f"{self.heads} heads, intermediate {self.intermediate}, vocab {self.vocab}, dropout 0, "
            f"{self.attn_implementation} attention; batch {self.batch_size} x seq {self.seq_len}"
        )


# ---------------------------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def run_worker(cfg: Config, style: str) -> dict:
    """One style in this (fresh) process: build, warm up, time ``cfg.steps`` steps; returns the measurements."""
    import torch

    from groupclip import ClippingEngine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, input_ids, labels, optimizer = build_model_and_batch(cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    baseline_rss = _rss_bytes()
    maxrss_after_build = _maxrss_bytes()

    grouping = STYLES[style]
    engine = None
    if grouping is not None:
        engine = ClippingEngine(
            model, grouping=grouping, max_grad_norm=cfg.max_grad_norm, loss_reduction="mean", norm_mode=cfg.norm_mode
        ).attach()

    times, fwd_times, bwd_times, opt_times, held, losses, rss_after = [], [], [], [], [], [], []
    activation_bytes = None
    n_groups = None
    missing_grads: list[str] = []
    try:
        for i in range(cfg.warmup + cfg.steps):
            t0 = time.perf_counter()
            loss = model(input_ids=input_ids, labels=labels).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if i == 0:
                missing_grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            losses.append(float(loss.detach()))
            del loss
            rss_after.append(_rss_bytes())
            if engine is not None:
                report = engine.last_report
                if i >= cfg.warmup:
                    held.append(report.peak_held_bytes)
                activation_bytes = report.activation_bytes
                n_groups = len(report.per_sample_norms)
            if i >= cfg.warmup:
                times.append(t3 - t0)
                fwd_times.append(t1 - t0)
                bwd_times.append(t2 - t1)
                opt_times.append(t3 - t2)
    finally:
        if engine is not None:
            engine.detach()

    return {
        "style": style,
        "grouping": grouping,
        "torch_threads": torch.get_num_threads(),
        "n_params": n_params,
        "step_times_s": times,
        "median_step_s": statistics.median(times),
        "median_forward_s": statistics.median(fwd_times),
        "median_backward_s": statistics.median(bwd_times),
        "median_optimizer_s": statistics.median(opt_times),
        "baseline_rss_bytes": baseline_rss,
        "maxrss_after_build_bytes": maxrss_after_build,
        "peak_rss_bytes": _maxrss_bytes(),
        "rss_after_step_bytes": rss_after,
        "rss_growth_per_step_bytes": (rss_after[-1] - rss_after[0]) / (len(rss_after) - 1)
        if len(rss_after) > 1
        else 0.0,
        "engine_peak_held_bytes": max(held) if held else None,
        "engine_activation_bytes": activation_bytes,
        "n_groups": n_groups,
        "params_without_grad": missing_grads,
        "losses": losses,
    }


def build_model_and_batch(cfg: Config):
    """The seeded model (train mode), its fixed batch and the SGD optimizer every style uses."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(cfg.seed)
    bert_cfg = BertConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=max(512, cfg.seq_len),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        attn_implementation=cfg.attn_implementation,
    )
    model = BertForSequenceClassification(bert_cfg).train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    input_ids = torch.randint(0, cfg.vocab, (cfg.batch_size, cfg.seq_len), generator=gen)
    labels = torch.randint(0, 2, (cfg.batch_size,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return model, input_ids, labels, optimizer


def run_interleaved_worker(cfg: Config) -> dict:
    """All styles in ONE process, alternating step by step, so slow drift of the machine cancels in the ratios.

    Each iteration times one step of every style (rotated order; an engine is attached for its step and detached
    after); the time ratio of a style is the median over iterations of ``t_style / t_non_private`` of the same
    iteration. Peak memory is not measured here (the separate-process runs give it).
    """
    import torch

    from groupclip import ClippingEngine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, input_ids, labels, optimizer = build_model_and_batch(cfg)
    engines = {
        style: ClippingEngine(model, grouping=grouping, max_grad_norm=cfg.max_grad_norm, norm_mode=cfg.norm_mode)
        for style, grouping in STYLES.items()
        if grouping is not None and style in cfg.styles
    }

    def one_step(style: str) -> float:
        engine = engines.get(style)
        if engine is not None:
            engine.attach()
        try:
            t0 = time.perf_counter()
            model(input_ids=input_ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        finally:
            if engine is not None:
                engine.detach()

    styles = list(cfg.styles)
    for style in styles:  # warm-up
        one_step(style)
    times: dict[str, list[float]] = {style: [] for style in styles}
    for i in range(cfg.interleaved_iters):
        k = i % len(styles)
        for style in styles[k:] + styles[:k]:
            times[style].append(one_step(style))
    return {"times": times, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- driver
def _run_interleaved(cfg: Config) -> dict:
    with tempfile.TemporaryDirectory(prefix="groupclip-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "_interleaved"]
        cmd += ["--_config", json.dumps(asdict(cfg)), "--_result", str(out)]
        env = dict(os.environ)
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"interleaved worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}"}
        return json.loads(out.read_text())


def _run_style(cfg: Config, style: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="groupclip-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", style, "--_config", json.dumps(asdict(cfg))]
        cmd += ["--_result", str(out)]
        env = dict(os.environ)
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0 or not out.exists():
            return {"style": style, "error": f"worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}"}
        return json.loads(out.read_text())


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b) else None


def summarise(cfg: Config, runs: dict[str, list[dict]], interleaved: dict | None = None) -> dict[str, dict]:
    """Per style: medians over rounds, ratios to non-private, and the paired in-process time ratio."""
    summary: dict[str, dict] = {}
    for style in cfg.styles:
        ok = [r for r in runs[style] if "error" not in r]
        if not ok:
            summary[style] = {"error": runs[style][-1].get("error", "no run")}
            continue
        peak = _median([r["peak_rss_bytes"] for r in ok])
        base = _median([r["baseline_rss_bytes"] for r in ok])
        summary[style] = {
            "rounds_ok": len(ok),
            "median_step_s": _median([r["median_step_s"] for r in ok]),
            "median_forward_s": _median([r["median_forward_s"] for r in ok]),
            "median_backward_s": _median([r["median_backward_s"] for r in ok]),
            "median_optimizer_s": _median([r["median_optimizer_s"] for r in ok]),
            "per_round_median_step_s": [r["median_step_s"] for r in ok],
            "peak_rss_bytes": peak,
            "baseline_rss_bytes": base,
            "peak_minus_baseline_bytes": peak - base,
            "rss_growth_per_step_bytes": _median([r["rss_growth_per_step_bytes"] for r in ok]),
            "engine_peak_held_bytes": _median([r["engine_peak_held_bytes"] for r in ok]),
            "engine_activation_bytes": _median([r["engine_activation_bytes"] for r in ok]),
            "n_groups": ok[0]["n_groups"],
            "params_without_grad": ok[0]["params_without_grad"],
        }
    ref = summary.get("non-private")
    for s in summary.values():
        if "error" in s:
            continue
        ok_ref = ref is not None and "error" not in ref
        s["time_ratio"] = _ratio(s["median_step_s"], ref["median_step_s"]) if ok_ref else None
        s["peak_rss_ratio"] = _ratio(s["peak_rss_bytes"], ref["peak_rss_bytes"]) if ok_ref else None
        s["peak_minus_baseline_ratio"] = (
            _ratio(s["peak_minus_baseline_bytes"], ref["peak_minus_baseline_bytes"]) if ok_ref else None
        )
    if interleaved and "times" in interleaved:
        base = interleaved["times"]["non-private"]
        for style, s in summary.items():
            if "error" in s or style not in interleaved["times"]:
                continue
            times = interleaved["times"][style]
            s["interleaved_median_step_s"] = _median(times)
            s["interleaved_time_ratio"] = _median([t / b for t, b in zip(times, base, strict=True)])
    return summary


def check_targets(summary: dict[str, dict]) -> list[dict]:
    """Time targets use the paired in-process ratio when measured (robust to drift), else the per-process one."""
    out = []
    for style, what, limit in TARGETS:
        s = summary.get(style, {})
        if what == "time":
            value = s.get("interleaved_time_ratio", s.get("time_ratio"))
        else:
            value = s.get("peak_rss_ratio")
        status = "n/a" if value is None else ("pass" if value <= limit else "miss")
        out.append({"style": style, "metric": what, "limit": limit, "value": value, "status": status})
    return out


def leak_warnings(summary: dict[str, dict]) -> list[str]:
    """Styles whose RSS grows steadily from step to step (so their peak RSS depends on --steps)."""
    ref = summary.get("non-private", {}).get("rss_growth_per_step_bytes") or 0.0
    out = []
    for style, s in summary.items():
        growth = s.get("rss_growth_per_step_bytes")
        if growth is not None and growth > max(LEAK_MB_PER_STEP * MB, 2 * ref):
            out.append(
                f"{style}: RSS grows by {growth / MB:,.1f} MB per step (non-private: {ref / MB:,.1f} MB); "
                "its peak RSS grows with --steps and is not a steady-state figure."
            )
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import transformers

    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_version": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def _command() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO_ROOT)) if exe.is_relative_to(REPO_ROOT) else str(exe)
    except ValueError:
        exe_s = str(exe)
    script = Path(sys.argv[0]).resolve()
    script_s = str(script.relative_to(REPO_ROOT)) if script.is_relative_to(REPO_ROOT) else sys.argv[0]
    return shlex.join([exe_s, script_s, *sys.argv[1:]])


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / MB:,.1f}"


def render_markdown(result: dict) -> str:
    cfg, summary, machine = result["config"], result["summary"], result["machine"]
    targets_by_style: dict[str, list[str]] = {}
    for t in result["targets"]:
        targets_by_style.setdefault(t["style"], []).append(
            f"{TARGET_LABELS[t['metric']]} ≤{t['limit']:.2f}×: {t['status']}"
        )
    lines = [
        f"# groupclip clipping benchmark ({'BERT-base' if result['bert_base'] else 'custom model'}, CPU)",
        "",
        f"- command: `{result['command']}`",
        f"- model: {result['model']}",
        f"- step: forward + loss + backward + SGD step + zero_grad(set_to_none=True); "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps per run, {cfg['rounds']} round(s) round-robin, "
        f"each style in a fresh subprocess; norm_mode={cfg['norm_mode']}, max_grad_norm={cfg['max_grad_norm']}",
        f"- machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable), torch threads {result['torch_threads']}",
        f"- torch {machine['torch_version']}, transformers {machine['transformers_version']}, "
        f"Python {machine['python_version']}",
        f"- date: {result['date']}; load average at start {result['loadavg_start']}, at end {result['loadavg_end']}",
        "",
        "| style | median step (s) | time × non-private (separate processes) | time × non-private (interleaved, "
        "paired) | peak RSS (MB) | peak RSS × non-private | (peak − baseline) × non-private | engine peak held (MB) "
        "| engine activations (MB) | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for style in cfg["styles"]:
        s = summary[style]
        if "error" in s:
            lines.append(f"| {style} | error | | | | | | | | |")
            continue
        lines.append(
            f"| {style} | {_fmt(s['median_step_s'], '.3f')} | {_fmt(s['time_ratio'], '.3f')} "
            f"| {_fmt(s.get('interleaved_time_ratio'), '.3f')} "
            f"| {_mb(s['peak_rss_bytes'])} | {_fmt(s['peak_rss_ratio'], '.3f')} "
            f"| {_fmt(s['peak_minus_baseline_ratio'], '.3f')} | {_mb(s['engine_peak_held_bytes'])} "
            f"| {_mb(s['engine_activation_bytes'])} | {'; '.join(targets_by_style.get(style, [])) or '—'} |"
        )
    lines += [
        "",
        "Targets (reported, not asserted): "
        + ", ".join(
            f"{t['style']} {TARGET_LABELS[t['metric']]} ≤{t['limit']:.2f}× → "
            f"{t['status']} ({_fmt(t['value'], '.3f', '×')})"
            for t in result["targets"]
        ),
        "",
        "Breakdown (medians, s): ",
        "",
        "| style | forward | backward | optimizer + zero_grad | per-round median step | baseline RSS (MB) "
        "| RSS growth per step (MB) | groups |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for style in cfg["styles"]:
        s = summary[style]
        if "error" in s:
            continue
        rounds = ", ".join(f"{v:.3f}" for v in s["per_round_median_step_s"])
        lines.append(
            f"| {style} | {s['median_forward_s']:.3f} | {s['median_backward_s']:.3f} | {s['median_optimizer_s']:.3f} "
            f"| {rounds} | {_mb(s['baseline_rss_bytes'])} | {_mb(s['rss_growth_per_step_bytes'])} "
            f"| {s['n_groups'] if s['n_groups'] is not None else '—'} |"
        )
    leaks = result.get("leak_warnings", [])
    if leaks:
        lines += ["", "**Warning -- memory keeps growing step after step** (RSS after each step, after zero_grad):", ""]
        lines += [f"- {w}" for w in leaks]
    errors = {style: s["error"] for style, s in summary.items() if "error" in s}
    if errors:
        lines += ["", "Errors:", ""]
        for style, err in errors.items():
            last = err.strip().splitlines()[-1] if err.strip() else err
            lines.append(f"- {style}: `{last}` (full traceback in the JSON)")
    lines += [
        "",
        "Time ratios: *separate processes* compares medians of runs made in different processes and rounds, so it "
        "includes the machine's drift between them; *interleaved, paired* runs every style in one process, one step "
        "each in turn, and takes the median over iterations of the ratio to the non-private step of the same "
        f"iteration ({cfg.get('interleaved_iters', 0)} iterations) -- the time targets use it.",
        "",
        "Peak RSS is the subprocess's `ru_maxrss` (whole process: interpreter, torch, model, optimizer, activations); "
        "baseline is its RSS right after building the model. Engine figures are from `ClipReport` "
        "(`peak_held_bytes`: tensors held beyond what autograd would hold; `activation_bytes`: layer inputs saved "
        "in forward).",
        "",
    ]
    return "\n".join(lines)


def run_benchmark(cfg: Config, out_dir: Path, name: str, quiet: bool = False) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    machine = machine_info()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[str, list[dict]] = {s: [] for s in cfg.styles}
    threads = None
    for r in range(cfg.rounds):
        k = r % len(cfg.styles)
        order = cfg.styles[k:] + cfg.styles[:k]
        for style in order:
            t0 = time.perf_counter()
            res = _run_style(cfg, style)
            runs[style].append(res)
            if "error" in res:
                log(f"[round {r + 1}/{cfg.rounds}] {style}: ERROR\n{res['error']}")
            else:
                threads = res["torch_threads"]
                log(
                    f"[round {r + 1}/{cfg.rounds}] {style}: median step {res['median_step_s']:.3f} s, "
                    f"peak RSS {res['peak_rss_bytes'] / MB:.0f} MB ({time.perf_counter() - t0:.0f} s wall)"
                )
    interleaved = None
    if "non-private" in cfg.styles and cfg.interleaved_iters > 0:
        t0 = time.perf_counter()
        interleaved = _run_interleaved(cfg)
        log(
            f"[interleaved] {cfg.interleaved_iters} iterations of all styles in one process "
            f"({time.perf_counter() - t0:.0f} s wall)"
        )
    summary = summarise(cfg, runs, interleaved)
    result = {
        "command": _command(),
        "date": started.isoformat(timespec="seconds"),
        "bert_base": cfg.is_bert_base(),
        "model": cfg.model_label(),
        "config": asdict(cfg),
        "machine": machine,
        "torch_threads": threads,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "summary": summary,
        "targets": check_targets(summary),
        "leak_warnings": leak_warnings(summary),
        "runs": runs,
        "interleaved": interleaved,
    }
    markdown = render_markdown(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    result["markdown"] = markdown
    return result


def _style_list(text: str) -> list[str]:
    styles = []
    for raw in text.split(","):
        s = STYLE_ALIASES.get(raw.strip(), raw.strip())
        if not s:
            continue
        if s not in STYLES:
            raise argparse.ArgumentTypeError(f"unknown style {raw!r}; choose from {', '.join(STYLES)}")
        if s not in styles:
            styles.append(s)
    if not styles:
        raise argparse.ArgumentTypeError("no style given")
    return styles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--styles", type=_style_list, default=list(STYLES), help=f"comma list of: {', '.join(STYLES)}")
    p.add_argument("--norm-mode", choices=("auto", "ghost", "instantiate"), default="auto")
    p.add_argument("--rounds", type=int, default=None, help="round-robin repetitions of all styles (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 7)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--seq-len", type=int, default=None, help="default 128")
    p.add_argument("--layers", type=int, default=None, help="default 12")
    p.add_argument("--hidden", type=int, default=None, help="default 768")
    p.add_argument("--heads", type=int, default=None, help="default 12")
    p.add_argument("--intermediate", type=int, default=None, help="default 3072")
    p.add_argument("--vocab", type=int, default=None, help="default 30522")
    p.add_argument("--attn", dest="attn_implementation", choices=("eager", "sdpa"), default="eager")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "--interleaved-iters",
        type=int,
        default=None,
        help="iterations of the one-process interleaved timing (default 8; 0 skips it)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help=f"default {DEFAULT_OUT_DIR} (a temp dir with --smoke)")
    p.add_argument("--name", default=None, help="output file stem (default bert_base_cpu, or one naming the shape)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 round, 1 warm-up, 2 steps, temp output dir")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config(
        norm_mode=args.norm_mode,
        attn_implementation=args.attn_implementation,
        max_grad_norm=args.max_grad_norm,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        styles=args.styles,
    )
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(cfg, k, v)
    shape_keys = (
        "rounds",
        "warmup",
        "steps",
        "batch_size",
        "seq_len",
        "layers",
        "hidden",
        "heads",
        "intermediate",
        "interleaved_iters",
    )
    for k in (*shape_keys, "vocab"):
        v = getattr(args, k)
        if v is not None:
            setattr(cfg, k, v)
    if cfg.rounds < 1 or cfg.steps < 1 or cfg.warmup < 0:
        raise SystemExit("--rounds and --steps must be >= 1, --warmup >= 0")
    if cfg.hidden % cfg.heads:
        raise SystemExit(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        cfg = Config(**json.loads(args._config))
        result = run_interleaved_worker(cfg) if args._worker == "_interleaved" else run_worker(cfg, args._worker)
        Path(args._result).write_text(json.dumps(result))
        return 0
    cfg = config_from_args(args)
    if args.name:
        name = args.name
    elif cfg.is_bert_base():
        name = "bert_base_cpu"
    else:
        name = f"bert_L{cfg.layers}_H{cfg.hidden}_T{cfg.seq_len}_B{cfg.batch_size}_cpu"
    if args.out_dir is not None:
        out_dir = args.out_dir
    elif args.smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="groupclip-bench-smoke-"))
    else:
        out_dir = DEFAULT_OUT_DIR
    result = run_benchmark(cfg, out_dir, name, quiet=args.quiet)
    print(result["markdown"])
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")
    return 1 if any("error" in s for s in result["summary"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
