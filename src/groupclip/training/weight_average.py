"""An exponential moving average (EMA) of the trained weights, evaluated in place of the last iterate.

DP-SGD's iterates carry the noise of their last steps; averaging them smooths it out (De et al. 2022 report EMA
gains for DP image classifiers). The average is computed from the released noisy parameters only, so it is
post-processing and costs no privacy. One foreach op per step updates every tensor.

Example:
    >>> average = WeightAverage(model, decay=0.999)                      # doctest: +SKIP
    >>> optimizer.step(); average.update()                               # doctest: +SKIP
    >>> with average.applied(): accuracy = evaluate(model)               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``average <- decay * average + (1 - decay) * weights`` over ``model``'s trainable parameters.

    Each ``update`` uses the warm-up decay ``min(decay, (1 + n) / (10 + n))`` (n: updates so far), so early averages
    are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"Expected decay={decay!r} in (0, 1), e.g. 0.999.")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block; its own weights are restored after it."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(
                f"The checkpoint's weight average has {len(state['average'])} tensors, the model "
                f"{len(self.average)} trainable parameters."
            )
        self.updates = int(state["updates"])
        with torch.no_grad():
            saved = [a.to(b.device, b.dtype) for a, b in zip(state["average"], self.average, strict=True)]
            torch._foreach_copy_(self.average, saved)
