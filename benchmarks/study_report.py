"""Build the study page (tables + figures) from the committed sweeps in benchmarks/results/studies/.

    .venv/bin/python benchmarks/study_report.py          # writes benchmarks/results/studies/STUDY.md and *.png

It re-reads every finished run (``final.json``, ``metrics.jsonl``) of the sweeps in ``benchmarks/studies/`` and
re-runs nothing. A sweep with no finished run is listed as not run. The Fashion-MNIST grid and size study come from
the GPU sweeps (``*_gpu.toml``); the CPU grid ``fashion_grouping`` is shown as a cross-check of the cells both have.
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
CLIPPING_MARKERS = {"fixed": "o", "adaptive": "s", "automatic": "^"}
GRID, CPU_GRID, SIZE = "fashion_grouping_gpu.toml", "fashion_grouping.toml", "fashion_size_gpu.toml"
TEXT_SIZES = "shakespeare_sizes.toml"
ADAPTIVE_TOTAL = os.path.join(OUT, "fashion_adaptive_total")  # run folders <folder>-adaptive-seed<S>
# run folder prefix -> (the grid's grouping value, label)
ADAPTIVE_FOLDERS = {
    "blocks2": ("2", "2 blocks"),
    "blocks4": ("4", "4 blocks"),
    "layer-wise": ("layer-wise", "layer-wise"),
    "param-wise": ("param-wise", "param-wise"),
}
TEXT_CLIPPINGS = ("all-layer", "layer-wise", "layer-wise-adaptive")
Row = dict[str, Any]


def command(spec_file: str, jobs: int = 2, only: str = "") -> str:
    return f"`groupclip sweep benchmarks/studies/{spec_file} --jobs {jobs}{' ' + only if only else ''}`"


def sweep(spec_file: str) -> SweepSpec | None:
    path = os.path.join(STUDIES, spec_file)
    return load_sweep(path) if os.path.exists(path) else None


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def devices(finals: list[dict[str, Any]]) -> str:
    """The devices the runs report (runs that predate the ``device`` field ran on the 2-core CPU)."""
    names = {f.get("gpu") or ("CPU" if f.get("device", "cpu") == "cpu" else f["device"]) for f in finals}
    return ", ".join(sorted(names))


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


def save_figure(fig, ax, name: str, alt: str, lines: list[str]) -> None:
    """Legend and grid, write ``OUT/name``, link it from the page."""
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, name), dpi=120)
    plt.close(fig)
    lines += ["", f"![{alt}]({name})", ""]


def accuracy_table(axes: list[str], rows: list[Row]) -> list[str]:
    """Mean/std/min/max of the headline in percent, with epsilon, engine-kept memory and wall time per run."""
    out = [
        "| " + " | ".join([*axes, "n", "mean %", "std", "min", "max", "epsilon", "kept MB", "min/run"]) + " |",
        "|" + "---|" * len(axes) + "---:|" * 8,
    ]
    for r in rows:
        cells = [r[a] for a in axes] + [str(r["n"]), pct(r["mean"]), pct(r["std"]), pct(r["min"]), pct(r["max"])]
        cells += [num(r["epsilon"], 2), num(r["peak_kept_mb"]), num(r["wall_time_min"])]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def ordered(rows: list[Row]) -> list[Row]:
    return sorted(
        rows, key=lambda r: (GROUPING_ORDER.index(r["grouping"]), list(CLIPPING_MARKERS).index(r["clipping"]))
    )


def tradeoff_plot(rows: list[Row]) -> None:
    """Accuracy vs engine-kept memory; colour = grouping, marker = clipping; same-memory points spread sideways."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    colours = {g: f"C{i}" for i, g in enumerate(GROUPING_ORDER)}
    for r in rows:
        same_mb = sorted(
            {q["grouping"] for q in rows if q["peak_kept_mb"] == r["peak_kept_mb"]}, key=GROUPING_ORDER.index
        )
        shift = 0.6 * (same_mb.index(r["grouping"]) - (len(same_mb) - 1) / 2)
        shift += 0.15 * (list(CLIPPING_MARKERS).index(r["clipping"]) - 1)
        ax.errorbar(
            r["peak_kept_mb"] + shift,
            100 * r["mean"],
            yerr=100 * (r["std"] or 0),
            fmt=CLIPPING_MARKERS[r["clipping"]],
            color=colours[r["grouping"]],
            capsize=3,
            markersize=6,
        )
    for grouping, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=f"grouping: {grouping}")
    for clipping, marker in CLIPPING_MARKERS.items():
        ax.plot([], [], marker, color="grey", label=f"clipping: {clipping}")
    ax.set(
        xlabel="peak memory kept by the clipping engine (MB, batch 2048; equal values drawn side by side)",
        ylabel="test accuracy (%), mean ± std over 3 seeds",
        title="Fashion-MNIST, eps=3 (H100): accuracy vs kept memory",
    )
    ax.legend(fontsize=8, ncol=2, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fashion_tradeoff.png"), dpi=120)
    plt.close(fig)


def convergence_plot(spec: SweepSpec) -> None:
    by_grouping: dict[str, list[tuple[list[int], list[float]]]] = defaultdict(list)
    for point, _final in collect(spec):
        if point["clipping"] == "fixed":
            by_grouping[point["grouping"]].append(eval_curve(point_dir(spec, point), "test_accuracy"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for grouping in [g for g in GROUPING_ORDER if g in by_grouping]:
        steps, values = mean_curve(by_grouping[grouping])
        ax.plot(steps, [100 * v for v in values], label=f"{grouping} (n={len(by_grouping[grouping])})")
    ax.set(
        xlabel="step (logical batch 2048)",
        ylabel="test accuracy (%), mean over seeds",
        ylim=(75, 88),
        title="Fashion-MNIST, eps=3 (H100): convergence per grouping (fixed Abadi)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fashion_convergence.png"), dpi=120)
    plt.close(fig)


def fashion_grouping(lines: list[str]) -> None:
    spec = sweep(GRID)
    rows = ordered(summarise(spec)) if spec else []
    lines += ["## Fashion-MNIST: accuracy by grouping and clipping (eps = 3, delta = 1e-5)", ""]
    if not spec or not rows:
        lines += [f"Not run yet ({command(GRID, 14)}).", ""]
        return
    finals = [f for _p, f in collect(spec)]
    lines += [f"Command: {command(GRID, 14)}. Device: {devices(finals)}.", ""]
    lines += accuracy_table(["grouping", "clipping"], rows)
    tradeoff_plot(rows)
    convergence_plot(spec)
    lines += ["![trade-off](fashion_tradeoff.png) ![convergence](fashion_convergence.png)", ""]


def accuracies(spec_file: str) -> dict[tuple[str, str, str], float]:
    spec = sweep(spec_file)
    return {(p["grouping"], p["clipping"], p["seed"]): f["test_accuracy"] for p, f in (collect(spec) if spec else [])}


def cpu_cross_check(lines: list[str]) -> None:
    cpu, gpu = accuracies(CPU_GRID), accuracies(GRID)
    cells = sorted({k[:2] for k in cpu}, key=lambda c: (GROUPING_ORDER.index(c[0]), list(CLIPPING_MARKERS).index(c[1])))
    lines += ["## Fashion-MNIST: CPU vs H100 cross-check (same recipe, same seeds)", ""]
    if not cells:
        lines += ["No CPU runs.", ""]
        return
    fixed = command(CPU_GRID, 2, "--only grouping=all-layer,layer-wise --only clipping=fixed")
    seed0 = command(CPU_GRID, 2, "--only grouping=all-layer --only seed=0")
    lines += [
        f"CPU: 2-core Xeon VM, 1 thread per run, 2 at a time: {fixed} and {seed0}. H100: {command(GRID, 14)}.",
        "",
        "| grouping | clipping | seeds | CPU mean % | H100 mean % | H100 - CPU | CPU runs | H100 runs |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for grouping, clipping in cells:
        seeds = sorted(s for g, c, s in cpu if (g, c) == (grouping, clipping) and (g, c, s) in gpu)
        a = [cpu[(grouping, clipping, s)] for s in seeds]
        b = [gpu[(grouping, clipping, s)] for s in seeds]
        if not seeds:
            continue
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        lines.append(
            f"| {grouping} | {clipping} | {','.join(seeds)} | {pct(ma)} | {pct(mb)} | {100 * (mb - ma):+.2f} | "
            f"{', '.join(pct(x) for x in a)} | {', '.join(pct(x) for x in b)} |"
        )
    lines.append("")


def size_points() -> dict[tuple[float, str], list[dict[str, Any]]]:
    """Finished runs of the size sweep, plus width 1 from the GPU grid (fixed all-layer / layer-wise, same recipe)."""
    table: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    size = sweep(SIZE)
    for point, final in collect(size) if size else []:
        table[(float(point["width"]), point["grouping"])].append(final)
    grid = sweep(GRID)
    for point, final in collect(grid) if grid else []:
        if point["clipping"] == "fixed" and point["grouping"] in ("all-layer", "layer-wise"):
            table[(1.0, point["grouping"])].append(final)
    return table


def fashion_size(lines: list[str]) -> None:
    lines += ["## Fashion-MNIST: model size (CNN width), all-layer vs layer-wise (eps = 3)", ""]
    table = size_points()
    if not any(width != 1.0 for width, _g in table):
        lines += [f"Widths 0.5, 2, 4 not run yet ({command(SIZE, 14)}).", ""]
        return
    finals = [f for runs in table.values() for f in runs]
    lines += [
        f"Commands: {command(SIZE, 14)} (widths 0.5, 2, 4); width 1 is the grid's fixed all-layer / layer-wise runs "
        f"({command(GRID, 14)}). Device: {devices(finals)}. gap = layer-wise mean - all-layer mean.",
        "",
        "| width | parameters | grouping | n | mean % | std | kept MB | gap (points) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for width, grouping in sorted(table, key=lambda k: (k[0], k[1] != "all-layer")):
        runs = table[(width, grouping)]
        accs = [f["test_accuracy"] for f in runs]
        mean, std = statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        params = runs[0]["info"]["parameters"]
        base = table.get((width, "all-layer"))
        gap = "-"
        if grouping != "all-layer" and base:
            gap = f"{100 * (mean - statistics.fmean(f['test_accuracy'] for f in base)):+.2f}"
        lines.append(
            f"| {width:g} | {params:,} | {grouping} | {len(accs)} | {pct(mean)} | {pct(std)} | "
            f"{num(runs[0].get('peak_kept_mb'))} | {gap} |"
        )
        series[grouping].append((params, 100 * mean, 100 * std))
    for i, (grouping, points) in enumerate(series.items()):
        shift = 1.03 if i else 0.97  # spread the two groupings a little so their error bars do not overlap
        ax.errorbar(
            [p * shift for p, _m, _s in points],
            [m for _p, m, _s in points],
            yerr=[s for _p, _m, s in points],
            marker="o",
            capsize=3,
            label=grouping,
        )
    ax.set(
        xscale="log",
        xlabel="parameters (CNN width 0.5, 1, 2, 4)",
        ylabel="test accuracy (%), mean ± std over 3 seeds",
        title="Fashion-MNIST, eps=3 (H100): all-layer vs layer-wise by size",
    )
    save_figure(fig, ax, "fashion_size.png", "size", lines)


def simple(lines: list[str], spec_file: str, title: str, percent: bool = True) -> SweepSpec | None:
    """A sweep's table: accuracies in percent, any other headline (perplexity) as the sweep's own table."""
    spec = sweep(spec_file)
    rows = summarise(spec) if spec else []
    lines += [f"## {title}", ""]
    if not spec or not rows:
        lines += ["Not run yet.", ""]
        return None
    finals = [f for _p, f in collect(spec)]
    axes = [a.name for a in spec.axes if a.name != spec.repeat]
    table = accuracy_table(axes, rows) if percent else [render_table(spec, rows), ""]
    lines += [f"Command: {command(spec_file)}. Device: {devices(finals)}.", "", *table]
    return spec


def rotten_tomatoes(lines: list[str]) -> None:
    spec = simple(lines, "rotten_tomatoes.toml", "Rotten Tomatoes: all-MiniLM-L6-v2 fine-tuning (BitFit, 1 seed)")
    if spec is None:
        return
    acc = {p["setting"]: f["test_accuracy"] for p, f in collect(spec)}
    series = [(eps, acc.get(s)) for eps, s in (("1", "all-layer-eps1"), ("3", "all-layer"), ("8", "all-layer-eps8"))]
    lines += [
        "All-layer, 2 epochs, by epsilon: "
        + " / ".join(f"eps {eps}: {pct(a)}%" for eps, a in series)
        + f"; majority class 59.0%; non-private {pct(acc.get('non-private'))}% (full fine-tuning), "
        f"{pct(acc.get('non-private-bitfit'))}% (BitFit).",
        "",
    ]


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


def adaptive_total(lines: list[str]) -> None:
    """Adaptive thresholds that keep the total (CPU runs, one folder per seed) against the grid's fixed and
    free-floating adaptive cells of the same grouping and all-layer fixed (the table of docs/RESULTS.md, 2b)."""
    lines += ["## Fashion-MNIST: adaptive thresholds that keep the total, by grouping (eps = 3)", ""]
    grid = sweep(GRID)
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for point, final in collect(grid) if grid else []:
        cells[(point["grouping"], point["clipping"])].append(100 * final["test_accuracy"])
    base = statistics.fmean(cells[("all-layer", "fixed")]) if cells[("all-layer", "fixed")] else None
    lines += [
        "Command (seed S, CPU, one thread): `groupclip train --recipe fashion-mnist-cnn --grouping G --adaptive --seed "
        "S --threads 1 --out benchmarks/results/studies/fashion_adaptive_total/<folder>-adaptive-seedS`. Fixed and "
        f"free-floating: the grid ({command(GRID, 14)}); vs all-layer fixed: against its mean, {num(base, 2)}%.",
        "",
        "| grouping | seeds | adaptive, total kept: mean ± std | min – max | fixed | free-floating "
        "| vs all-layer fixed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for folder, (grouping, label) in ADAPTIVE_FOLDERS.items():
        runs = []
        for seed in range(10):
            path = os.path.join(ADAPTIVE_TOTAL, f"{folder}-adaptive-seed{seed}", "final.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    runs.append((seed, 100 * json.load(handle)["test_accuracy"]))
        if not runs:
            continue
        accs = [a for _s, a in runs]
        mean = statistics.fmean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        fixed, free = cells[(grouping, "fixed")], cells[(grouping, "adaptive")]
        fixed_cell = f"{statistics.fmean(fixed):.2f}% ± {statistics.stdev(fixed):.2f}" if len(fixed) > 1 else "-"
        free_cell = f"{statistics.fmean(free):.2f}%" if free else "-"
        versus = f"{mean - base:+.2f}" if base is not None else "-"
        lines.append(
            f"| {label} | {len(runs)} ({','.join(str(s) for s, _a in runs)}) | **{mean:.2f}%**{spread} | "
            f"{min(accs):.2f} – {max(accs):.2f} | {fixed_cell} | {free_cell} | {versus} |"
        )
    lines.append("")


def shakespeare_sizes(lines: list[str]) -> None:
    """Validation perplexity by width and clipping, and the gap of layer-wise (fixed, adaptive) to all-layer."""
    lines += ["## Shakespeare char-GPT: model size (width), all-layer vs layer-wise fixed / adaptive (eps = 8)", ""]
    spec = sweep(TEXT_SIZES)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for point, final in collect(spec) if spec else []:
        runs[(point["width"], point["clipping"])].append(final)
    if not runs:
        lines += [f"Not run yet ({command(TEXT_SIZES)}).", ""]
        return
    finals = [f for group in runs.values() for f in group]
    lines += [
        f"Command: {command(TEXT_SIZES)}. Device: {devices(finals)}. Validation perplexity (lower is better), mean ± "
        "std over seeds; gap = layer-wise mean - all-layer mean (positive: layer-wise is worse), with the seeds "
        "paired (same seed, same data order) for the spread of the gap.",
        "",
        "| width | parameters | clipping | n | perplexity | std | gap | paired gap std | epsilon | min/run |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    parameters = {w: group[0]["info"]["parameters"] for (w, _c), group in runs.items()}
    widths = sorted(parameters, key=parameters.get)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for width in widths:
        base = {f["seed"]: f["val_perplexity"] for f in runs.get((width, "all-layer"), [])}
        for clipping in TEXT_CLIPPINGS:
            group = runs.get((width, clipping))
            if not group:
                continue
            ppl = [f["val_perplexity"] for f in group]
            mean, std = statistics.fmean(ppl), statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            params = parameters[width]
            gap = paired = "-"
            if clipping != "all-layer" and base:
                gap = f"{mean - statistics.fmean(base.values()):+.2f}"
                diffs = [f["val_perplexity"] - base[f["seed"]] for f in group if f["seed"] in base]
                spread = statistics.stdev(diffs) if len(diffs) > 1 else None
                paired = num(spread, 2)
                series[clipping].append((params, statistics.fmean(diffs) if diffs else 0.0, spread or 0.0))
            lines.append(
                f"| {width} | {params:,} | {clipping} | {len(ppl)} | {mean:.2f} | {std:.2f} | {gap} | {paired} | "
                f"{num(group[0]['epsilon'], 2)} | {num(statistics.fmean(f['wall_time_s'] for f in group) / 60)} |"
            )
    for clipping, points in series.items():
        ax.errorbar(
            [p for p, _m, _s in points],
            [m for _p, m, _s in points],
            yerr=[s for _p, _m, s in points],
            marker="o",
            capsize=3,
            label=f"{clipping} - all-layer",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(
        xscale="log",
        xlabel="parameters",
        ylabel="perplexity gap (paired by seed)",
        title="Shakespeare char-GPT, eps=8: layer-wise minus all-layer",
    )
    save_figure(fig, ax, "shakespeare_size_gap.png", "size gap", lines)


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    lines: list[str] = [
        "# The accuracy study (generated by `benchmarks/study_report.py`; commentary in docs/RESULTS.md)",
        "",
        "Every row is the mean over the runs finished so far (`n`), with the sample standard deviation and the",
        "range, in percent. `kept MB` is the clipping engine's own ledger (tensors kept beyond plain autograd,",
        "`peak_kept_mb`), `min/run` the wall time of one run. Each section names its command and the device its runs",
        "report in `final.json`: CPU is the 2-core Xeon VM (1 thread per run, 2 at a time); the H100 (one NVIDIA H100",
        "80GB HBM3) ran 12-14 runs at a time.",
        "",
    ]
    fashion_grouping(lines)
    cpu_cross_check(lines)
    fashion_size(lines)
    adaptive_total(lines)
    rotten_tomatoes(lines)
    spec = simple(lines, "shakespeare.toml", "Shakespeare: character-level GPT from scratch", percent=False)
    if spec is not None:
        shakespeare_plot(spec)
        lines += ["![perplexity](shakespeare_perplexity.png)", ""]
    shakespeare_sizes(lines)
    with open(os.path.join(OUT, "STUDY.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
