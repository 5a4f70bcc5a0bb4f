"""Plots of one run folder: loss and the headline metric vs steps, and epsilon vs steps (matplotlib, optional)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_metrics(run_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step records and the evaluation records of ``run_dir/metrics.jsonl``."""
    steps, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            (evals if record.get("kind") == "eval" else steps).append(record)
    return steps, evals


def plot_run(run_dir: str, headline: str) -> list[str]:
    """Write ``curves.png`` (training loss and ``headline`` vs steps) and ``epsilon.png``; returns the paths.

    Returns an empty list when matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    steps, evals = read_metrics(run_dir)
    written = []
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in steps if r.get("loss") is not None], [r["loss"] for r in steps if r.get("loss")])
    ax_loss.set(xlabel="step", ylabel="training loss (mean per sample)", title="loss")
    ax_metric.plot([r["step"] for r in evals], [r[headline] for r in evals], marker="o", markersize=3)
    ax_metric.set(xlabel="step", ylabel=headline, title=headline)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    with_eps = [r for r in steps if r.get("epsilon") is not None]
    if with_eps:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([r["step"] for r in with_eps], [r["epsilon"] for r in with_eps])
        ax.set(xlabel="step", ylabel="epsilon spent", title="privacy spent (dp-accounting)")
        fig.tight_layout()
        path = os.path.join(run_dir, "epsilon.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
