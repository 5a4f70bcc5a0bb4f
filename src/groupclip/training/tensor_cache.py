"""A disk cache for tensors that are expensive to recompute and fixed by their inputs (e.g. frozen features).

Files live in ``$GROUPCLIP_CACHE_DIR``, else ``~/.cache/groupclip``. The cache is a convenience: a missing,
damaged or unreadable file is recomputed, an unwritable folder is skipped, and writes are atomic (a parallel run
never reads a half-written file).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable

import torch
from torch import Tensor


def cache_dir() -> str:
    """The cache folder: ``$GROUPCLIP_CACHE_DIR`` if set, else ``~/.cache/groupclip``."""
    return os.environ.get("GROUPCLIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "groupclip")


def digest(data: bytes) -> str:
    """A short content hash for cache file names."""
    return hashlib.sha256(data).hexdigest()[:16]


def cached_tensor(name: str, compute: Callable[[], Tensor], rows: int | None = None) -> Tensor:
    """The tensor cached as ``name`` (a file name without folder), else ``compute()``, stored for next time.

    ``rows``: the expected leading size; a cached tensor of another size is recomputed.
    """
    path = os.path.join(cache_dir(), f"{name}.pt")
    if os.path.exists(path):
        try:
            found = torch.load(path, weights_only=True)
            if isinstance(found, Tensor) and (rows is None or found.shape[0] == rows):
                return found
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            pass
    value = compute()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        torch.save(value, partial)
        os.replace(partial, path)
    except OSError:
        pass
    return value
