"""Attach and detach: the engine's hooks have an explicit lifetime, and a refused attach changes nothing."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AttachError, UnattributedGradientError
from ..grouping import needs_execution_order, resolve_grouping, trainable_parameters
from ..norms import register_transformers_layers
from .capture import Capture
from .entries import BATCH_MIXING, module_entries
from .trace import Trace

_ENGINES: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class Lifecycle:
    """Mixin of :class:`~groupclip.engine.ClippingEngine`: attach / detach and the checks around them."""

    def _init_lifecycle(self) -> None:
        self._attached = False
        self._capture: Capture | None = None
        self._leak_handles: list[Any] = []
        self._names: dict[int, str] = {}
        self._batchnorms: list[tuple[str, nn.Module]] = []
        self._attached_snapshot: tuple | None = None
        self._structure_at_attach: list = []

    def attach(self):
        """Install the hooks. All checks run first, so a refused attach changes nothing."""
        if self._attached:
            raise AttachError("This ClippingEngine is already attached; call detach() before attaching again.")
        for owner, engine in list(_ENGINES.items()):
            overlaps = any(m is owner for m in self.model.modules()) or any(m is self.model for m in owner.modules())
            if engine is not self and overlaps:
                raise AttachError(
                    f"{type(owner).__name__} already has a ClippingEngine attached; detach it first "
                    "(two engines on one model would each clip the same gradients)."
                )
        register_transformers_layers()
        sharded = _dtensor_names(trainable_parameters(self.model))
        if sharded and self.grad_sink is None:
            raise AttachError(
                f"Parameters {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are DTensors (FSDP2 fully_shard or "
                "tensor parallel): a ClippingEngine alone would write full-shape clipped sums into sharded gradients. "
                "For a fully_shard-ed model use groupclip.distributed.sharded.make_private_sharded."
            )
        if not needs_execution_order(self.grouping_spec):
            current = resolve_grouping(self.model, self.grouping_spec)  # the trainable set as of now
            if self.grouping is None or current.groups != self.grouping.groups:
                self._set_grouping(current)
            elif self.plan is None or any(id(p) not in self.plan.params for p in self._trainable().values()):
                self._set_grouping(current)  # same names, new parameter objects
        elif self.grouping is not None and self._snapshot() != self._attached_snapshot:
            self.grouping, self.plan = None, None
        entries = module_entries(self.model)  # raises before any hook exists
        self.anchor = torch.zeros((), requires_grad=True)
        capture = Capture(self)
        try:
            capture.install(entries)
            self._install_leak_checks(entries)
        except BaseException:
            capture.remove()
            self._remove_leak_checks()
            raise
        self._capture = capture
        self._attached = True
        self._attached_snapshot = self._snapshot()
        self._structure_at_attach = self._structure()
        trainable = self._trainable()
        self.trainable_ids = {id(p) for p in trainable.values()}
        self._names = {id(p): n for n, p in trainable.items()}
        self._batchnorms = [(path, m) for path, m in self.model.named_modules() if isinstance(m, BATCH_MIXING)]
        _ENGINES[self.model] = self
        return self

    def detach(self) -> None:
        """Remove every hook and all per-pass state; the model is exactly as before :meth:`attach`."""
        try:
            if self._capture is not None:
                self._capture.remove()
            self._remove_leak_checks()
        finally:
            self._capture = None
            self.live = weakref.WeakSet()
            self.deferred = []
            self._attached = False
            self.trainable_ids = set()
            if _ENGINES.get(self.model) is self:
                del _ENGINES[self.model]

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._attached

    # ------------------------------------------------------------------ model identity
    def _snapshot(self) -> tuple:
        """Identity of the model's structure as the hooks saw it: modules and trainable parameters."""
        return (
            tuple(id(m) for m in self.model.modules()),
            tuple((name, id(p)) for name, p in self._trainable().items()),
        )

    def _structure(self) -> list[tuple[dict, str, Any, bool]]:
        """Every module and parameter slot of the model with what it holds now (and, for a parameter, whether
        it is trainable): a flat list that a forward pass can compare against cheaply."""
        slots = []
        for module in self.model.modules():
            for name, child in module._modules.items():
                slots.append((module._modules, name, child, False))
            for name, p in module._parameters.items():
                slots.append((module._parameters, name, p, p is not None and p.requires_grad))
        return slots

    def _trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by canonical name, each as the attach-time parameter (see ``parameter_alias``)."""
        params = trainable_parameters(self.model)
        if self.parameter_alias is None:
            return params
        return {name: self.parameter_alias(p) for name, p in params.items()}

    def _check_unchanged(self) -> None:
        """Refuse a forward pass on a model whose modules or trainable parameters changed since attach."""
        for slots, name, held, trainable in self._structure_at_attach:
            current = slots.get(name)
            if current is not held or (trainable != (current is not None and getattr(current, "requires_grad", False))):
                break
        else:
            return
        if self._snapshot() != self._attached_snapshot:
            raise AttachError(
                "The model changed while the engine was attached (a parameter was frozen/unfrozen or replaced, or a "
                "module was replaced); the hooks and groups no longer match it. Call engine.detach() and "
                "engine.attach() after changing the model."
            )

    # ------------------------------------------------------------------ traces
    def trace_closed(self, trace: Trace) -> None:
        """A forward pass finished: resolve an execution-order grouping from it; keep it until its backward."""
        if self.grouping is None:
            names = self._names
            order = []
            for use in trace.uses:
                for p in use.params.values():
                    if id(p) in names and names[id(p)] not in order:
                        order.append(names[id(p)])
            self._set_grouping(resolve_grouping(self.model, self.grouping_spec, order))
        self.live.add(trace)

    def deferred_call(self, module_id: int):
        """``(trace, recorded layouts)`` of the next recomputation of a module's no_grad call (a reentrant
        checkpoint), from the newest trace whose backward is running; ``(None, None)`` if none awaits one."""
        for trace in sorted(self.live, key=lambda t: -t.number):
            if trace.state is None or trace.state.finished:
                continue
            calls = trace.deferred_calls.get(module_id)
            if calls:
                return trace, calls.popleft()
        return None, None

    # ------------------------------------------------------------------ parameters used outside the forward
    def _install_leak_checks(self, entries) -> None:
        owners: dict[int, list[str]] = {}
        for entry in entries:
            for _, _, local, p in entry.slots:
                owners.setdefault(id(p), []).append(f"{entry.path}.{local}" if entry.path else local)
        for name, p in trainable_parameters(self.model).items():
            self._leak_handles.append(p.register_hook(self._leak_check(name, owners.get(id(p), []))))

    def _remove_leak_checks(self) -> None:
        handles, self._leak_handles = self._leak_handles, []
        for handle in handles:
            handle.remove()

    def _leak_check(self, name: str, owners: list[str]):
        def check(grad: Tensor) -> None:
            if self.suspended_count:
                return
            where = ", ".join(owners) if owners else "no module"
            raise UnattributedGradientError(
                f"Parameter {name!r} received an ordinary, batch-summed gradient, so its per-sample gradients are "
                f"unknown. It was used outside a recorded forward call of the model ({where} own it): a submodule "
                "was called directly rather than through the model the engine is attached to, or a loss term used "
                "the parameter after the forward pass. Call the model itself, and move penalty terms on parameters "
                "(weight decay) into the optimizer."
            )

        return check

    _make_leak_check = _leak_check


def _dtensor_names(params: Mapping[str, nn.Parameter]) -> list[str]:
    """Names of the parameters that are DTensors (none unless torch.distributed.tensor was imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return [name for name, p in params.items() if dtensor is not None and isinstance(p, dtensor)]
