"""Checking and splitting canary scores: one float per canary, and whether that canary was trained on.

Every bound takes ``scores`` (higher = "looks included") and ``included`` (the secret coin flips) as two
sequences of the same length m; numpy arrays, torch tensors and lists all work.

Example:
    >>> s, inc = as_scores([0.3, 2.0, -1.0], [False, True, False])
    >>> s.dtype.name, inc.tolist()
    ('float64', [False, True, False])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ScoreLike = Sequence[float] | np.ndarray | Any  # also a 1-d torch tensor
MaskLike = Sequence[bool] | np.ndarray | Any


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor; torch is not needed to read it
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def as_scores(scores: ScoreLike, included: MaskLike) -> tuple[np.ndarray, np.ndarray]:
    """``(scores as float64 [m], included as bool [m])``, checked.

    Raises:
        ValueError: different lengths, not 1-d, no canary, a non-finite score (it could not be ranked), or an
            ``included`` entry other than 0/1/True/False.
    """
    s = _to_numpy(scores).astype(np.float64, copy=False)
    raw = _to_numpy(included)
    if s.ndim != 1 or raw.ndim != 1 or len(s) != len(raw):
        raise ValueError(f"Expected 1-d scores and included of the same length; got shapes {s.shape} and {raw.shape}.")
    if len(s) == 0:
        raise ValueError("Expected at least one canary.")
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))[:5].tolist()
        raise ValueError(f"Scores must be finite; canaries {bad} are not.")
    if raw.dtype != np.bool_:
        if not np.isin(raw, (0, 1)).all():
            raise ValueError("included must hold booleans (or 0/1).")
        raw = raw.astype(bool)
    return s, raw


def split_scores(scores: ScoreLike, included: MaskLike) -> tuple[np.ndarray, np.ndarray]:
    """``(scores of included canaries, scores of excluded canaries)``; both must be non-empty.

    Raises:
        ValueError: as :func:`as_scores`, or one side is empty (nothing to compare).
    """
    s, inc = as_scores(scores, included)
    inside, outside = s[inc], s[~inc]
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError(
            f"Need both included and excluded canaries; got {len(inside)} included and {len(outside)} excluded."
        )
    return inside, outside
