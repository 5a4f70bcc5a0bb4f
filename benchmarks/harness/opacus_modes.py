"""The same training step run by Opacus, for side-by-side comparison with groupclip.

Three Opacus styles (``OPACUS_MODES``) run the step of a :class:`~groupclip.planning.Workload`: the fixed batch
in ``work.inputs`` / ``work.targets`` every step, plain SGD, ``loss_reduction="mean"`` and ``noise_multiplier=0``
(the comparison isolates the cost of per-sample clipping; groupclip's benchmark step adds no noise either).

The wiring is Opacus' own public path: ``PrivacyEngine.make_private`` with ``poisson_sampling=False`` and a one-batch
placeholder ``DataLoader`` (only its length is used: sample rate 1, expected batch size ``work.batch_size``); the
batch itself is fed directly. ``make_private`` runs Opacus' ``ModuleValidator.validate`` (no ``fix``), wraps the
model in the ``GradSampleModule`` of the mode and picks the matching ``DPOptimizer``. Where Opacus cannot run a mode
on a model (an unsupported layer, tied parameters under ghost clipping, a validator refusal) its exception is left
to surface from :func:`make_opacus_step` or the first :meth:`OpacusStep.step`; nothing in Opacus is patched. One
check is added: in the hooks modes a parameter whose per-sample gradients do not have one row per sample (a layer
input shared by the batch, as Hugging Face position ids ``[1, T]`` are) raises :class:`OpacusBatchMismatch` before
the optimizer runs, since per-layer clipping would otherwise apply a silently wrong gradient. No parameter moves in a
step that raises. The RDP accountant's step hook (a list append) is the only accounting work in a step.

Opacus is imported lazily: groupclip imports without it, and :class:`OpacusUnavailable` says how to install it.

Example::

    from benchmarks.harness.presets import build_workload
    from benchmarks.harness.opacus_modes import make_opacus_step

    work = build_workload("cnn-tiny", batch_size=8)
    runner = make_opacus_step(work, "opacus-ghost", max_grad_norm=1.0)
    try:
        loss = runner.step()
    finally:
        runner.close()
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from groupclip.planning import Workload

OPACUS_VERSION = "1.6.0"
"""The Opacus release this module was written and verified against."""

OPACUS_MODES: dict[str, str] = {
    "opacus-hooks": "Opacus hooks: per-sample gradients instantiated (GradSampleModule), flat all-layer clipping",
    "opacus-per-layer": (
        "Opacus hooks + DPPerLayerOptimizer: per-parameter clipping, max_grad_norm/sqrt(n_params) per tensor"
    ),
    "opacus-ghost": "Opacus ghost clipping (Fast Gradient Clipping): per-sample norms only, 2 backward passes, flat",
}

# mode -> (grad_sample_mode, clipping) as PrivacyEngine.make_private spells them
_SETTINGS: dict[str, tuple[str, str]] = {
    "opacus-hooks": ("hooks", "flat"),
    "opacus-per-layer": ("hooks", "per_layer"),
    "opacus-ghost": ("ghost", "flat"),
}

# attributes Opacus' hooks leave on submodules (the parameter attributes are removed by Opacus' own cleanup)
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


class OpacusUnavailable(RuntimeError):
    """Opacus is not installed, so the Opacus comparison modes cannot run."""


def _require_opacus() -> Any:
    """The ``opacus`` module, or :class:`OpacusUnavailable` naming how to install it."""
    try:
        import opacus
    except ImportError as exc:
        raise OpacusUnavailable(
            f"The Opacus comparison modes ({', '.join(OPACUS_MODES)}) need Opacus, which is not installed: "
            f"pip install opacus=={OPACUS_VERSION} (or groupclip's bench extra: pip install 'groupclip[bench]')."
        ) from exc
    return opacus


class OpacusBatchMismatch(RuntimeError):
    """Opacus computed a parameter's per-sample gradients with a batch size other than the batch's.

    It happens when a layer's input is shared by the whole batch (Hugging Face models look up position embeddings
    with ``position_ids`` of shape ``[1, T]``): Opacus' grad sampler then returns one "sample" for the whole batch.
    Flat clipping fails on it inside Opacus with a bare ``torch.stack`` size error, and per-layer clipping would clip
    the batch's summed gradient of that parameter as if it were one sample, so the step refuses to run instead.
    """


class _PerSampleCriterion:
    """The workload's loss as an Opacus criterion: ``reduction="none"`` gives the ``[B]`` per-sample losses.

    ``DPLossFastGradientClipping`` sets ``reduction="none"`` around its call and expects one loss per sample (an LM
    loss is already the mean over a sample's tokens, so no ``shape=`` is passed to it).
    """

    def __init__(self, work: Workload, reduction: str = "mean") -> None:
        self.work = work
        self.reduction = reduction

    def __call__(self, logits: Tensor) -> Tensor:
        losses = self.work.per_sample_loss(logits)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()


class OpacusStep:
    """One Opacus training step on a workload's fixed batch; build it with :func:`make_opacus_step`.

    Attributes:
        work: the workload (its ``model`` is wrapped by ``module``; both see the same parameters).
        mode: a key of :data:`OPACUS_MODES`.
        module: Opacus' ``GradSampleModule`` (``GradSampleModuleFastGradientClipping`` for ghost clipping).
        optimizer: Opacus' ``DPOptimizer`` subclass around ``torch.optim.SGD``.
        criterion: ghost mode only: Opacus' ``DPLossFastGradientClipping`` around the workload's loss.
        opacus_version: ``opacus.__version__``.
    """

    def __init__(
        self,
        work: Workload,
        mode: str,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any | None,
        opacus_version: str,
    ) -> None:
        self.work = work
        self.mode = mode
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.opacus_version = opacus_version
        self._closed = False

    def _forward_backward(self) -> Tensor:
        """Forward, loss and Opacus' backward (two passes in ghost mode); returns the detached mean loss."""
        if self._closed:
            raise RuntimeError("This OpacusStep is closed: the Opacus hooks were removed from the model.")
        logits = self.work.logits(self.module)
        if self.criterion is not None:
            loss = self.criterion(logits)  # DPTensorFastGradientClipping: backward() runs both passes
        else:
            loss = self.work.per_sample_loss(logits).mean()
        loss.backward()
        if self.criterion is None:
            self._check_grad_sample_batch()
        return loss.detach()

    def _check_grad_sample_batch(self) -> None:
        """Raise :class:`OpacusBatchMismatch` if a per-sample gradient does not have ``work.batch_size`` rows."""
        size = self.work.batch_size
        bad = [
            f"{name} ({gs.shape[0]} rows)"
            for name, p in self.work.model.named_parameters()
            if isinstance(gs := getattr(p, "grad_sample", None), Tensor) and gs.shape[0] != size
        ]
        if bad:
            raise OpacusBatchMismatch(
                f"Opacus' per-sample gradients of {', '.join(bad)} do not have one row per sample of the batch of "
                f"{size}: the layer's input is shared across the batch (e.g. Hugging Face position_ids of shape "
                f"[1, T]), so Opacus' {_SETTINGS[self.mode][1]} clipping of this parameter would be wrong."
            )

    def step(self) -> float:
        """One training step: forward, loss, backward, ``optimizer.step()`` (clip, scale, SGD), zero the grads.

        Returns:
            the batch's mean loss.

        Raises:
            OpacusBatchMismatch: (hooks modes) a parameter's per-sample gradients do not have one row per sample.
            Exception: whatever Opacus raises for a model it cannot handle; no parameter has been updated then.
        """
        try:
            loss = self._forward_backward()
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)  # also drops per-sample gradients left by a failed step
        return float(loss)

    def clipped_gradients(self) -> dict[str, Tensor]:
        """The gradient Opacus' optimizer would apply for the batch, without applying it (for verification).

        Runs forward, loss and backward, then Opacus' ``optimizer.pre_step()`` (clipping, the zero noise and the
        division by the expected batch size), copies every trainable parameter's ``.grad`` and clears the grads.

        Returns:
            parameter name in ``work.model`` (tied parameters once) -> gradient.
        """
        self._forward_backward()
        self.optimizer.pre_step()
        grads = {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in self.work.model.named_parameters()
            if p.requires_grad
        }
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it put on parameters and submodules; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.module.to_standard_module()  # Opacus' own cleanup: hooks and per-parameter attributes
        finally:
            _strip_model(self.work.model)

    def __enter__(self) -> OpacusStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strip_model(model: nn.Module) -> None:
    """Best-effort removal of what Opacus attached to ``model`` (also after a failed ``make_private``)."""
    handles = model.__dict__.pop("autograd_grad_sample_hooks", None)
    for handle in handles or ():
        handle.remove()
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad"):
            p.__dict__.pop(attr, None)
    for m in model.modules():
        for attr in _MODULE_ATTRS:
            m.__dict__.pop(attr, None)


def make_opacus_step(work: Workload, mode: str, max_grad_norm: float = 1.0, lr: float = 1e-3) -> OpacusStep:
    """Wrap ``work.model`` with Opacus for ``mode`` and return the step runner.

    Args:
        work: the workload; its model is wrapped in place (call :meth:`OpacusStep.close` to unwrap).
        mode: ``"opacus-hooks"`` (flat clipping, per-sample gradients instantiated), ``"opacus-per-layer"``
            (per-parameter clipping at ``max_grad_norm / sqrt(n_params)`` each, so the whole gradient's bound is
            ``max_grad_norm``) or ``"opacus-ghost"`` (ghost clipping: flat, two backward passes).
        max_grad_norm: the clipping threshold (flat) or the root-sum-square of the per-parameter thresholds.
        lr: SGD learning rate.

    Raises:
        ValueError: an unknown mode.
        OpacusUnavailable: Opacus is not installed.
        Exception: whatever Opacus raises for a model it cannot handle in this mode (left as Opacus raised it).
    """
    if mode not in OPACUS_MODES:
        raise ValueError(f"Unknown Opacus mode {mode!r}: expected one of {', '.join(OPACUS_MODES)}.")
    opacus = _require_opacus()
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    grad_sample_mode, clipping = _SETTINGS[mode]
    params = [p for p in work.model.parameters() if p.requires_grad]
    bound: float | list[float] = max_grad_norm
    if clipping == "per_layer":
        bound = [max_grad_norm / math.sqrt(len(params))] * len(params)
    optimizer = torch.optim.SGD(params, lr=lr)
    # Only its length matters to make_private (sample rate 1/len = 1, expected batch size len(dataset) = B).
    placeholder = DataLoader(TensorDataset(torch.zeros(work.batch_size)), batch_size=work.batch_size)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp")
    try:
        wrapped = engine.make_private(
            module=work.model,
            optimizer=optimizer,
            data_loader=placeholder,
            noise_multiplier=0.0,
            max_grad_norm=bound,
            poisson_sampling=False,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            criterion=_PerSampleCriterion(work),
            loss_reduction="mean",
        )
    except BaseException:
        _strip_model(work.model)
        raise
    module, dp_optimizer = wrapped[0], wrapped[1]
    criterion = wrapped[2] if grad_sample_mode == "ghost" else None
    return OpacusStep(work, mode, module, dp_optimizer, criterion, getattr(opacus, "__version__", "unknown"))
