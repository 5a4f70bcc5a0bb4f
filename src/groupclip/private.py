"""One object for the DP side of a training run, :class:`PrivateTraining`, and its builder :func:`make_private`.

    private = make_private(model, optimizer, grouping="layer-wise", max_grad_norm=1.0,
                           target_epsilon=3.0, target_delta=1e-5, epochs=10, batch_size=256, data_size=len(ds))
    for x, y in private.poisson_loader(ds):            # Poisson sampling, as the accountant assumes
        loss = F.cross_entropy(model(x), y)              # mean over the batch: loss_reduction="mean"
        loss.backward()                                  # clipped per-sample sums land in .grad
        optimizer.step()                                 # noise added once, divided by the expected batch size
        optimizer.zero_grad()
    private.epsilon()                                    # spent so far, by dp-accounting

The user's own optimizer object is kept (any ``torch.optim`` optimizer; LR schedulers keep working;
``clip_grad_norm_`` between backward and step is refused, see :class:`GradientChangedError`): a step
pre-hook finishes the gradients (noise ``N(0, (z S)^2)`` once per coordinate, division by the expected batch
size -- where, is the run's :class:`~groupclip.topology.Topology`), a step post-hook records metrics and updates
adaptive thresholds. Several backward passes before one ``step()`` form one logical batch (gradient accumulation).

The privacy ledger is charged per Poisson round DRAWN by :meth:`PrivateTraining.poisson_loader` -- whatever the
loop does with the batch (skipping an empty one spends the same) -- and per step that used no fresh round (a
loop with its own loader). A sample whose per-sample norm is not finite cannot stop a step (that would reveal it):
its contribution to that group is dropped (factor 0, counted in the metrics) and the step proceeds with noise --
also under a ``grad_scaler`` (fp16 loss scaling), where an overflowed sample is dropped the same way rather than
letting the scaler skip the step: a skip decided by the data, without noise, is not covered by the guarantee
(docs/INTEGRATIONS.md, "Mixed precision").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .accounting import AccountantKind, PrivacyAccountant
from .adaptive import AdaptiveClipping, QuantileTracker, gradient_noise_multiplier
from .clipping import ClipFunction
from .engine import ClippingEngine, ClipReport, LossReduction, NormMode
from .engine.loss_scale import (
    LossScaleOverflowWarning,
    check_grad_scaler,
    run_eagerly_under_compile,
    uncompiled,
)
from .gradient_guard import GradientChangedError, GradientGuard
from .grouping import GroupingSpec, trainable_parameters
from .metrics import StepStatistics
from .noise import GaussianNoise, derive_seed, warn_reproducible
from .privacy_plan import PrivacyPlan, PrivacySetupError, plan_privacy
from .sampling import PoissonBatchSampler, poisson_loader
from .setup_checks import (
    LossReductionError,
    check_checkpoint_model,
    check_clipping,
    check_loss_reduction,
    check_model,
    check_optimizer,
    check_options,
    check_seed,
)
from .topology import Topology, registered_topology

__all__ = [
    "GradientChangedError", "LossReductionError", "PrivacySetupError", "PrivateTraining", "check_loss_reduction",
    "make_private",
]  # fmt: skip


_STATE_KEYS = {
    "model", "optimizer", "thresholds", "accountant", "noise", "sampler", "steps", "open_round", "adaptive",
    "privacy", "topology",
}  # fmt: skip


class PrivateTraining:
    """The DP side of a training run: engine, noise, accountant, adaptive thresholds, metrics and checkpoints.

    Build it with :func:`make_private` (or a distributed builder). Attributes of interest: ``engine``,
    ``accountant``, ``plan`` (the resolved :class:`~groupclip.privacy_plan.PrivacyPlan`), ``noise_multiplier``
    (the stated sigma the accountant records), ``gradient_noise_multiplier`` (z used on gradients; larger than
    sigma under adaptive clipping), ``sample_rate``, ``expected_batch_size``, ``sensitivity``, ``steps`` (optimizer
    steps taken), ``rounds`` (Poisson rounds drawn), ``topology``, ``last_metrics``; :meth:`metrics` adds epsilon.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        engine: ClippingEngine,
        plan: PrivacyPlan,
        *,
        topology: Topology,
        noise: GaussianNoise,
        sampler_seed: int | None,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        self.model, self.optimizer, self.engine, self.plan = model, optimizer, engine, plan
        self.topology = topology
        self.noise = noise
        self.sampler_seed = sampler_seed
        self.accountant = PrivacyAccountant(plan.accountant)
        self.adaptive = adaptive
        self.tracker = QuantileTracker(adaptive, list(engine.thresholds)) if adaptive is not None else None
        self.gradient_noise_multiplier = plan.noise_multiplier
        if self.tracker is not None:
            sigma_b = self.tracker.count_noise_std(plan.expected_batch_size)
            self.gradient_noise_multiplier = gradient_noise_multiplier(
                plan.noise_multiplier, len(engine.thresholds), sigma_b
            )
        self.steps = 0
        self.rounds = 0
        self.sampler: PoissonBatchSampler | None = None
        self._open_round = False  # a round was drawn (and charged) since the last step
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.stats = StepStatistics(list(engine.thresholds) if engine.grouping is not None else None)
        self._handles: list = []
        self._undo_eager: Callable[[], None] = lambda: None
        try:  # everything installed below is removed again if any of it fails
            self._undo_eager = run_eagerly_under_compile(model)
            topology.bind(engine, list(trainable_parameters(model).values()))
            self.guard = GradientGuard(topology.params, engine.parameter_name)
            self.guard.scaled = lambda: self.grad_scaler is not None and self.grad_scaler.is_enabled()
            self._handles.append(engine.add_report_hook(self._on_report))
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        except BaseException:
            self.detach()
            raise

    def __getattr__(self, name: str) -> Any:
        # What only one topology has (a pipeline stage's schedule()) is reached through the training object.
        topology = self.__dict__.get("topology")
        if topology is not None and name in topology.exports:
            return getattr(topology, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ settings, read-only
    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def expected_batch_size(self) -> float:
        return self.plan.expected_batch_size

    @property
    def delta(self) -> float:
        return self.plan.delta

    @property
    def sensitivity(self) -> float:
        """``S``: the L2 sensitivity of one step's clipped sum (every group of the run)."""
        return self.topology.sensitivity()

    # ------------------------------------------------------------------ the loop
    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` after checking the loss' reduction against the declared one where detectable.

        The loss is also recorded for :meth:`metrics` (the mean per-sample loss of the logical batch).
        """
        check_loss_reduction(loss, self.engine.loss_reduction)
        value = loss.detach()
        loss.backward()
        report = self.engine.last_report
        batch = report.batch_size if report is not None else 0
        self.stats.add_loss(value * batch if self.engine.loss_reduction == "mean" else value)

    def poisson_loader(self, dataset: Dataset, **loader_kwargs: Any) -> DataLoader:
        """A Poisson-sampling loader at this run's sample rate; every round it draws is charged to the ledger.

        Its sampler state goes into checkpoints. ``loader_kwargs`` go to ``DataLoader`` (``collate_fn``,
        ``num_workers``; rounds a worker prefetches are charged when drawn, a few more than used at the end).
        """
        if len(dataset) < 1:
            raise PrivacySetupError("The dataset is empty.")
        shard = self.topology.sampler_shard()
        if shard is not None:
            loader_kwargs = {**loader_kwargs, "shard": shard}
        loader = poisson_loader(dataset, self.sample_rate, seed=self.sampler_seed, **loader_kwargs)
        loader.batch_sampler.on_round = self._on_round
        if self.sampler is not None:  # a second loader continues the first's random stream
            loader.batch_sampler.load_state_dict({**self.sampler.state_dict(), "position": 0})
        self.sampler = loader.batch_sampler
        return loader

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's delta)."""
        return self.accountant.epsilon(self.delta if delta is None else delta)

    @property
    def last_metrics(self) -> dict[str, Any]:
        """Metrics of the last step: samples, loss, noise std, thresholds, per group the fraction clipped, the mean
        clip factor and the samples dropped for a non-finite norm (read from the device on first access)."""
        return self.stats.last()

    def metrics(self, with_epsilon: bool = True) -> dict[str, Any]:
        """``last_metrics``, plus the epsilon spent so far at the run's delta."""
        out = dict(self.last_metrics)
        if with_epsilon:
            out["epsilon"] = self.epsilon()
            out["delta"] = self.delta
        return out

    # ------------------------------------------------------------------ hooks
    def _charge(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def _on_round(self) -> None:
        self._charge()
        self.rounds += 1
        self._open_round = True

    def _on_report(self, report: ClipReport) -> None:
        if report.started_fresh:  # gradients were set to None: a new logical batch
            self.stats.new_batch()
            if self.tracker is not None:
                self.tracker.reset()
        self.stats.observe(report)
        if self.tracker is not None:
            self.tracker.observe(report.within_thresholds())
        if self.grad_scaler is not None and self.grad_scaler.is_enabled() and report.dropped:
            overflowed = len(set().union(*report.dropped.values()))
            warnings.warn(
                f"{overflowed} sample(s) overflowed at loss scale {self.grad_scaler.get_scale():g} and were dropped "
                "from this step (DP: the step itself proceeds, with noise). Lower the GradScaler's init_scale, or "
                "train in bf16.",
                LossScaleOverflowWarning,
                stacklevel=2,
            )
        self.guard.record()  # what the engine left in .grad: checked at step()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.guard.check()
        std = self.gradient_noise_multiplier * self.sensitivity
        self.topology.finish_gradients(self.noise, std, self.expected_batch_size)
        self.stats.noise_std = std

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._open_round:
            self._open_round = False
        else:  # a step on data no round of this run drew: it is a release of its own
            self._charge()
        self.guard.clear()
        self.steps += 1
        thresholds = dict(self.engine.thresholds)
        if self.tracker is not None:
            if self.tracker.centered is not None:
                self.tracker.centered = self.topology.total(self.tracker.centered)
            new, fractions = self.topology.on_rank0(
                lambda: self.tracker.update(thresholds, self.expected_batch_size, self.noise)
            )
            self.tracker.reset()
            self.engine.set_thresholds(new)
            self.stats.extra["noisy_fraction_under_threshold"] = fractions
        self.stats.close_step(self.steps, thresholds, self.topology)

    # ------------------------------------------------------------------ lifetime and checkpoints
    def attach_grad_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """Train with loss scaling: every backward is on ``scaler.scale(loss)`` and steps are ``scaler.step``.

        Per-sample norms are divided by the scaler's scale (read once per backward pass), so clipping acts on the
        unscaled gradients; the clipped sums keep the scale for ``scaler.unscale_`` (inside ``scaler.step``, before
        the noise is added) to divide. An overflowed sample (a non-finite per-sample norm) is dropped like any
        non-finite sample, with a :class:`LossScaleOverflowWarning`; the scaler never sees an overflow, so its scale
        only grows on its timer (``growth_interval``) -- data-independently. One process only.
        """
        check_grad_scaler(scaler)
        if type(self.topology) is not Topology:
            raise PrivacySetupError(
                f"grad_scaler works on one process; this run's topology is {self.topology.name!r}. Train in bf16 "
                "(no loss scaling) instead."
            )
        self.grad_scaler = scaler
        self.engine.grad_scale = scaler.get_scale

    def detach(self) -> None:
        """Remove the optimizer hooks and detach the engine (the model and optimizer are ordinary again)."""
        try:
            for handle in self._handles:
                handle.remove()
            self.topology.unbind()
        finally:
            self._handles = []
            self.engine.grad_scale = None
            self._undo_eager()
            self._undo_eager = lambda: None
            if self.engine.attached:
                self.engine.detach()

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume bit-identically: model, optimizer, thresholds, ledger, noise and sampler RNGs.

        Keep it private: the noise generator state reveals the noise of the steps after it.
        """
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "thresholds": dict(self.engine.thresholds),
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "steps": self.steps,
            "open_round": self._open_round,
            "adaptive": self.tracker.state_dict() if self.tracker is not None else None,
            "privacy": _plan_state(self.plan),
            "topology": self.topology.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` made by a run with the same privacy settings; nothing changes on error."""
        if not isinstance(state, Mapping) or not _STATE_KEYS <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise PrivacySetupError(
                f"Not a PrivateTraining checkpoint: expected keys {sorted(_STATE_KEYS)}, got {got}. Save one with "
                "private.state_dict()."
            )
        if dict(state["privacy"]) != _plan_state(self.plan):
            raise PrivacySetupError(
                f"The checkpoint was made with privacy settings {dict(state['privacy'])}, this run has "
                f"{_plan_state(self.plan)}; resume with the same settings."
            )
        if state["sampler"] is not None and self.sampler is None:
            raise PrivacySetupError("The checkpoint has a sampler state: call poisson_loader() before loading.")
        if set(state["thresholds"]) != set(self.engine.thresholds):
            raise PrivacySetupError(
                f"The checkpoint's groups {sorted(state['thresholds'])} differ from this run's "
                f"{sorted(self.engine.thresholds)}; resume with the same grouping."
            )
        check_checkpoint_model(self.model, state["model"])  # load_state_dict would copy the fitting part
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.set_thresholds(state["thresholds"])
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.steps = state["steps"]
        self._open_round = state["open_round"]
        self.rounds = self.accountant.steps
        if self.tracker is not None and state["adaptive"] is not None:
            self.tracker.load_state_dict(state["adaptive"])
        self.topology.load_state_dict(state["topology"])


def _plan_state(plan: PrivacyPlan) -> dict[str, Any]:
    return {
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "delta": plan.delta,
    }


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grouping: GroupingSpec = "all-layer",
    max_grad_norm: float | Mapping[str, float] = 1.0,
    clip_fn: str | ClipFunction = "abadi",
    clip_options: Mapping[str, float] | None = None,
    loss_reduction: LossReduction = "mean",
    norm_mode: NormMode | Mapping[str, NormMode] = "auto",
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float | None = None,
    batch_size: float | None = None,
    data_size: int | None = None,
    accountant: AccountantKind = "rdp",
    adaptive: AdaptiveClipping | None = None,
    noise_seed: int | None = None,
    seed: int | None = None,
    secure_noise: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    topology: Topology | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> PrivateTraining:
    """Make ``model`` + ``optimizer`` train with DP; returns the :class:`PrivateTraining` that owns the hooks.

    Privacy: give ``noise_multiplier``, or ``target_epsilon`` (with ``epochs`` or ``steps``) to calibrate it.
    Sampling: ``data_size`` N and either ``sample_rate`` q or ``batch_size`` (expected, q = B / N). Every setting
    is checked before anything is attached (:func:`~groupclip.privacy_plan.plan_privacy`).

    Randomness: the noise and the Poisson sampling are seeded from the OS unless ``noise_seed`` is given (then
    both are reproducible, with a :class:`~groupclip.noise.ReproducibleNoiseWarning`); ``seed`` is the same
    setting under its old name. ``secure_noise`` draws the noise from the OS CSPRNG (slow).

    Topology: one process by default. ``distributed=True`` (under ``torchrun`` after ``init_process_group``;
    ``process_group`` default: the world) is data parallel, from :mod:`groupclip.distributed` -- ``data_size`` and
    ``batch_size`` are then the GLOBAL ones; or pass a ``topology`` object.

    Mixed precision and compilation (docs/INTEGRATIONS.md): bf16 needs nothing; with fp16 loss scaling pass the
    ``torch.amp.GradScaler`` as ``grad_scaler`` (:meth:`PrivateTraining.attach_grad_scaler`). ``model`` may be a
    ``torch.compile`` module (its parameters keep the user's names); under the engine the model runs eagerly.
    ``torch.nn.utils.clip_grad_norm_`` between backward and step is refused at ``step()``.

    Raises:
        PrivacySetupError: missing or inconsistent privacy settings.
        UnreachableEpsilonError: the target epsilon cannot be reached in the given steps (names the nearest).
        TypeError / ValueError: a model or optimizer that is not one, parameters the optimizer does not hold (named).
        DistributedSetupError: (distributed) no process group, a DDP-wrapped model, or ranks that disagree.
    """
    model = uncompiled(model)
    check_model(model)
    optimizer = check_optimizer(model, optimizer)
    if grad_scaler is not None:
        check_grad_scaler(grad_scaler)
    if seed is not None and noise_seed is not None and seed != noise_seed:
        raise PrivacySetupError(f"seed={seed} and noise_seed={noise_seed}: seed is the old name; give one.")
    noise_seed = check_seed("noise_seed" if noise_seed is not None else "seed", noise_seed if seed is None else seed)
    check_clipping(model, grouping, max_grad_norm)
    check_options(
        adaptive=adaptive, secure_noise=secure_noise, distributed=distributed, process_group=process_group,
        topology=topology,
    )  # fmt: skip
    plan = plan_privacy(
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, target_delta=target_delta,
        epochs=epochs, steps=steps, sample_rate=sample_rate, batch_size=batch_size, data_size=data_size,
        accountant=accountant,
    )  # fmt: skip
    if topology is None:
        topology = registered_topology("data-parallel")(process_group) if distributed else Topology()
    engine = ClippingEngine(
        model, grouping=grouping, max_grad_norm=max_grad_norm, clip_fn=clip_fn, clip_options=clip_options,
        loss_reduction=loss_reduction, norm_mode=norm_mode, nonfinite="drop",
    )  # fmt: skip
    if adaptive is not None and engine.grouping is None:
        raise PrivacySetupError(
            "Adaptive clipping needs the groups up front; use a grouping other than an int, or explicit groups."
        )
    settings = agreement_settings(engine, clip_fn, clip_options, loss_reduction, norm_mode, plan, adaptive)
    topology.prepare(model, engine, settings | {"secure_noise": secure_noise, "seeded": noise_seed is not None})
    private = build_private(model, optimizer, engine, plan, topology, noise_seed, secure_noise, adaptive)
    if grad_scaler is not None:
        try:
            private.attach_grad_scaler(grad_scaler)
        except BaseException:
            private.detach()
            raise
    return private


def build_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: ClippingEngine,
    plan: PrivacyPlan,
    topology: Topology,
    noise_seed: int | None,
    secure_noise: bool,
    adaptive: AdaptiveClipping | None,
) -> PrivateTraining:
    """Attach ``engine`` and build the :class:`PrivateTraining` (the last step of every builder)."""
    if noise_seed is not None:
        warn_reproducible(noise_seed)
    sampler_seed = topology.shared_seed(None if noise_seed is None else derive_seed(noise_seed, "sampler"))
    noise = GaussianNoise(seed=topology.noise_seed(noise_seed), secure=secure_noise)
    engine.attach()
    try:
        return PrivateTraining(
            model, optimizer, engine, plan, topology=topology, noise=noise, sampler_seed=sampler_seed,
            adaptive=adaptive,
        )  # fmt: skip
    except BaseException:
        engine.detach()
        raise


def agreement_settings(
    engine: ClippingEngine,
    clip_fn: str | ClipFunction,
    clip_options: Mapping[str, float] | None,
    loss_reduction: str,
    norm_mode: Any,
    plan: PrivacyPlan,
    adaptive: AdaptiveClipping | None,
) -> dict[str, Any]:
    """What every rank (or pipeline stage) of one run must agree on."""
    return {
        "grouping": engine.grouping.groups if engine.grouping is not None else engine.grouping_spec,
        "thresholds": engine.thresholds,
        "clip_fn": clip_fn if isinstance(clip_fn, str) else type(clip_fn).__qualname__,
        "clip_options": dict(clip_options or {}),
        "loss_reduction": loss_reduction,
        "norm_mode": norm_mode,
        **_plan_state(plan),
        "accountant": plan.accountant,
        "adaptive": repr(adaptive),
        "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in trainable_parameters(engine.model).items()],
    }
