"""Gaussian noise for the clipped gradient sum, drawn where the gradients live.

The privacy guarantee holds only if the noise cannot be predicted: by default every generator is seeded from the
operating system's entropy. A reproducible noise seed is an explicit opt-in (for tests and experiments whose noise
must repeat) and warns once. Generator states are saved with checkpoints -- a checkpoint therefore reveals the
noise of the steps after it and must be kept private.

Noise is drawn on each gradient's own device with a generator there, in few large draws: the gradients of one
(device, dtype) are filled from chunks of one flat standard-normal draw (at most ``CHUNK_ELEMENTS`` values per
draw, so the transient buffer stays small next to the gradients), then added with one ``_foreach_add_``.
``secure=True`` draws from the OS CSPRNG instead (Box-Muller on ``secrets`` bytes, on the CPU, then copied):
not reproducible by design, and slow -- tens of ns per value, so seconds per step for a 100M-parameter model, far
too slow to keep a GPU busy.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # values per draw: 64 MiB of float32


class ReproducibleNoiseWarning(UserWarning):
    """The noise is seeded: anyone who knows the seed can regenerate and subtract it."""


_warned = False


def warn_reproducible(seed: int) -> None:
    """Warn once per process that the privacy randomness is seeded."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"noise_seed={seed}: the Gaussian noise and the Poisson sampling are reproducible from this seed, so "
            "anyone who knows it can regenerate and subtract the noise; the privacy guarantee then holds only "
            "while the seed stays secret. Leave noise_seed unset (OS entropy) for a real run.",
            ReproducibleNoiseWarning,
            stacklevel=3,
        )


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for ``purpose`` (a device, a rank, the sampler) from one base seed."""
    digest = hashlib.blake2b(f"groupclip:{purpose}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GaussianNoise:
    """Draws ``N(0, std^2)`` noise into gradients, on their devices.

    Args:
        seed: ``None`` (default): every generator seeded from the OS; an int: reproducible noise (see the module
            docstring).
        secure: draw from the OS CSPRNG instead (not reproducible, not checkpointable, slow).

    Example:
        >>> noise = GaussianNoise(seed=0)
        >>> grads = [torch.zeros(3), torch.zeros(2, 2)]
        >>> noise.add_(grads, std=1.0)
        >>> [g.shape for g in grads]
        [torch.Size([3]), torch.Size([2, 2])]
    """

    def __init__(self, seed: int | None = None, secure: bool = False) -> None:
        self.secure = secure
        self.seed = seed
        self._base = seed if seed is not None else secrets.randbits(63)
        self.generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of ``device`` (made on first use, seeded from the base seed and the device)."""
        key = str(torch.device(device))
        gen = self.generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            gen.manual_seed(derive_seed(self._base, key))
            self.generators[key] = gen
        return gen

    def add_(self, tensors: list[Tensor], std: float) -> None:
        """``t += N(0, std^2)`` for every tensor, drawn on its device (a few draws per device and dtype)."""
        if std == 0 or not tensors:
            return
        groups: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for (device, dtype), members in groups.items():
            draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            chunk: list[Tensor] = []
            size = 0
            for t in members:
                if chunk and size + t.numel() > CHUNK_ELEMENTS:
                    self._add_chunk(chunk, size, std, device, dtype, draw_dtype)
                    chunk, size = [], 0
                chunk.append(t)
                size += t.numel()
            self._add_chunk(chunk, size, std, device, dtype, draw_dtype)

    def _add_chunk(self, chunk: list[Tensor], size: int, std: float, device, dtype, draw_dtype) -> None:
        flat = self._standard_normal(size, device, draw_dtype)
        if dtype != draw_dtype:
            flat = flat.to(dtype)
        views = flat.split([t.numel() for t in chunk])
        torch._foreach_add_(chunk, [v.view(t.shape) for v, t in zip(views, chunk, strict=True)], alpha=std)

    def sample(self, shape: torch.Size | tuple[int, ...], std: float, *, dtype: torch.dtype, device) -> Tensor:
        """A new tensor of ``shape`` with i.i.d. ``N(0, std^2)`` entries."""
        out = torch.zeros(shape, dtype=dtype, device=device)
        self.add_([out], std)
        return out

    def _standard_normal(self, count: int, device, dtype: torch.dtype) -> Tensor:
        if self.secure:
            return torch.from_numpy(_secure_standard_normal(count)).to(device=device, dtype=dtype)
        return torch.randn(count, generator=self.generator(device), device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        generators = {} if self.secure else {k: g.get_state() for k, g in self.generators.items()}
        return {"secure": self.secure, "base": None if self.secure else self._base, "generators": generators}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"secure", "base", "generators"}:
            raise ValueError(f"Not a GaussianNoise state (keys {sorted(state)}).")
        self.secure = state["secure"]
        if state["base"] is not None:
            self._base = state["base"]
        for key, value in state["generators"].items():
            self.generator(key).set_state(value)


def _secure_standard_normal(count: int) -> np.ndarray:
    """``count`` standard normal float64 values from ``secrets`` (Box-Muller on 53-bit uniforms in (0, 1))."""
    pairs = (count + 1) // 2
    raw = np.frombuffer(secrets.token_bytes(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u2 = ((raw[1] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    out = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return out[:count]
