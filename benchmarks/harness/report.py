"""Markdown tables and plots of a ``groupclip bench`` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1024 * 1024
NOISE_TEXT = (
    "A configuration without a suffix is clipping alone (the engine; the optimizer steps on clipped gradients). "
    "*+noise* is the DP step as users run it: `make_private` with noise multiplier 1 (clipping, noise, accounting); "
    "*non-private+noise* is the non-private step plus the noise drawn alone (N(0, 1) of every trainable parameter's "
    "size, one draw per parameter, scaled and added to its gradient), the floor no private step avoids; *x floor* is "
    "a noisy step over that floor's step in the same round (median over rounds). "
)


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def render_markdown(result: dict[str, Any]) -> str:
    cfg, machine, summary = result["config"], result["machine"], result["summary"]
    lines = [
        f"# groupclip bench: {result.get('name', '')}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine.get('gpu') or machine['cpu_model']}; {machine['usable_cores']} usable cores, "
        f"{machine['memory_bytes'] / 2**30:.0f} GiB RAM; torch {machine['torch_version']}, transformers "
        f"{machine.get('transformers_version', '-')}, opacus {machine.get('opacus_version', 'not installed')}, "
        f"Python {machine['python_version']}. Device: {cfg['device']}.",
        "",
        f"Each configuration ran in its own process: {cfg['warmup']} warm-up step(s), then the median of "
        f"{cfg['steps']} timed steps (forward, loss, backward, SGD step, zero_grad); {cfg['rounds']} interleaved "
        "round(s). *time x* is the median over rounds of the step time over the non-private step time of the same "
        "round; *memory* is the peak "
        + ("RSS of the process" if cfg["device"] == "cpu" else "CUDA memory allocated")
        + ". *kept* is what the engine keeps beyond non-private autograd (its memory ledger), *predicted* the "
        "analytic cost model (`groupclip.planning.costmodel`: parameter-layer FLOPs; kept bytes by replaying the "
        "backward pass). "
        + (NOISE_TEXT if cfg.get("noise") else "No noise is added by any configuration (clipping cost only). ")
        + f"Started {result.get('started', '-')}, finished {result.get('finished', '-')}.",
        "",
    ]
    for model, data in summary["models"].items():
        lines += [f"## {model}", "", data.get("description", ""), ""]
        lines.append(
            "| configuration | step (s) | time x | x floor | predicted time x | peak (MB) | memory x | kept (MB) | "
            "predicted kept (MB) | kept error | predicted peak (MB) | peak error |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        failures = []
        for label, row in data["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | failed | | | | | | | | | | |")
                failures.append(f"- **{label}** failed: `{row['error']}`")
                continue
            lines.append(
                f"| {label} | {row['median_step_s']:.3f} | {_x(row['time_ratio'])} | {_x(row.get('floor_ratio'))} | "
                f"{_x(row.get('predicted_time_ratio'))} | {_mb(row['peak_bytes'])} | {_x(row['memory_ratio'])} | "
                f"{_mb(row.get('engine_held_bytes'))} | {_mb(row.get('predicted_kept_bytes'))} | "
                f"{_pct(row.get('kept_error'))} | {_mb(row.get('predicted_peak_bytes'))} | "
                f"{_pct(row.get('peak_error'))} |"
            )
        lines.append("")
        lines += failures + ([""] if failures else [])
        if data["max_batch"]:
            lines += [
                f"Largest batch under a {summary['memory_cap_bytes'] / 2**30:.1f} GiB memory cap:",
                "",
                "| style | bytes per sample (MB) | max batch | x non-private | x all-layer | method |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for label, entry in data["max_batch"].items():
                per_sample = entry.get("bytes_per_sample")
                lines.append(
                    f"| {label} | {_mb(per_sample) if per_sample else '-'} | {entry.get('max_batch', '-')} | "
                    f"{_x(entry.get('vs_non_private'))} | {_x(entry.get('vs_all_layer'))} | {entry['method']} |"
                )
            lines.append("")
    if summary["targets"]:
        lines += ["## Targets", "", "| issue | model | measure | target | measured | |", "|---|---|---|---|---:|---|"]
        for t in summary["targets"]:
            verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**")
            issue = f"#{t['issue']}" if "issue" in t else "-"
            lines.append(f"| {issue} | {t['model']} | {t['what']} | {t['limit']} | {_x(t['value'])} | {verdict} |")
        lines.append("")
    plots = result.get("plots", {})
    if plots:
        lines += ["## Plots", ""] + [f"![{kind}]({name})" for kind, name in plots.items()] + [""]
    return "\n".join(lines)


def make_plots(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Time and memory ratio by configuration; kept and peak memory vs the number of groups. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    models = result["summary"]["models"]
    paths: dict[str, Path] = {}
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.2 * len(models)), squeeze=False)
    for ax, (model, data) in zip(axes[:, 0], models.items(), strict=True):
        rows = [r for r in data["rows"].values() if "error" not in r]
        labels = [r["label"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["time_ratio"] or 0 for r in rows], 0.4, label="time x non-private")
        ax.bar([x + 0.2 for x in xs], [r["memory_ratio"] or 0 for r in rows], 0.4, label="peak memory x non-private")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths["ratios"] = out_dir / f"{name}_ratios.png"
    fig.savefig(paths["ratios"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, (model, data) in zip(axes[0], models.items(), strict=True):
        rows = [
            r
            for r in data["rows"].values()
            if "error" not in r and r.get("groups") and r["norm_mode"] == "auto" and r["style"] != "planned"
        ]
        rows.sort(key=lambda r: r["groups"])
        groups = [r["groups"] for r in rows]
        ax.plot(groups, [(r.get("engine_held_bytes") or 0) / MB for r in rows], "o-", label="kept (measured)")
        ax.plot(groups, [(r.get("predicted_kept_bytes") or 0) / MB for r in rows], "x--", label="kept (predicted)")
        ax.plot(groups, [r["peak_bytes"] / MB for r in rows], "s-", label="peak memory")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of groups")
        ax.set_ylabel("MB")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["memory_vs_groups"] = out_dir / f"{name}_memory_vs_groups.png"
    fig.savefig(paths["memory_vs_groups"], dpi=110)
    plt.close(fig)
    return paths
