"""What one backward pass computed, per group."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ClipReport:
    """What one backward pass computed, per group.

    Attributes:
        batch_size: B of the pass.
        per_sample_norms: group -> ``[B]`` norms of the per-sample gradients (of the per-sample losses).
        clip_factors: group -> ``[B]`` factors ``C_ik`` applied (0 for a sample whose norm was not finite).
        thresholds: group -> ``R_k`` used.
        peak_held_bytes: peak of :class:`~groupclip.engine.memory.MemoryLedger` ``held_bytes`` during the pass.
        activation_bytes: bytes of layer inputs the taps saved in the forward pass.
        started_fresh: every ``.grad`` was None before this pass wrote (zeroed with set_to_none): a new logical batch.
        dropped: group -> indices of samples whose norm in it was not finite (their contribution was dropped).
        squared_norms: ``[groups, B]`` squared norms, rows in grouping order (what the dicts are views of).
        factors: ``[groups, B]`` clip factors, rows in grouping order.
    """

    batch_size: int
    per_sample_norms: dict[str, Tensor]
    clip_factors: dict[str, Tensor]
    thresholds: dict[str, float]
    peak_held_bytes: int
    activation_bytes: int
    started_fresh: bool = True
    dropped: dict[str, list[int]] = field(default_factory=dict)
    squared_norms: Tensor | None = None
    factors: Tensor | None = None
