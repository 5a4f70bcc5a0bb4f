"""``groupclip sweep``: a grid of one recipe with overrides, each point a run folder, resumable, one results table.

A sweep is a small TOML file (or the same given with ``--recipe/--axis/--set`` flags):

    name = "fashion-grouping"
    recipe = "fashion-mnist-cnn"
    set = { "run.threads" = 1 }               # overrides shared by every run
    repeat = "seed"                           # the axis averaged over in the table (mean, std, min, max)

    [[axes]]                                  # an axis of values for one field ...
    name = "grouping"
    key = "clipping.grouping"
    values = ["all-layer", 2, 4, "layer-wise", "param-wise"]

    [[axes]]                                  # ... or of named variants that set several fields
    name = "clipping"
    variants = { fixed = { "clipping.adaptive" = false }, adaptive = { "clipping.adaptive" = true } }

Each grid point runs ``groupclip train`` in its own process (``--jobs`` at a time) into
``<out>/<axis>=<value>,.../``; a point whose ``final.json`` exists is skipped, so an interrupted sweep resumes
where it stopped, and a point killed mid-run continues from its last checkpoint (``groupclip train --resume``).
``results.md`` / ``results.json`` in ``<out>`` aggregate every finished point.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .recipe import RecipeError, apply_overrides, load_recipe, parse_override, parse_value


@dataclass
class Axis:
    """One axis of the grid: ``points`` maps each value's label to the overrides it applies."""

    name: str
    points: dict[str, dict[str, Any]]


@dataclass
class SweepSpec:
    name: str
    recipe: str
    axes: list[Axis]
    common: dict[str, Any] = field(default_factory=dict)
    repeat: str | None = None
    out: str | None = None

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("runs", "sweeps", self.name)


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def axis_from_table(table: dict[str, Any], source: str) -> Axis:
    name = table.get("name")
    if not isinstance(name, str):
        raise RecipeError(f"{source}: every [[axes]] needs a name.")
    if "variants" in table:
        variants = table["variants"]
        if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
            raise RecipeError(f"{source}: axis {name!r}: variants must map labels to tables of overrides.")
        for label, overrides in variants.items():
            if any(isinstance(v, dict) for v in overrides.values()):  # `a.b = {...}` is TOML for a = {b = {...}}
                raise RecipeError(
                    f"{source}: axis {name!r}: variant {label!r} holds a nested table; a label with a dot must be "
                    'quoted ("R0.1" = { ... }).'
                )
        return Axis(name, {str(k): dict(v) for k, v in variants.items()})
    if not isinstance(table.get("key"), str) or not isinstance(table.get("values"), list) or not table["values"]:
        raise RecipeError(f"{source}: axis {name!r} needs key = 'section.field' and a non-empty values list.")
    return Axis(name, {_label(v): {table["key"]: v} for v in table["values"]})


def load_sweep(path: str) -> SweepSpec:
    """Read and check a sweep file (every grid point's overrides are checked against the recipe up front)."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"Cannot read sweep file {path}: {exc}") from exc
    known = {"name", "recipe", "set", "repeat", "axes", "out"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}; a sweep has {sorted(known)}.")
    if not isinstance(raw.get("recipe"), str):
        raise RecipeError(f"{path}: needs recipe = '<bundled name or path>'.")
    spec = SweepSpec(
        name=str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]),
        recipe=raw["recipe"],
        axes=[axis_from_table(t, path) for t in raw.get("axes", [])],
        common=dict(raw.get("set", {})),
        repeat=raw.get("repeat"),
        out=raw.get("out"),
    )
    check_sweep(spec)
    return spec


def sweep_from_flags(name: str, recipe: str, axes: list[str], common: list[str], repeat: str | None) -> SweepSpec:
    """A sweep from ``--axis key=v1,v2`` flags (the axis is named by the field) and ``--set key=value`` flags."""
    parsed = []
    for text in axes:
        if "=" not in text:
            raise RecipeError(f"--axis {text!r}: expected section.field=value1,value2,...")
        key, values = text.split("=", 1)
        field_name = key.split(".")[-1]
        parsed.append(Axis(field_name, {_label(parse_value(v)): {key: parse_value(v)} for v in values.split(",")}))
    overrides = dict(parse_override(text) for text in common)
    spec = SweepSpec(name=name, recipe=recipe, axes=parsed, common=overrides, repeat=repeat)
    check_sweep(spec)
    return spec


def add_shared_overrides(spec: SweepSpec, texts: list[str]) -> None:
    """Apply ``--set key=value`` flags to a sweep file's shared overrides (after the file's own ``set``; each
    point's axis values still apply last), checked against the recipe."""
    if not texts:
        return
    spec.common.update(parse_override(text) for text in texts)
    check_sweep(spec)


def check_sweep(spec: SweepSpec) -> None:
    names = [a.name for a in spec.axes]
    if len(set(names)) != len(names):
        raise RecipeError(f"Sweep {spec.name!r}: axis names repeat: {names}.")
    if spec.repeat is not None and spec.repeat not in names:
        raise RecipeError(f"Sweep {spec.name!r}: repeat = {spec.repeat!r} is not an axis ({names}).")
    base = load_recipe(spec.recipe)
    for point in grid(spec):
        apply_overrides(base, overrides_of(spec, point))


def grid(spec: SweepSpec, only: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
    """The grid points (``{axis: label}``), in axis order, restricted to ``only`` labels per axis."""
    only = only or {}
    for axis, labels in only.items():
        known = next((a for a in spec.axes if a.name == axis), None)
        if known is None:
            raise RecipeError(f"--only {axis}=...: no such axis (axes: {[a.name for a in spec.axes]}).")
        missing = sorted(set(labels) - set(known.points))
        if missing:
            raise RecipeError(f"--only {axis}: unknown value(s) {missing}; the axis has {list(known.points)}.")
    choices = [[label for label in a.points if a.name not in only or label in only[a.name]] for a in spec.axes]
    return [dict(zip([a.name for a in spec.axes], combo, strict=True)) for combo in itertools.product(*choices)]


def overrides_of(spec: SweepSpec, point: dict[str, str]) -> dict[str, Any]:
    out = dict(spec.common)
    for axis in spec.axes:
        out.update(axis.points[point[axis.name]])
    return out


def point_dir(spec: SweepSpec, point: dict[str, str]) -> str:
    return os.path.join(spec.out_dir, ",".join(f"{k}={v}" for k, v in point.items()) or "run")


def run_point(spec: SweepSpec, point: dict[str, str]) -> tuple[dict[str, str], int]:
    """One grid point in its own process; returns its exit code (0 also when it was already done)."""
    folder = point_dir(spec, point)
    if os.path.exists(os.path.join(folder, "final.json")):
        return point, 0
    os.makedirs(folder, exist_ok=True)
    resume = os.path.exists(os.path.join(folder, "checkpoint.pt"))  # a killed point continues from its checkpoint
    command = [sys.executable, "-m", "groupclip.cli", "train"]
    command += ["--resume", folder] if resume else ["--recipe", spec.recipe, "--out", folder]
    for key, value in overrides_of(spec, point).items():  # with --resume: checked against the saved config
        command += ["--set", f"{key}={_toml_literal(value)}"]
    with open(os.path.join(folder, "log.txt"), "a" if resume else "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return point, code


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if parse_value(value) == value else json.dumps(value)
    return json.dumps(value)


def run_sweep(
    spec: SweepSpec, jobs: int = 1, only: dict[str, list[str]] | None = None, log=print
) -> list[dict[str, Any]]:
    """Run every unfinished grid point (``jobs`` at a time), then write and return the results table rows."""
    points = grid(spec, only)
    todo = [p for p in points if not os.path.exists(os.path.join(point_dir(spec, p), "final.json"))]
    done_before = len(points) - len(todo)
    log(f"sweep {spec.name}: {len(points)} point(s), {done_before} done, {len(todo)} to run -> {spec.out_dir}")
    start = time.perf_counter()
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for done, (point, code) in enumerate(pool.map(lambda p: run_point(spec, p), todo), 1):
            status = "ok" if code == 0 else f"FAILED (exit {code}; see {point_dir(spec, point)}/log.txt)"
            elapsed = time.perf_counter() - start
            log(f"  [{done}/{len(todo)}] {point} {status} ({elapsed / 60:.1f} min since the sweep started)")
            if code != 0:
                failed.append(point)
    rows = summarise(spec)
    write_table(spec, rows)
    if failed:
        log(f"{len(failed)} point(s) failed: {failed}")
    return rows


def collect(spec: SweepSpec) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Every finished grid point with its final metrics."""
    out = []
    for point in grid(spec):
        path = os.path.join(point_dir(spec, point), "final.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                out.append((point, json.load(handle)))
    return out


def summarise(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per grid point without the repeat axis: mean, std, min and max of the headline over repeats."""
    rows: dict[tuple, dict[str, Any]] = {}
    for point, final in collect(spec):
        key = tuple((k, v) for k, v in point.items() if k != spec.repeat)
        row = rows.setdefault(key, {**dict(key), "runs": []})
        row["runs"].append({"repeat": point.get(spec.repeat), **_essentials(final)})
    table = []
    for row in rows.values():
        runs = row.pop("runs")
        headline = runs[0]["headline"]
        values = [r["value"] for r in runs if r["value"] is not None]
        table.append(
            {
                **row,
                "metric": headline,
                "n": len(values),
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values, default=None),
                "max": max(values, default=None),
                "epsilon": _mean([r["epsilon"] for r in runs]),
                "peak_kept_mb": _mean([r["peak_kept_mb"] for r in runs]),
                "peak_rss_mb": _mean([r["peak_rss_mb"] for r in runs]),
                "wall_time_min": _mean([r["wall_time_s"] / 60 for r in runs]),
                "runs": runs,
            }
        )
    return table


def _essentials(final: dict[str, Any]) -> dict[str, Any]:
    headline = final["headline"]
    return {
        "headline": headline,
        "value": final.get(headline),
        "epsilon": final.get("epsilon"),
        "noise_multiplier": final.get("noise_multiplier"),
        "groups": final.get("groups"),
        "parameters": (final.get("info") or {}).get("parameters"),
        "peak_kept_mb": final.get("peak_kept_mb"),
        "peak_rss_mb": final.get("peak_rss_mb"),
        "wall_time_s": final.get("wall_time_s"),
    }


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    axes = [a.name for a in spec.axes if a.name != spec.repeat]
    over = f" over {spec.repeat}" if spec.repeat else ""
    header = [*axes, "n", f"mean{over}", "std", "min", "max", "epsilon", "peak kept MB", "peak RSS MB", "min/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row[a] for a in axes] + [
            row["n"],
            _fmt(row["mean"]),
            _fmt(row["std"], 2),
            _fmt(row["min"]),
            _fmt(row["max"]),
            _fmt(row["epsilon"], 3),
            _fmt(row["peak_kept_mb"], 3),
            _fmt(row["peak_rss_mb"], 4),
            _fmt(row["wall_time_min"], 3),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    metric = rows[0]["metric"] if rows else "headline"
    return f"Sweep `{spec.name}` (recipe `{spec.recipe}`), metric: {metric}\n\n" + "\n".join(lines) + "\n"


def write_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    os.makedirs(spec.out_dir, exist_ok=True)
    with open(os.path.join(spec.out_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(render_table(spec, rows))
    with open(os.path.join(spec.out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"sweep": spec.name, "recipe": spec.recipe, "repeat": spec.repeat, "rows": rows}, handle, indent=2)
