"""Shared test setup: ``tests/`` importable (``from reference import ...``), and one torch thread.

The test tensors are tiny: on a loaded 2-core machine intra-op threads only add OpenMP overhead (measured 3-15x
slower per op), so every test runs with one thread; the setting is restored at the end of the session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
