"""The engine's settings, validated once, and the two questions they answer on every forward pass."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor
from torch.utils._pytree import tree_flatten

NormMode = Literal["auto", "ghost", "instantiate"]
LossReduction = Literal["mean", "sum"]
NORM_MODES = ("auto", "ghost", "instantiate")


@dataclass(frozen=True)
class EngineSettings:
    """Checked settings of a :class:`~groupclip.engine.ClippingEngine` (see its arguments)."""

    loss_reduction: LossReduction
    norm_mode: NormMode | Mapping[str, NormMode]
    batch_args: tuple[int | str, ...] | None
    nonfinite: Literal["raise", "drop"]

    @classmethod
    def validate(cls, loss_reduction, norm_mode, batch_args, nonfinite) -> EngineSettings:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Expected loss_reduction={loss_reduction!r} in ('mean', 'sum').")
        modes = norm_mode.values() if isinstance(norm_mode, Mapping) else [norm_mode]
        for mode in modes:
            if mode not in NORM_MODES:
                raise ValueError(f"Expected norm_mode={mode!r} in {NORM_MODES}.")
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"Expected nonfinite={nonfinite!r} in ('raise', 'drop').")
        if batch_args is not None:
            if isinstance(batch_args, int | str) or not isinstance(batch_args, Sequence):
                raise ValueError(
                    f"Expected batch_args={batch_args!r} to be a list of argument positions (int) or names (str)."
                )
            for a in batch_args:
                if not isinstance(a, int | str) or isinstance(a, bool):
                    raise ValueError(f"Expected batch_args entries to be ints or strs; got {a!r}.")
            batch_args = tuple(batch_args)
        return cls(loss_reduction, norm_mode, batch_args, nonfinite)

    def mode_for(self, path: str) -> NormMode:
        if not isinstance(self.norm_mode, Mapping):
            return self.norm_mode
        for pattern, mode in self.norm_mode.items():
            if fnmatch.fnmatchcase(path, pattern):
                return mode
        return "auto"

    def batch_inputs(self, args: tuple, kwargs: dict) -> tuple[int | None, list[Tensor]]:
        """``(B, batched input tensors)`` of one call of the model.

        With ``batch_args``: every tensor inside those arguments, B from the first. Otherwise B is dim 0 of the
        first tensor argument (positional, then keyword, nested containers included) and the batched inputs are
        the tensor arguments whose dim 0 is B.
        """
        if self.batch_args is not None:
            chosen = [args[a] for a in self.batch_args if isinstance(a, int) and a < len(args)]
            chosen += [kwargs[a] for a in self.batch_args if isinstance(a, str) and a in kwargs]
            tensors = [t for t in tree_flatten(chosen)[0] if isinstance(t, Tensor) and t.dim() >= 1]
            if not tensors:
                return None, []
            batch = int(tensors[0].shape[0])
            bad = [tuple(t.shape) for t in tensors if t.shape[0] != batch]
            if bad:
                raise ValueError(f"batch_args name tensors with different leading sizes: {batch} and {bad}.")
            return batch, tensors
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim() >= 1]
        if not tensors:
            return None, []
        batch = int(tensors[0].shape[0])
        return batch, [t for t in tensors if t.shape[0] == batch]
