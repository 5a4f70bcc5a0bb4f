"""Gaussian noise for the clipped gradient sum: seedable for reproducibility, or cryptographically secure.

The default source is a ``torch.Generator`` (seeded, its state saved with checkpoints, so a resumed run draws the
same noise). ``secure=True`` draws from the operating system's CSPRNG (``secrets``) through the Box-Muller
transform in float64: not reproducible by design, and slower (about 16 random bytes per value).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np
import torch
from torch import Tensor


class GaussianNoise:
    """Draws ``N(0, std^2)`` tensors.

    Args:
        seed: seed of the torch generator (ignored with ``secure=True``); ``None`` seeds from the OS.
        secure: draw from the OS CSPRNG instead (opt-in; not reproducible, not checkpointable).
    """

    def __init__(self, seed: int | None = None, secure: bool = False) -> None:
        self.secure = secure
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    def sample(self, shape: torch.Size | tuple[int, ...], std: float, *, dtype: torch.dtype, device) -> Tensor:
        """A tensor of ``shape`` with i.i.d. ``N(0, std^2)`` entries (drawn on the CPU in float32 or wider)."""
        if std == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if self.secure:
            values = torch.from_numpy(_secure_standard_normal(math.prod(shape))).view(shape).to(draw_dtype)
        else:
            values = torch.randn(shape, generator=self.generator, dtype=draw_dtype)
        return (values * std).to(device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"secure": self.secure, "generator": None if self.secure else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.secure = state["secure"]
        if state["generator"] is not None:
            self.generator.set_state(state["generator"])


def _secure_standard_normal(count: int) -> np.ndarray:
    """``count`` standard normal float64 values from ``secrets`` (Box-Muller on 53-bit uniforms in (0, 1))."""
    pairs = (count + 1) // 2
    raw = np.frombuffer(secrets.token_bytes(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u2 = ((raw[1] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    out = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return out[:count]
