"""Batches for DP training: Poisson sampling (what the accountants assume), and splitting into physical batches.

Poisson sampling includes every example in every step independently with probability ``q``: batch sizes vary
and can be zero. The privacy accountants (RDP, PLD) analyse exactly this mechanism (``docs/MATH.md``, sections
"Sampling" and "Accounting"). Shuffled fixed-size batches are a different mechanism -- the epsilon computed for
Poisson sampling does not formally apply to them -- so :func:`shuffled_loader` warns.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate as _default_collate


class FixedSizeBatchesWarning(UserWarning):
    """Shuffled fixed-size batches are used, but the accounting assumes Poisson sampling."""


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields, for each step, the indices of a Poisson sample: each index independently with probability ``q``.

    Use as ``DataLoader(dataset, batch_sampler=PoissonBatchSampler(...))``. Batches can be empty.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1]; the expected batch size is ``q * N``.
        steps: batches per iteration over the sampler (default ``round(1 / q)``: one epoch in expectation).
        seed: seed of the sampler's generator (``None`` seeds from the OS).
        shard: ``(rank, world_size)`` for data-parallel training: every rank draws the same global mask (give all
            ranks the same seed) and yields every ``world_size``-th selected index from ``rank`` on, so the union
            of the ranks' batches is one Poisson sample of rate q over the whole data set.

    The generator state and the position within the current pass are saved by :meth:`state_dict`, so a resumed
    run draws the same remaining batches as an uninterrupted one.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        seed: int | None = None,
        shard: tuple[int, int] | None = None,
    ):
        if num_samples < 1:
            raise ValueError(f"Expected num_samples={num_samples} >= 1.")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"Expected sample_rate={sample_rate} in (0, 1].")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"Expected shard=(rank, world_size) with 0 <= rank < world_size; got {shard}.")
        self.shard = shard
        self._position = 0
        # Called as each round is drawn (PrivateTraining charges its ledger then: a drawn round counts whatever
        # the loop does with it).
        self.on_round: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        if self._position >= self.steps:  # the last pass was consumed to its last batch without exhausting us
            self._position = 0
        while self._position < self.steps:
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            self._position += 1
            if self.on_round is not None:
                self.on_round()
            chosen = torch.nonzero(mask).flatten()
            if self.shard is not None:  # every rank draws the same global mask and keeps its share of it
                rank, world = self.shard
                chosen = chosen[rank::world]
            yield chosen.tolist()
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._position = state["position"]


class EmptyBatchCollate:
    """``collate_fn`` that turns an empty Poisson batch into the usual structure with a leading dim of 0.

    The structure is learned from one example, but none of that example's data is kept (tensors are cut to zero
    rows, per-example lists emptied).

    Args:
        dataset: used once to learn the structure and dtypes of one collated example.
        collate_fn: the collate function for non-empty batches (default ``default_collate``).
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable | None = None) -> None:
        self.collate_fn = collate_fn or _default_collate
        self._dataset = dataset
        self._empty = None

    def __call__(self, batch: Sequence[Any]) -> Any:
        if len(batch):
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _without_rows(self.collate_fn([self._dataset[0]]))
            self._dataset = None
        return self._empty


def _without_rows(batch: Any) -> Any:
    """The structure of a collated batch of one example, with zero rows and none of that example's data.

    Tensors keep their trailing shape and dtype; containers are rebuilt; a list of non-tensor values (strings
    collated as a list, one per example) becomes an empty list; any other value is dropped to ``None``.
    """
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: _without_rows(v) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        structured = any(isinstance(v, torch.Tensor | Mapping | list | tuple) for v in batch)
        if not structured:
            return []  # per-example values (e.g. strings)
        items = [_without_rows(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return None


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    shard: tuple[int, int] | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` (map-style) with Poisson-sampled batches, empty ones included.

    Example:
        >>> loader = poisson_loader(dataset, sample_rate=256 / len(dataset), seed=0)   # doctest: +SKIP
        >>> for x, y in loader: ...                                                      # doctest: +SKIP
    """
    sampler = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, seed=seed, shard=shard)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=EmptyBatchCollate(dataset, collate_fn), **loader_kwargs
    )


def shuffled_loader(dataset: Dataset, batch_size: int, **loader_kwargs: Any) -> DataLoader:
    """Shuffled fixed-size batches (``drop_last=True``), with a warning on what that means for the accounting."""
    warnings.warn(
        "Shuffled fixed-size batches are not Poisson sampling: the epsilon that groupclip's accountants report "
        "(RDP/PLD for Poisson-subsampled Gaussian steps) does not formally hold for them. Use poisson_loader for "
        "a guarantee that matches the reported epsilon.",
        FixedSizeBatchesWarning,
        stacklevel=2,
    )
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, **loader_kwargs)


def physical_batches(batch: Any, max_physical_batch_size: int) -> Iterator[Any]:
    """Split a (logical) batch -- any pytree of tensors with the batch as dim 0 -- into chunks of at most the size.

    Gradient accumulation for logical batches larger than memory allows: run forward + backward on each chunk
    (the engine adds each chunk's clipped sums into ``.grad``), then one ``optimizer.step()`` adds noise once.
    An empty batch yields nothing.
    """
    if max_physical_batch_size < 1:
        raise ValueError(f"Expected max_physical_batch_size={max_physical_batch_size} >= 1.")
    if isinstance(batch, Mapping) and not isinstance(batch, dict):  # a UserDict (Hugging Face's BatchEncoding)
        batch = dict(batch)
    leaves, spec = tree_flatten(batch)
    sizes = {t.shape[0] for t in leaves if isinstance(t, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"All tensors of a batch need the same leading (batch) size; got sizes {sorted(sizes)}.")
    size = sizes.pop()
    for start in range(0, size, max_physical_batch_size):
        stop = min(start + max_physical_batch_size, size)
        yield tree_unflatten([t[start:stop] if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def expected_steps(sample_rate: float, epochs: float) -> int:
    """Number of Poisson steps in ``epochs`` expected passes over the data: ``ceil(epochs / q)``."""
    return math.ceil(epochs / sample_rate - 1e-9)
