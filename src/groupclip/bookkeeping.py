"""State of one forward/backward pass: which uses are pending, which groups are complete, what is held.

A *use* is one call of a module that owns trainable parameters. The forward pass records uses; each use's
output-gradient hook turns it into per-sample gradient contributions. A parameter is complete when all of its
uses have been back-propagated (tied weights and modules called twice have several); a group is complete when
all of its parameters are. A complete group is clipped at once and its kept tensors are released, so the order
is the order the backward pass actually runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .norms.contributions import Contribution, Factored, combine_uses, contribution_bytes


@dataclass
class Use:
    """One call of a module owning trainable parameters, recorded in the forward pass."""

    index: int
    path: str
    module: nn.Module
    params: dict[str, nn.Parameter]  # name relative to module (may be "child.weight") -> parameter
    compute: Callable[[list[Tensor]], dict[str, Contribution]] | None = None
    saved_versions: list[tuple[Tensor, int]] = field(default_factory=list)
    shared_input: int | None = None  # id of an input tensor other uses' rules also factor on (Gram sharing)
    done: bool = False


@dataclass
class MemoryLedger:
    """Bytes the engine holds for clipping beyond what non-private autograd would hold.

    Activations saved in the forward pass replace the ones autograd would have saved for the weight gradient,
    so they are counted apart (``activation_bytes``). Once a use's backward has run, autograd would have freed
    its activation and output gradient; from then until its group is clipped they are *held* (as are
    instantiated per-sample gradients). Storages shared by several uses are counted once.
    """

    held_bytes: int = 0
    peak_held_bytes: int = 0
    activation_bytes: int = 0
    # The engine's ledger over all passes alive at once (pipeline microbatches): held bytes are passed on to it.
    parent: MemoryLedger | None = field(default=None, repr=False)
    _refs: dict[int, list[int]] = field(default_factory=dict)  # storage ptr -> [refcount, nbytes]
    _activations: set[int] = field(default_factory=set)

    def add_activation(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._activations:
            self._activations.add(storage.data_ptr())
            self.activation_bytes += storage.nbytes()

    def hold(self, contribution: Contribution) -> None:
        for ptr, nbytes in contribution_bytes(contribution).items():
            ref = self._refs.setdefault(ptr, [0, nbytes])
            if ref[0] == 0:
                self._change(nbytes)
            ref[0] += 1

    def release(self, contribution: Contribution) -> None:
        for ptr in contribution_bytes(contribution):
            ref = self._refs[ptr]
            ref[0] -= 1
            if ref[0] == 0:
                self._change(-ref[1])
                del self._refs[ptr]

    def _change(self, delta: int) -> None:
        self.held_bytes += delta
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if self.parent is not None:
            self.parent._change(delta)


@dataclass
class ClipReport:
    """What one backward pass computed, per group.

    Attributes:
        batch_size: B of the pass.
        per_sample_norms: group -> ``[B]`` norms of the per-sample gradients (of the per-sample losses).
        clip_factors: group -> ``[B]`` factors ``C_ik`` applied.
        thresholds: group -> ``R_k`` used.
        peak_held_bytes: peak of :class:`MemoryLedger.held_bytes` during the backward pass.
        activation_bytes: bytes of activations saved in the forward pass.
        started_fresh: every ``.grad`` was None before this pass wrote (zeroed with set_to_none): a new logical batch.
    """

    batch_size: int
    per_sample_norms: dict[str, Tensor]
    clip_factors: dict[str, Tensor]
    thresholds: dict[str, float]
    peak_held_bytes: int
    activation_bytes: int
    started_fresh: bool = True


class PassState:
    """Bookkeeping of one pass. Owned by the engine; discarded when the next forward pass starts (with concurrent
    passes: when its backward ends; with deferred clipping: when it is clipped)."""

    def __init__(self, batch_size: int | None, loss_scale: float, parent_ledger: MemoryLedger | None = None) -> None:
        self.batch_size = batch_size
        self.loss_scale = loss_scale  # per-sample loss gradient = loss_scale * gradient of the batch loss
        self.sequence = 0  # the engine numbers its passes in forward order
        self.uses: list[Use] = []
        self.order: list[int] = []  # param ids in order of first use
        self.forward_done = False
        self.backward_started = False
        self.finished = False
        self.ledger = MemoryLedger(parent=parent_ledger)
        self.param_pending: dict[int, int] = {}
        self.param_uses: dict[int, list[Contribution]] = {}
        self.group_pending: dict[str, int] = {}
        self.group_sq: dict[str, Tensor] = {}
        self.group_params: dict[str, list[int]] = {}
        self.param_kept: dict[int, list[Contribution]] = {}
        self.staged: dict[int, Tensor] = {}
        self.norms: dict[str, Tensor] = {}
        self.factors: dict[str, Tensor] = {}
        self.non_finite: dict[str, list[int]] = {}
        self.input_readers: dict[int, int] = {}  # id(input) -> uses whose Factored.right is that input
        self.gram_cache: dict[int, Tensor] = {}

    def shared_gram(self, input_id: int, contribution: Factored) -> None:
        """Give ``contribution`` the Gram of its input, computed once for all uses reading that input.

        The input tensor is kept alive by the uses still pending, so its id cannot be reused while cached.
        """
        readers = self.input_readers.get(input_id, 0)
        if readers > 1 or input_id in self.gram_cache:
            gram = self.gram_cache.get(input_id)
            if gram is None:
                gram = self.gram_cache[input_id] = contribution.gram_of_right()
            contribution.right_gram = gram
        self.input_readers[input_id] = readers - 1
        if readers <= 1:
            self.gram_cache.pop(input_id, None)
            self.input_readers.pop(input_id, None)

    def record_use(self, use: Use) -> None:
        self.uses.append(use)
        for p in use.params.values():
            if id(p) not in self.param_pending:
                self.order.append(id(p))
            self.param_pending[id(p)] = self.param_pending.get(id(p), 0) + 1

    def close_forward(self, group_of: Mapping[int, str], group_members: Mapping[str, list[int]]) -> None:
        """Count, per group, the parameters whose uses the backward pass must complete."""
        self.forward_done = True
        self.group_params = {g: list(ids) for g, ids in group_members.items()}
        for g, ids in group_members.items():
            self.group_pending[g] = sum(1 for i in ids if self.param_pending.get(i, 0) > 0)
        self._group_of = group_of

    def use_done(self, use: Use, contributions: Mapping[str, Contribution]) -> list[str]:
        """Account one use's contributions; returns the groups this completed."""
        use.done = True
        completed = []
        for name, p in use.params.items():
            key = id(p)
            c = contributions.get(name)
            if c is not None:
                self.param_uses.setdefault(key, []).append(c)
                self.ledger.hold(c)
            self.param_pending[key] -= 1
            if self.param_pending[key] == 0:
                group = self._group_of[key]
                self._complete_param(key, group)
                self.group_pending[group] -= 1
                if self.group_pending[group] == 0:
                    completed.append(group)
        return completed

    def _complete_param(self, key: int, group: str) -> None:
        uses = self.param_uses.pop(key, [])
        if not uses:
            return
        sq, kept = combine_uses(uses)
        for c in uses:
            self.ledger.release(c)
        for c in kept:
            self.ledger.hold(c)
        self.param_kept[key] = kept
        prev = self.group_sq.get(group)
        self.group_sq[group] = sq if prev is None else prev + sq

    def pending_groups(self) -> list[str]:
        return [g for g, n in self.group_pending.items() if n > 0 or g not in self.norms]

    def squared_norms(self, group: str) -> Tensor:
        """``[B]`` squared per-sample norms (of the per-sample losses) of a complete group not yet clipped."""
        sq = self.group_sq.get(group)
        if sq is None:
            return torch.zeros(self.batch_size or 0, dtype=torch.float32)
        return sq.clamp_min(0) * self.loss_scale**2

    def clip_group(
        self,
        group: str,
        threshold: float,
        clip: Callable[[Tensor, float], Tensor],
        squared_norms: Tensor | None = None,
    ) -> None:
        """Clip a complete group: per-sample norms, factors, then the clipped sums of its parameters.

        ``squared_norms`` (``[B]``, of the per-sample losses) replaces the group's own: the norms of a group that
        spans processes (all-layer clipping across pipeline stages), summed over the processes' parts.
        """
        sq = self.group_sq.pop(group, None)
        if squared_norms is not None:
            norms = squared_norms.to(sq.dtype if sq is not None else squared_norms.dtype).clamp_min(0).sqrt()
        else:
            if sq is None:
                sq = torch.zeros(self.batch_size or 0, dtype=torch.float32)
            norms = sq.clamp_min(0).sqrt() * self.loss_scale
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            self.non_finite[group] = torch.nonzero(~finite).flatten().tolist()
        factors = clip(norms, threshold)
        proven = getattr(clip, "bound_proven", False)
        if not proven and bool(finite.all()) and not bool((factors * norms <= threshold * (1 + 1e-5) + 1e-12).all()):
            raise ValueError(
                f"Clip function broke its bound on group {group!r}: C * ||g|| exceeds R = {threshold}; "
                "a clip function must return factors with C * norm <= R."
            )
        self.norms[group] = norms.detach()
        self.factors[group] = factors.detach()
        coef = factors * self.loss_scale
        for key in self.group_params.get(group, []):
            kept = self.param_kept.pop(key, None)
            if not kept:
                continue
            total = None
            for c in kept:
                part = c.clipped_sum(coef)
                total = part if total is None else total + part
                self.ledger.release(c)
            self.staged[key] = total

    def report(self, thresholds: Mapping[str, float], started_fresh: bool = True) -> ClipReport:
        return ClipReport(
            batch_size=self.batch_size,
            per_sample_norms=dict(self.norms),
            clip_factors=dict(self.factors),
            thresholds=dict(thresholds),
            peak_held_bytes=self.ledger.peak_held_bytes,
            activation_bytes=self.ledger.activation_bytes,
            started_fresh=started_fresh,
        )
