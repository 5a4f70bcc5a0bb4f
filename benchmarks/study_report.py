"""Build the study page (tables + figures) from the committed sweeps in benchmarks/results/studies/.

    .venv/bin/python benchmarks/study_report.py          # writes benchmarks/results/studies/STUDY.md and *.png

It re-reads every finished run (``final.json``, ``metrics.jsonl``) of the sweeps in ``benchmarks/studies/`` and
re-runs nothing. A sweep with no finished run is listed as not run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from groupclip.training.sweep import SweepSpec, collect, load_sweep, point_dir, render_table, summarise

HERE = os.path.dirname(os.path.abspath(__file__))
STUDIES = os.path.join(HERE, "studies")
OUT = os.path.join(HERE, "results", "studies")
GROUPING_ORDER = ["all-layer", "2", "4", "layer-wise", "param-wise"]


def command(spec_file: str) -> str:
    return f"groupclip sweep benchmarks/studies/{spec_file} --jobs 2"


def sweep(spec_file: str) -> SweepSpec | None:
    path = os.path.join(STUDIES, spec_file)
    return load_sweep(path) if os.path.exists(path) else None


def eval_curve(run_dir: str, metric: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("kind") == "eval":
                steps.append(record["step"])
                values.append(record[metric])
    return steps, values


def mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    common = min((len(c[0]) for c in curves), default=0)
    if not common:
        return [], []
    steps = curves[0][0][:common]
    return steps, [statistics.fmean(c[1][i] for c in curves) for i in range(common)]


def fashion_grouping(lines: list[str]) -> None:
    spec = sweep("fashion_grouping.toml")
    rows = summarise(spec) if spec else []
    lines += ["## Fashion-MNIST: accuracy by grouping and clipping (eps = 3, delta = 1e-5)", ""]
    if not rows:
        lines += ["Not run yet.", ""]
        return
    lines += [f"Command: `{command('fashion_grouping.toml')}`", "", render_table(spec, rows), ""]
    # trade-off figure: accuracy vs peak kept memory, one marker per grouping, one colour per clipping variant
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant, marker in (("fixed", "o"), ("adaptive", "s"), ("automatic", "^")):
        chosen = [r for r in rows if r["clipping"] == variant and r["mean"] is not None]
        if not chosen:
            continue
        ax.errorbar(
            [r["peak_kept_mb"] for r in chosen],
            [100 * r["mean"] for r in chosen],
            yerr=[100 * (r["std"] or 0) for r in chosen],
            fmt=marker,
            label=variant,
            capsize=3,
        )
        for r in chosen:
            ax.annotate(
                r["grouping"],
                (r["peak_kept_mb"], 100 * r["mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(
        xlabel="peak memory kept by the clipping engine (MB, batch 2048)",
        ylabel="test accuracy (%)",
        title="Fashion-MNIST, eps=3: accuracy vs memory per grouping",
    )
    ax.legend(title="clipping")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fashion_tradeoff.png"), dpi=120)
    plt.close(fig)
    # convergence: test accuracy vs step per grouping (fixed thresholds), mean over seeds
    by_grouping: dict[str, list] = defaultdict(list)
    for point, _final in collect(spec):
        if point["clipping"] == "fixed":
            by_grouping[point["grouping"]].append(eval_curve(point_dir(spec, point), "test_accuracy"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for grouping in [g for g in GROUPING_ORDER if g in by_grouping]:
        steps, values = mean_curve(by_grouping[grouping])
        ax.plot(steps, [100 * v for v in values], label=f"{grouping} (n={len(by_grouping[grouping])})")
    ax.set(
        xlabel="step (logical batch 2048)",
        ylabel="test accuracy (%)",
        ylim=(60, 90),
        title="Fashion-MNIST, eps=3: convergence per grouping (fixed Abadi)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fashion_convergence.png"), dpi=120)
    plt.close(fig)
    lines += ["![trade-off](fashion_tradeoff.png) ![convergence](fashion_convergence.png)", ""]


def size_points() -> list[dict[str, Any]]:
    """Finished runs of the size sweep, plus width 1 from the grouping sweep (fixed all-layer / layer-wise)."""
    points = []
    size = sweep("fashion_size.toml")
    for point, final in collect(size) if size else []:
        points.append({"width": float(point["width"]), "grouping": point["grouping"], "final": final})
    grouping = sweep("fashion_grouping.toml")
    for point, final in collect(grouping) if grouping else []:
        if point["clipping"] == "fixed" and point["grouping"] in ("all-layer", "layer-wise"):
            points.append({"width": 1.0, "grouping": point["grouping"], "final": final})
    return points


def fashion_size(lines: list[str]) -> None:
    lines += ["## Fashion-MNIST: model size (CNN width), all-layer vs layer-wise (eps = 3)", ""]
    points = size_points()
    if not any(p["width"] != 1.0 for p in points):
        lines += ["Widths 0.5 and 2 not run yet (`" + command("fashion_size.toml") + "`).", ""]
        return
    table = defaultdict(list)
    for p in points:
        table[(p["width"], p["grouping"])].append(p["final"])
    lines += [f"Commands: `{command('fashion_size.toml')}` (widths 0.5, 2); width 1 from the grouping sweep.", ""]
    lines += ["| width | parameters | grouping | n | mean accuracy | runs |", "|---|---:|---|---:|---:|---|"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for grouping in ("all-layer", "layer-wise"):
        rows = sorted((w, finals) for (w, g), finals in table.items() if g == grouping)
        xs, ys = [], []
        for width, finals in rows:
            accs = [f["test_accuracy"] for f in finals]
            params = finals[0]["info"]["parameters"]
            runs = ", ".join(f"{a:.4f}" for a in accs)
            lines.append(
                f"| {width:g} | {params:,} | {grouping} | {len(accs)} | {statistics.fmean(accs):.4f} | {runs} |"
            )
            xs.append(params)
            ys.append(100 * statistics.fmean(accs))
        ax.plot(xs, ys, marker="o", label=grouping)
    ax.set(
        xscale="log",
        xlabel="parameters",
        ylabel="test accuracy (%)",
        title="Fashion-MNIST, eps=3: does the group-wise gap shrink with size?",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fashion_size.png"), dpi=120)
    plt.close(fig)
    lines += ["", "![size](fashion_size.png)", ""]


def simple(lines: list[str], spec_file: str, title: str) -> SweepSpec | None:
    spec = sweep(spec_file)
    rows = summarise(spec) if spec else []
    lines += [f"## {title}", ""]
    if not rows:
        lines += ["Not run yet.", ""]
        return None
    lines += [f"Command: `{command(spec_file)}`", "", render_table(spec, rows), ""]
    return spec


def shakespeare_plot(spec: SweepSpec) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for point, _final in collect(spec):
        steps, values = eval_curve(point_dir(spec, point), "val_perplexity")
        ax.plot(steps, values, label=",".join(point.values()))
    ax.set(xlabel="step", ylabel="validation perplexity", title="Shakespeare char-GPT: perplexity vs epsilon")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "shakespeare_perplexity.png"), dpi=120)
    plt.close(fig)


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    lines: list[str] = [
        "# The accuracy study (generated by `benchmarks/study_report.py`; commentary in docs/RESULTS.md)",
        "",
        "Every row is `mean` over the runs finished so far (`n`), with the sample standard deviation and the",
        "range. `peak kept MB` is the clipping engine's own ledger (tensors kept beyond plain autograd), `peak RSS`",
        "the whole process (data set included). Machine: 2-core Xeon VM, no GPU; runs use 1 thread, 2 at a time.",
        "",
    ]
    fashion_grouping(lines)
    fashion_size(lines)
    simple(lines, "rotten_tomatoes.toml", "Rotten Tomatoes: all-MiniLM-L6-v2 fine-tuning")
    spec = simple(lines, "shakespeare.toml", "Shakespeare: character-level GPT from scratch")
    if spec is not None:
        shakespeare_plot(spec)
        lines += ["![perplexity](shakespeare_perplexity.png)", ""]
    with open(os.path.join(OUT, "STUDY.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
