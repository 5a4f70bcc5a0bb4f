"""A PNG of the in/out canary score distributions (matplotlib, imported only when a plot is drawn).

Example:
    >>> import numpy as np
    >>> inc = np.arange(100) % 2 == 0
    >>> plot_scores(np.random.default_rng(0).normal(size=100) + inc, inc, "scores.png")  # doctest: +SKIP
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from .scores import MaskLike, ScoreLike, split_scores


def plot_scores(
    scores: ScoreLike,
    included: MaskLike,
    path: str | PathLike[str],
    *,
    title: str | None = None,
    bins: int = 50,
) -> Path:
    """Overlaid histograms of included and excluded canaries' scores, written as a PNG to ``path``.

    Uses a bare ``Figure`` with the Agg canvas, so it neither needs a display nor changes pyplot's backend.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("Plotting canary scores needs matplotlib: pip install matplotlib.") from exc
    inside, outside = split_scores(scores, included)
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = float(min(inside.min(), outside.min())), float(max(inside.max(), outside.max()))
    edges = None if low == high else [low + (high - low) * i / bins for i in range(bins + 1)]
    axes.hist(outside, bins=edges or bins, alpha=0.6, label=f"excluded ({len(outside)})", color="tab:blue")
    axes.hist(inside, bins=edges or bins, alpha=0.6, label=f"included ({len(inside)})", color="tab:orange")
    axes.set_xlabel("canary score (higher: looks included)")
    axes.set_ylabel("canaries")
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return out
