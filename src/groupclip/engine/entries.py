"""Which modules the engine hooks, and what each one owns: checked at attach, before any hook exists."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModuleError
from ..norms import LayerRule, find_rule

BATCH_MIXING = (nn.modules.batchnorm._BatchNorm,)
SEQUENCE_FIRST = (nn.MultiheadAttention, nn.RNNBase)


@dataclass
class ModuleEntry:
    """A module owning trainable parameters: its rule (None: the generic fallback) and parameter slots.

    ``slots`` are ``(owner, name, name relative to the module, attach-time parameter)``, read at every call: a
    wrapper may swap the tensor in a slot (FSDP2 puts its unsharded parameter there while the module runs); what
    the slot holds is switched off and recorded under the attach-time parameter.
    """

    path: str
    module: nn.Module
    rule: LayerRule | None
    slots: list[tuple[nn.Module, str, str, nn.Parameter]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Precomputed for the per-call hot path.
        self.fast_slots = [(owner._parameters, name) for owner, name, _, _ in self.slots]
        self.canonical = [p for _, _, _, p in self.slots]
        self.params = {local: p for _, _, local, p in self.slots}
        self.local_names = {id(p): local for _, _, local, p in self.slots}
        # A rule layer without submodules may run untracked inside (see Capture._untracked_inside); with them, the
        # hooks of its submodules would need the tags of what it computes.
        self.untracked_inside = (
            self.rule is not None and self.rule.trailing is not None and next(self.module.children(), None) is None
        )

    def describe(self) -> str:
        return f"{self.path or '<root>'} ({type(self.module).__name__})"

    def trainable_now(self) -> list[nn.Parameter]:
        found = []
        for owner, name, _, _ in self.slots:
            p = owner._parameters.get(name)
            if p is not None and p.requires_grad:
                found.append(p)
        return found


def uncalled_children(module: nn.Module) -> list[nn.Module]:
    """Children whose parameters a known module uses without calling the child (so the parent accounts for them)."""
    if isinstance(module, nn.MultiheadAttention):
        return [module.out_proj]
    return []


def batchnorm_message(path: str, module: nn.Module) -> str:
    return (
        f"{path or '<root>'} ({type(module).__name__}) is in training mode: batch statistics mix samples, so "
        "per-sample gradients are not defined. Replace it with GroupNorm "
        "(groupclip.replace_batchnorm(model)), or freeze it and call .eval() on it."
    )


def module_entries(model: nn.Module) -> list[ModuleEntry]:
    """Every module owning trainable parameters, with its rule; raises for modules that cannot be handled."""
    entries = []
    for path, module in model.named_modules():
        if isinstance(module, BATCH_MIXING) and module.training:
            raise UnsupportedModuleError(batchnorm_message(path, module))
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        if not own:
            continue
        rule = find_rule(module)
        if rule is not None and rule.check is not None:
            rule.check(module, path)
        if rule is None and isinstance(module, SEQUENCE_FIRST) and not getattr(module, "batch_first", False):
            raise UnsupportedModuleError(
                f"{path} ({type(module).__name__}) takes sequence-first inputs (batch_first=False), so dim 0 "
                "is not the batch. Construct it with batch_first=True."
            )
        owners = [module] + ([m for c in uncalled_children(module) for m in c.modules()] if rule is None else [])
        prefix = {id(m): f"{p}." if p else "" for p, m in module.named_modules()}
        slots = [
            (owner, name, prefix[id(owner)] + name, p)
            for owner in owners
            for name, p in owner._parameters.items()
            if p is not None and p.requires_grad
        ]
        entries.append(ModuleEntry(path, module, rule, slots))
    return entries
