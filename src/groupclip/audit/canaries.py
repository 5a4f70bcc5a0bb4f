"""Canaries for any model and grouping: white-box gradient canaries and black-box input canaries.

White-box (:class:`DiracCanaries`): each canary's gradient is a chosen direction.

A Dirac canary j has a per-sample loss ``sum_k w_k a_k[j]``, where ``a_k`` is an audit parameter (one coordinate
per canary) placed in group k of the grouping and ``w_k = boost * R_k`` is larger than the group's threshold, so
clipping must act: honest clipping cuts the canary's gradient in group k to ``R_k e_j``, exactly the
sensitivity ``S = sqrt(sum_k R_k^2)`` in total, and nothing else ever touches coordinate j. A group that is left
unclipped, or noise that is too small, moves the coordinates of included canaries further than the accountant
allows. The score of canary j is the decrease of its coordinates projected on ``w / |w|``.

The canary's task loss is discarded (``torch.where``), so the body's own parameters get no gradient from it, and
ordinary examples never read the audit parameters. With plain SGD the scores are exactly Gaussian and independent
across canaries: with sampling rate 1 and T steps each canary is a Gaussian mechanism with ``mu = sqrt(T) / sigma``.

Black-box (:class:`InputCanaries`): extra training examples -- mislabeled, or random out-of-distribution inputs --
scored by how much their loss decreased over training. They need no access to gradients, and certify far less.

Every canary is included independently with probability 1/2 (a seeded generator, :func:`draw_inclusion`);
``training_set`` adds the included ones to the data, ``snapshot`` / ``scores`` measure all m after training.

Example:
    >>> import torch
    >>> from torch import nn
    >>> body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> canaries = DiracCanaries(100, body, grouping="layer-wise", seed=0)
    >>> model = canaries.model                                # body + audit parameters
    >>> sorted(canaries.grouping)                             # pass to make_private(grouping=...)
    ['0', '2']
    >>> out, audit = model(torch.tensor([3, -1]), torch.randn(2, 4))
    >>> out.shape, audit.shape                                # body output, [B, groups]
    (torch.Size([2, 2]), torch.Size([2, 2]))
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from .. import resolve_grouping

if TYPE_CHECKING:
    from ..grouping import GroupingSpec

NOT_A_CANARY = -1  # canary index carried by ordinary training examples
DEFAULT_BOOST = 100.0  # canary gradient per group, in units of the group's threshold


class CanarySet(Protocol):
    """What :class:`~groupclip.audit.run.Auditor` needs from a set of canaries."""

    included: Tensor

    def snapshot(self, model: nn.Module) -> None: ...

    def scores(self, model: nn.Module) -> Tensor: ...


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def draw_inclusion(num_canaries: int, seed: int | None = None) -> Tensor:
    """Independent fair coin flips: ``[m]`` bool, True = the canary goes into the training set.

    Example:
        >>> draw_inclusion(6, seed=0).tolist() == draw_inclusion(6, seed=0).tolist()
        True
    """
    if num_canaries < 1:
        raise ValueError(f"Expected num_canaries={num_canaries} >= 1.")
    return torch.rand(num_canaries, generator=_generator(seed)) < 0.5


class AuditLayer(nn.Module):
    """One trainable audit coordinate per canary, all zero at the start.

    ``forward(canary [B] long) -> [B]``: the coordinate of each canary (``NOT_A_CANARY`` reads a padding row that
    gets no gradient). An embedding, so the engine's exact per-sample rule applies.
    """

    def __init__(self, num_canaries: int) -> None:
        super().__init__()
        self.num_canaries = num_canaries
        self.table = nn.Embedding(num_canaries + 1, 1, padding_idx=num_canaries)
        nn.init.zeros_(self.table.weight)

    def forward(self, canary: Tensor) -> Tensor:
        index = torch.where(canary < 0, torch.full_like(canary, self.num_canaries), canary)
        return self.table(index).squeeze(-1)

    def coordinates(self) -> Tensor:
        """The ``[m]`` canary coordinates (a detached copy)."""
        return self.table.weight.detach()[: self.num_canaries, 0].clone()


class AuditedModel(nn.Module):
    """``body`` plus one :class:`AuditLayer` per group.

    ``forward(canary, *args, **kwargs) -> (body(*args, **kwargs), audit values [B, groups])``. The canary index
    comes first so the engine takes its length as the batch size.
    """

    def __init__(self, body: nn.Module, num_canaries: int, groups: int) -> None:
        super().__init__()
        self.body = body
        self.audit = nn.ModuleList([AuditLayer(num_canaries) for _ in range(groups)])

    def forward(self, canary: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        values = torch.stack([layer(canary) for layer in self.audit], dim=-1)
        return self.body(*args, **kwargs), values


def _exact(name: str) -> str:
    return "re:" + re.escape(name)  # a parameter name as a pattern that matches only itself


class DiracCanaries:
    """m Dirac canaries spread over every group of ``grouping``, each included with probability 1/2.

    Train ``model`` on ``training_set(data)`` with ``make_private(model, ..., grouping=self.grouping)``, then call
    :meth:`use_thresholds` with the run's thresholds (until then ``w_k = boost``, as if every ``R_k`` were 1).

    Args:
        num_canaries: m.
        body: the model to audit (it is wrapped, not changed).
        grouping: a named or explicit grouping of ``body``'s parameters (not an int: it needs an execution order).
        boost: canary gradient in group k is ``boost * R_k``; > 1 so clipping must act.
        seed: seed of the inclusion coin flips (``None``: from the OS).

    Attributes:
        model: the :class:`AuditedModel` to train.
        grouping: ``{group: parameter name patterns}`` of ``model`` -- the body's groups, each with its audit
            parameter -- to pass as ``make_private(grouping=...)``.
        groups: group names, in the order of the audit parameters.
        included: ``[m]`` bool coin flips.
    """

    def __init__(
        self,
        num_canaries: int,
        body: nn.Module,
        *,
        grouping: GroupingSpec = "all-layer",
        boost: float = DEFAULT_BOOST,
        seed: int | None = None,
    ) -> None:
        if not boost > 1:
            raise ValueError(f"Expected boost={boost} > 1: a canary below the threshold would not be clipped.")
        if isinstance(grouping, int) and not isinstance(grouping, bool):
            raise ValueError("An int grouping depends on the execution order; give named or explicit groups.")
        self.included = draw_inclusion(num_canaries, seed)
        self.num_canaries = num_canaries
        self.boost = float(boost)
        body_groups = resolve_grouping(body, grouping).groups
        self.groups = list(body_groups)
        self.model = AuditedModel(body, num_canaries, len(self.groups))
        self.grouping = {
            group: [_exact(f"body.{name}") for name in names] + [_exact(f"audit.{k}.table.weight")]
            for k, (group, names) in enumerate(body_groups.items())
        }
        self.weights = torch.full((len(self.groups),), self.boost)
        self._start: Tensor | None = None

    def use_thresholds(self, thresholds: Mapping[str, float]) -> None:
        """Set ``w_k = boost * R_k`` from the run's thresholds (e.g. ``private.engine.thresholds``)."""
        missing = [g for g in self.groups if g not in thresholds]
        if missing:
            raise ValueError(f"No threshold for groups {missing}; expected one for each of {self.groups}.")
        self.weights = torch.tensor([self.boost * float(thresholds[g]) for g in self.groups])

    def loss(self, task_losses: Tensor, audit: Tensor, canary: Tensor) -> Tensor:
        """Per-sample losses ``[B]``: the task loss for ordinary examples, ``sum_k w_k a_k[j]`` for canary j.

        Reduce it with ``.mean()`` (``loss_reduction="mean"``) or ``.sum()``.
        """
        push = (audit * self.weights.to(audit.dtype)).sum(-1)
        return torch.where(canary >= 0, push, task_losses)

    def training_set(self, base: Dataset, template: Sequence[Any] | None = None) -> Dataset:
        """Items ``(canary index, *item)``: base items (index ``NOT_A_CANARY``) then the included canaries.

        Args:
            base: the ordinary training data; items are tuples (e.g. ``(x, y)``).
            template: the item a canary feeds the body (its task loss is discarded); default ``base[0]``.
        """
        fill = tuple(template) if template is not None else tuple(base[0])
        chosen = torch.nonzero(self.included).flatten().tolist()
        return ConcatDataset([_Tagged(base), _CanaryRows(chosen, fill)])

    def coordinates(self, model: nn.Module | None = None) -> Tensor:
        """``[m, groups]`` current audit coordinates."""
        audited = self.model if model is None else model
        return torch.stack([layer.coordinates() for layer in audited.audit], dim=-1)

    def snapshot(self, model: nn.Module | None = None) -> None:
        """Remember the coordinates before training (scores are measured from here)."""
        self._start = self.coordinates(model)

    def group_scores(self, model: nn.Module | None = None) -> Tensor:
        """``[m, groups]``: how far each canary's coordinate decreased in each group since :meth:`snapshot`."""
        if self._start is None:
            raise RuntimeError("Call snapshot(model) before training; scores are measured from it.")
        return (self._start - self.coordinates(model)).double()

    def scores(self, model: nn.Module | None = None) -> Tensor:
        """``[m]`` scores: the decrease along the canary direction ``w / |w|`` (higher = looks included)."""
        w = self.weights.double()
        return self.group_scores(model) @ (w / w.norm())


class _Tagged(Dataset):
    """Base items with the canary index ``NOT_A_CANARY`` put first."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple:
        return (torch.tensor(NOT_A_CANARY), *tuple(self.base[i]))


class _CanaryRows(Dataset):
    """One item per included canary: its index, then the template item."""

    def __init__(self, indices: list[int], template: tuple) -> None:
        self.indices = indices
        self.template = template

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        return (torch.tensor(self.indices[i]), *self.template)


class InputCanaries:
    """Black-box canaries: m extra examples, each included with probability 1/2, scored by loss decrease.

    Args:
        inputs: ``[m, ...]`` canary inputs.
        targets: ``[m]`` canary labels.
        seed: seed of the inclusion coin flips.

    Example:
        >>> import torch
        >>> canaries = InputCanaries.out_of_distribution(50, (4,), num_classes=3, seed=0)
        >>> canaries.inputs.shape, int(canaries.included.sum()) > 0
        (torch.Size([50, 4]), True)
    """

    def __init__(self, inputs: Tensor, targets: Tensor, *, seed: int | None = None) -> None:
        if len(inputs) != len(targets) or len(inputs) < 1:
            raise ValueError(f"Expected as many targets as inputs (>= 1); got {len(targets)} and {len(inputs)}.")
        self.inputs = inputs
        self.targets = targets
        self.included = draw_inclusion(len(inputs), seed)
        self._start: Tensor | None = None

    @classmethod
    def mislabeled(cls, inputs: Tensor, targets: Tensor, num_classes: int, *, seed: int | None = None) -> InputCanaries:
        """Real inputs with a wrong label (a random other class): memorising them is what leaks."""
        if num_classes < 2:
            raise ValueError(f"Expected num_classes={num_classes} >= 2 to mislabel.")
        labels_seed = None if seed is None else seed + 1  # a stream apart from the coin flips
        shift = torch.randint(1, num_classes, targets.shape, generator=_generator(labels_seed))
        return cls(inputs, (targets + shift) % num_classes, seed=seed)

    @classmethod
    def out_of_distribution(
        cls,
        num_canaries: int,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        scale: float = 1.0,
        seed: int | None = None,
    ) -> InputCanaries:
        """Gaussian noise inputs (times ``scale``) with random labels."""
        generator = _generator(None if seed is None else seed + 1)
        inputs = torch.randn((num_canaries, *input_shape), generator=generator) * scale
        targets = torch.randint(0, num_classes, (num_canaries,), generator=generator)
        return cls(inputs, targets, seed=seed)

    def training_set(self, base: Dataset) -> Dataset:
        """The base data followed by the included canaries as ``(input, target)`` items."""
        mask = self.included
        return ConcatDataset([base, TensorDataset(self.inputs[mask], self.targets[mask])])

    @torch.no_grad()
    def losses(self, model: nn.Module, loss_fn: Any = None, batch_size: int = 1024) -> Tensor:
        """``[m]`` per-canary losses (``loss_fn(out, y)`` must return per-sample losses; default cross-entropy)."""
        fn = loss_fn if loss_fn is not None else (lambda out, y: F.cross_entropy(out, y, reduction="none"))
        was_training = model.training
        model.eval()
        try:
            parts = [
                fn(model(self.inputs[i : i + batch_size]), self.targets[i : i + batch_size]).detach().double()
                for i in range(0, len(self.inputs), batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(parts)

    def snapshot(self, model: nn.Module, loss_fn: Any = None) -> None:
        """Remember every canary's loss before training."""
        self._start = self.losses(model, loss_fn)

    def scores(self, model: nn.Module, loss_fn: Any = None) -> Tensor:
        """``[m]`` loss decrease since :meth:`snapshot` (higher = looks included)."""
        if self._start is None:
            raise RuntimeError("Call snapshot(model) before training; scores are measured from it.")
        return self._start - self.losses(model, loss_fn)


def expected_mu(steps: int, noise_multiplier: float) -> float:
    """``sqrt(T) / sigma``: the GDP mu of one Dirac canary after T full-batch steps (sample rate 1).

    Example:
        >>> expected_mu(4, 4.0)
        0.5
    """
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(steps) / noise_multiplier
