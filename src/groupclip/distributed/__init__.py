"""DP training beyond one process, on torch.distributed (launch with ``torchrun``; gloo on CPU, NCCL on GPU).

* Data parallel: :func:`groupclip.make_private` with ``distributed=True`` -- each rank clips its own samples, the
  clipped sums are all-reduced, noise is added once, one global Poisson sample is split among the ranks
  (:mod:`groupclip.distributed.data_parallel`).
* Sharded (FSDP2 ``fully_shard``): :func:`make_private_sharded` (:mod:`groupclip.distributed.sharded`).
* Pipeline (``torch.distributed.pipelining``) with per-device or all-layer clipping across stages:
  :func:`make_private_pipeline` (:mod:`groupclip.distributed.pipeline`).
* :func:`check_agreement`: the collective check that all ranks were given the same settings.

How each topology works, what it requires and how it fails: ``docs/DISTRIBUTED.md``. The names below load their
modules on first use; the data-parallel module is imported with this package (``import groupclip`` imports it),
which registers the ``"data-parallel"`` topology that ``make_private(distributed=True)`` looks up by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import data_parallel  # noqa: F401  (registers the "data-parallel" topology)
from .agreement import check_agreement
from .data_parallel import DataParallel

_LAZY = {
    "make_private_sharded": "sharded",
    "Sharded": "sharded",
    "make_private_pipeline": "pipeline",
    "PipelineStage": "pipeline",
    "PrivatePipelineStage": "pipeline",
    "fixed_size_chunks": "pipeline",
}

__all__ = ["DataParallel", "check_agreement", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
