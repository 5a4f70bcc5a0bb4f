"""The privacy audit's committed measurements: honest runs, tightness and planted bugs (``groupclip audit``).

    python benchmarks/audit_study.py            # about 5 minutes on 2 CPU cores

Every configuration runs ``groupclip audit`` in its own process and keeps its ``audit.json``; the table goes to
``benchmarks/results/audit_study.{md,json}``. Seeds are explicit (``--seed``), so the audit's noise is reproducible
from the seed; that is what an audit of the code wants, not what a training run should do.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HONEST_WHITE_BOX = [
    {"grouping": g, "seed": s, "canaries": 1000, "steps": 4} for g in ("all-layer", "layer-wise") for s in (0, 1, 2)
]
HONEST_RECIPE = [
    {"recipe": "default", "set": f"clipping.grouping={g}", "seed": s, "canaries": 200}
    for g in ("all-layer", "layer-wise")
    for s in (0, 1, 2)
]
TIGHTNESS = [
    {"grouping": "layer-wise", "seed": 0, "canaries": m, "steps": 4, "noise-multiplier": z}
    for m in (1000, 4000)
    for z in (1.0, 2.0, 4.0)
]
PLANTED = [
    {"grouping": "layer-wise", "seed": 0, "canaries": 1000, "steps": 4, "plant": p}
    for p in ("no-clipping", "low-noise", "unclipped-group")
]


def run_audit(config: dict, out: Path) -> dict:
    argv = [sys.executable, "-m", "groupclip.cli", "audit", "--out", str(out)]
    for key, value in config.items():
        argv += [f"--{key}", str(value)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads((out / "audit.json").read_text())
    report = result["report"]
    return {
        "config": config,
        "command": "groupclip audit " + " ".join(f"--{k} {v}" for k, v in config.items()),
        "claimed": report["claimed_epsilon"],
        "one_run": report["one_run"]["epsilon"],
        "threshold": report["threshold"]["epsilon"],
        "gdp": report["gdp"]["epsilon"],
        "gdp_lower": report["gdp"]["epsilon_lower"],
        "contradicted": report["contradicted"],
        "seconds": time.perf_counter() - start,
    }


def _row(r: dict) -> str:
    ratio = r["one_run"] / r["claimed"] if r["claimed"] not in (0, float("inf")) else float("nan")
    gdp = r["gdp"] / r["claimed"] if r["claimed"] not in (0, float("inf")) else float("nan")
    verdict = "**FLAGGED**" if r["contradicted"] else "not contradicted"
    return (
        f"| `{r['command']}` | {r['claimed']:.3f} | {r['one_run']:.3f} ({ratio:.2f}x) | {r['threshold']:.3f} | "
        f"{r['gdp']:.3f} ({gdp:.2f}x; >= {r['gdp_lower']:.3f}) | {verdict} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/audit_study"))
    args = parser.parse_args()
    sections = {
        "Honest runs, white-box Dirac canaries (full batch, 4 steps, sigma 4)": HONEST_WHITE_BOX,
        "Honest runs, the default recipe with black-box mislabeled canaries (Poisson sampling)": HONEST_RECIPE,
        "Tightness, white-box (layer-wise, full batch, 4 steps)": TIGHTNESS,
        "Planted bugs (white-box, layer-wise): the audit must flag each": PLANTED,
    }
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (title, configs) in enumerate(sections.items()):
            results[title] = []
            for j, config in enumerate(configs):
                results[title].append(run_audit(config, Path(tmp) / f"{i}-{j}"))
                print(_row(results[title][-1]), flush=True)
    head = [
        "# Privacy audit: honest runs, tightness, planted bugs",
        "",
        f"Command: `python benchmarks/audit_study.py`. Machine: {platform.machine()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}. alpha 0.05, delta 1e-5. The one-run bound (Steinke, Nasr & Jagielski "
        "2023) and the threshold bound are certified lower bounds; the GDP estimate is an estimate. "
        "A run is FLAGGED when a certified lower bound exceeds the claimed epsilon.",
        "",
    ]
    lines = list(head)
    for title, rows in results.items():
        lines += [
            f"## {title}",
            "",
            "| command | claimed eps | one-run bound (x claim) | threshold bound | GDP estimate (x claim) | verdict |",
            "|---|---:|---:|---:|---:|---|",
            *(_row(r) for r in rows),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
