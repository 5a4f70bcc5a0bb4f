"""Cross-rank agreement checks: every rank describes its settings, all ranks compare, all raise together.

A check is a collective (one ``all_gather_object``), so every rank of the group must call it at the same point;
when any rank's settings differ, every rank raises the same :class:`~groupclip.errors.DistributedSetupError`
naming the differing keys and ranks -- no rank is left waiting in a later collective.

Example (on every rank)::

    check_agreement({"grouping": "layer-wise", "noise_multiplier": 1.1}, what="privacy settings")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from ..errors import DistributedSetupError


def canonical(value: Any) -> str:
    """A rank-independent text form of a setting (mappings by sorted key, floats by ``repr``)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {canonical(value[k])}" for k in sorted(value, key=str)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    if callable(value) and not isinstance(value, type):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(value)


def check_agreement(settings: Mapping[str, Any], *, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`DistributedSetupError` on every rank of ``group`` unless all ranks gave equal ``settings``.

    Args:
        settings: ``{name: value}``; values are compared by :func:`canonical`.
        what: what the settings are, for the message (e.g. ``"privacy settings"``).
        group: the process group (default: the world).
    """
    mine = {str(k): canonical(v) for k, v in settings.items()}
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    keys = sorted(set().union(*(g.keys() for g in gathered)))
    differing = [k for k in keys if len({g.get(k, "<missing>") for g in gathered}) > 1]
    if differing:
        detail = "; ".join(
            f"{k}: " + ", ".join(f"rank {r} = {g.get(k, '<missing>')}" for r, g in enumerate(gathered))
            for k in differing
        )
        raise DistributedSetupError(
            f"The ranks disagree on the {what} ({detail}). Every rank must be given the same {what}: build them "
            "from one config (the same recipe and flags on every rank)."
        )
