"""The memory ledger: bytes the engine holds for clipping beyond what non-private autograd would hold."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..norms.contributions import Contribution


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

    # hold and release run a few times per use: they read storages directly, once per tensor (a storage shared by
    # two tensors of one contribution gets two references from each, so the counts stay balanced; its bytes once).
    def hold(self, contribution: Contribution) -> None:
        for t in contribution.tensors():
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            ref = self._refs.get(ptr)
            if ref is None:
                nbytes = storage.nbytes()
                self._refs[ptr] = [1, nbytes]
                self._change(nbytes)
            else:
                ref[0] += 1

    def release(self, contribution: Contribution) -> None:
        for t in contribution.tensors():
            ptr = t.untyped_storage().data_ptr()
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
