"""Every committed study sweep (``benchmarks/studies/*.toml``) loads, and each of its grid points' overrides are
valid for its recipe -- a typo in a key or a value fails here, not hours into a background run."""

from __future__ import annotations

import pathlib

import pytest

from groupclip.training.sweep import grid, load_sweep

STUDIES = sorted((pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "studies").glob("*.toml"))


def test_there_are_study_files():
    assert len(STUDIES) >= 10


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_file_loads(path):
    spec = load_sweep(str(path))  # checks every point's overrides against the recipe
    assert grid(spec)
    assert spec.out is not None and spec.out.startswith("benchmarks/results/studies/"), spec.out
