"""The memory ledger: bytes the engine holds for clipping beyond what non-private autograd would hold."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..norms.contributions import Contribution, contribution_bytes


@dataclass
class MemoryLedger:
    """Bytes held for clipping beyond what non-private autograd would hold.

    Once a use's backward has run, autograd would have freed its activation and output gradient; from then until
    its group is clipped they are *held* (as are instantiated per-sample gradients). Storages shared by several
    uses are counted once. Several ledgers can report into one ``parent`` (all passes alive at once).
    """

    held_bytes: int = 0
    peak_held_bytes: int = 0
    parent: MemoryLedger | None = field(default=None, repr=False)
    _refs: dict[int, list[int]] = field(default_factory=dict)  # storage ptr -> [refcount, nbytes]

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
