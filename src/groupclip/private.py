"""One call that turns an ordinary training loop into a DP one: :func:`make_private`.

    private = make_private(model, optimizer, grouping="layer-wise", max_grad_norm=1.0,
                           target_epsilon=3.0, target_delta=1e-5, epochs=10, batch_size=256, data_size=len(ds))
    for x, y in private.poisson_loader(ds):            # Poisson sampling, as the accountant assumes
        loss = F.cross_entropy(model(x), y)              # mean over the batch: loss_reduction="mean"
        loss.backward()                                  # clipped per-sample sums land in .grad
        optimizer.step()                                 # noise added once, divided by the expected batch size
        optimizer.zero_grad()
    private.epsilon()                                    # spent so far, by dp-accounting

The user's own optimizer object is kept (any ``torch.optim`` optimizer; LR schedulers and gradient utilities keep
working): groupclip registers a step pre-hook that adds ``N(0, (z S)^2)`` to every trainable parameter's clipped
sum and divides by the expected batch size, and a step post-hook that records the step in the accountant and
updates adaptive thresholds. Several backward passes before one ``step()`` form one logical batch (gradient
accumulation); the noise is added once.

Loss reduction: declare ``loss_reduction="mean"`` if the loss is the mean of per-sample losses over the (physical)
batch, ``"sum"`` if it is their sum. :meth:`PrivateTraining.backward` checks the declaration against the loss'
final autograd node where it can (a ``mean``/``sum`` reduction or a loss function's ``reduction``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .accounting import AccountantKind, PrivacyAccountant, calibrate_noise_multiplier
from .adaptive import AdaptiveClipping, QuantileTracker, gradient_noise_multiplier
from .clipping import ClipFunction
from .distributed import data_parallel as dp
from .distributed.agreement import check_agreement
from .engine import ClippingEngine, ClipReport, LossReduction, NormMode
from .errors import DistributedSetupError, GroupClipError, NonFiniteNormError
from .grouping import GroupingSpec, trainable_parameters
from .noise import GaussianNoise
from .sampling import PoissonBatchSampler, expected_steps, poisson_loader


class PrivacySetupError(GroupClipError, ValueError):
    """The privacy settings are incomplete or inconsistent."""


class LossReductionError(GroupClipError, ValueError):
    """The loss' reduction contradicts the declared ``loss_reduction``."""


class PrivateTraining:
    """The DP side of a training run: engine, noise, accountant, adaptive thresholds, metrics and checkpoints.

    Build it with :func:`make_private`. Attributes of interest: ``engine``, ``accountant``, ``noise_multiplier``
    (the stated sigma the accountant records), ``gradient_noise_multiplier`` (z used on gradients; larger than
    sigma under adaptive clipping), ``sample_rate``, ``expected_batch_size``, ``steps`` (taken so far),
    ``last_metrics`` (of the last step: samples, noise std, thresholds, fraction clipped and mean clip factor per
    group, and the mean per-sample loss when :meth:`backward` was used); :meth:`metrics` adds epsilon.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        engine: ClippingEngine,
        *,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        delta: float,
        accountant: PrivacyAccountant,
        noise: GaussianNoise,
        adaptive: AdaptiveClipping | None,
        planned_steps: int | None,
        seed: int | None,
        process_group: Any = None,
        distributed: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.delta = delta
        self.accountant = accountant
        self.noise = noise
        self.adaptive = adaptive
        self.tracker = QuantileTracker(adaptive) if adaptive is not None else None
        self.planned_steps = planned_steps
        self.seed = seed
        self.distributed = distributed
        self.process_group = process_group
        self.rank, self.world_size = dp.require_process_group(process_group) if distributed else (0, 1)
        self.steps = 0
        self.sampler: PoissonBatchSampler | None = None
        self.last_metrics: dict[str, Any] = {}
        self.gradient_noise_multiplier = noise_multiplier
        if self.tracker is not None:
            sigma_b = self.tracker.count_noise_std(expected_batch_size)
            self.gradient_noise_multiplier = gradient_noise_multiplier(
                noise_multiplier, len(engine.thresholds), sigma_b
            )
        self._reset_batch_stats()
        engine.defer_nonfinite_error = distributed
        self._handles = [
            engine.add_report_hook(self._on_report),
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------------ the loop
    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` after checking the loss' reduction against the declared one where detectable.

        The loss value is also recorded for :meth:`metrics` (as the mean per-sample loss of the logical batch).
        """
        check_loss_reduction(loss, self.engine.loss_reduction)
        value = float(loss.detach())
        loss.backward()
        batch = self.engine.last_report.batch_size if self.engine.last_report is not None else 0
        per_sample_total = value * batch if self.engine.loss_reduction == "mean" else value
        self._loss_sum = getattr(self, "_loss_sum", 0.0) + per_sample_total

    def metrics(self, with_epsilon: bool = True) -> dict[str, Any]:
        """Metrics of the last step (see ``last_metrics``), plus the epsilon spent so far at the run's delta."""
        out = dict(self.last_metrics)
        if with_epsilon:
            out["epsilon"] = self.epsilon()
            out["delta"] = self.delta
        return out

    def poisson_loader(self, dataset: Dataset, **loader_kwargs: Any) -> DataLoader:
        """A Poisson-sampling loader at this run's sample rate (its sampler state goes into checkpoints)."""
        if len(dataset) * self.sample_rate <= 0:
            raise PrivacySetupError("The dataset is empty.")
        seed = None if self.seed is None else self.seed + 1
        if self.distributed:  # one global Poisson mask (shared seed); each rank keeps every world-th index
            loader_kwargs = {**loader_kwargs, "shard": (self.rank, self.world_size)}
        loader = poisson_loader(dataset, self.sample_rate, seed=seed, **loader_kwargs)
        self.sampler = loader.batch_sampler
        return loader

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's target delta)."""
        return self.accountant.epsilon(self.delta if delta is None else delta)

    # ------------------------------------------------------------------ hooks
    def _reset_batch_stats(self) -> None:
        self._samples = 0
        self._loss_sum = 0.0
        self._clipped: dict[str, float] = {}
        self._factor_sum: dict[str, float] = {}
        self._nonfinite_seen = self.engine.nonfinite_passes

    def _on_report(self, report: ClipReport) -> None:
        if report.started_fresh:  # gradients were set to None: a new logical batch
            self._reset_batch_stats()
            if self.tracker is not None:
                self.tracker.counts = {}
        # A refused (non-finite) backward wrote nothing; a later successful one makes the batch steppable again.
        self._nonfinite_seen = self.engine.nonfinite_passes
        self._samples += report.batch_size
        for group, factors in report.clip_factors.items():
            self._clipped[group] = self._clipped.get(group, 0.0) + float((factors < 1).sum())
            self._factor_sum[group] = self._factor_sum.get(group, 0.0) + float(factors.sum())
        if self.tracker is not None:
            self.tracker.observe(report.per_sample_norms, report.thresholds)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = list(trainable_parameters(self.model).values())
        failed = self.engine.nonfinite_passes != self._nonfinite_seen or any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params
        )
        if self.distributed:  # every rank learns of a failure on any rank: all refuse the step together
            failed = dp.any_rank(failed, self.process_group)
        if failed:
            self._reset_batch_stats()
            if self.tracker is not None:
                self.tracker.counts = {}
            where = " on some rank" if self.distributed else ""
            raise NonFiniteNormError(
                f"The last backward pass{where} had non-finite per-sample norms (or a clipped sum is not finite); "
                "the step was not taken and nothing was updated (parameters, optimizer state, accountant). Call "
                "optimizer.zero_grad() and continue with the next batch."
            )
        std = self.gradient_noise_multiplier * self.engine.sensitivity
        self._noise_std = std
        if self.distributed:
            with torch.no_grad():
                dp.all_reduce_gradients(params, self.process_group, self._noise_adder(std) if self.rank == 0 else None)
                for p in params:
                    p.grad.div_(self.expected_batch_size)
            return
        with torch.no_grad():
            for p in params:
                noise = self.noise.sample(p.shape, std, dtype=p.dtype, device=p.device)
                grad = noise if p.grad is None else p.grad.add_(noise)
                p.grad = grad.div_(self.expected_batch_size)

    def _noise_adder(self, std: float):
        def add(p: nn.Parameter, grad: Tensor) -> None:
            grad.add_(self.noise.sample(p.shape, std, dtype=p.dtype, device=p.device))

        return add

    def _sum_batch_stats_over_ranks(self) -> None:
        """Global (all-rank) samples, loss, clipped counts and factor sums, for the step's metrics."""
        groups = sorted(self.engine.thresholds)  # resolved up front in data-parallel runs: the same on every rank
        local = {"samples": self._samples, "loss": self._loss_sum}
        local.update({f"clipped/{g}": v for g, v in self._clipped.items()})
        local.update({f"factor/{g}": v for g, v in self._factor_sum.items()})
        keys = ["samples", "loss", *(f"clipped/{g}" for g in groups), *(f"factor/{g}" for g in groups)]
        total = dp.all_reduce_sums(local, keys, self.process_group)
        self._samples = int(total["samples"])
        self._loss_sum = total["loss"]
        self._clipped = {g: total[f"clipped/{g}"] for g in groups}
        self._factor_sum = {g: total[f"factor/{g}"] for g in groups}

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.distributed:
            self._sum_batch_stats_over_ranks()
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.steps += 1
        thresholds = dict(self.engine.thresholds)
        metrics: dict[str, Any] = {
            "step": self.steps,
            "samples": self._samples,
            "noise_std": self._noise_std,
            "thresholds": thresholds,
            "fraction_clipped": {g: c / self._samples for g, c in self._clipped.items()} if self._samples else {},
            "mean_clip_factor": {g: s / self._samples for g, s in self._factor_sum.items()} if self._samples else {},
            "loss": self._loss_sum / self._samples if self._samples and self._loss_sum else None,
        }
        if self.tracker is not None:
            if self.distributed:  # global counts; rank 0 draws the count noise and decides the thresholds
                self.tracker.counts = dp.all_reduce_sums(self.tracker.counts, sorted(thresholds), self.process_group)
                update = None
                if self.rank == 0:
                    update = self.tracker.update(thresholds, self.expected_batch_size, self.noise)
                new, fractions = dp.broadcast_object(update, self.process_group)
                self.tracker.counts = {}
            else:
                new, fractions = self.tracker.update(thresholds, self.expected_batch_size, self.noise)
            self.engine.set_thresholds(new)
            metrics["noisy_fraction_under_threshold"] = fractions
        self.last_metrics = metrics
        self._reset_batch_stats()

    # ------------------------------------------------------------------ lifetime and checkpoints
    def detach(self) -> None:
        """Remove the optimizer hooks and detach the engine (the model and optimizer are ordinary again)."""
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles = []
            if self.engine.attached:
                self.engine.detach()

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume bit-identically: model, optimizer, thresholds, ledger, noise and sampler RNGs."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "thresholds": dict(self.engine.thresholds),
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "steps": self.steps,
            "adaptive_counts": dict(self.tracker.counts) if self.tracker is not None else None,
            "privacy": {
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size,
                "delta": self.delta,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the privacy settings must match this run's."""
        mine = self.state_dict()["privacy"]
        if dict(state["privacy"]) != mine:
            raise PrivacySetupError(
                f"The checkpoint was made with privacy settings {dict(state['privacy'])}, this run has {mine}; "
                "resume with the same settings."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.set_thresholds(state["thresholds"])
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state["sampler"] is not None:
            if self.sampler is None:
                raise PrivacySetupError("The checkpoint has a sampler state: call poisson_loader() before loading.")
            self.sampler.load_state_dict(state["sampler"])
        self.steps = state["steps"]
        if self.tracker is not None and state["adaptive_counts"] is not None:
            self.tracker.counts = dict(state["adaptive_counts"])


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
    batch_size: int | None = None,
    data_size: int | None = None,
    accountant: AccountantKind = "rdp",
    adaptive: AdaptiveClipping | None = None,
    seed: int | None = None,
    secure_noise: bool = False,
    distributed: bool = False,
    process_group: Any = None,
) -> PrivateTraining:
    """Make ``model`` + ``optimizer`` train with DP; returns the :class:`PrivateTraining` that owns the hooks.

    Privacy: give ``noise_multiplier``, or ``target_epsilon`` (with ``target_delta`` and ``epochs`` or ``steps``) to
    calibrate it. Sampling: ``data_size`` N and either ``sample_rate`` q or ``batch_size`` (expected, q = B / N).

    Data parallel (``distributed=True``, under ``torchrun`` after ``init_process_group``; ``process_group``
    default: the world): ``data_size`` and ``batch_size`` are the GLOBAL ones; each rank clips its own samples, the
    clipped sums are all-reduced with noise added once (by rank 0), the Poisson loader splits one global Poisson
    sample among the ranks, and every rank reports the same epsilon. All ranks must pass the same settings
    (checked: all raise together otherwise). See :mod:`groupclip.distributed.data_parallel`.

    Raises:
        PrivacySetupError: missing or inconsistent settings.
        UnreachableEpsilonError: the target epsilon cannot be reached in the given steps (names the nearest).
        ValueError: the optimizer holds parameters the model does not, or misses trainable ones (both named).
        DistributedSetupError: (``distributed=True``) no process group, a DDP-wrapped model, or ranks that
            disagree on the grouping, thresholds, clip function or privacy settings -- raised on every rank.
    """
    dp.refuse_ddp_wrapper(model)
    if distributed:
        dp.require_process_group(process_group)
    _check_optimizer(model, optimizer)
    if distributed:
        dp.refuse_sharded_parameters(model)
    settings = resolve_privacy_settings(
        noise_multiplier, target_epsilon, target_delta, epochs, steps, sample_rate, batch_size, data_size, accountant
    )
    noise_multiplier, sample_rate, delta, planned = (
        settings["noise_multiplier"],
        settings["sample_rate"],
        settings["delta"],
        settings["planned_steps"],
    )
    expected = sample_rate * data_size
    engine = ClippingEngine(
        model,
        grouping=grouping,
        max_grad_norm=max_grad_norm,
        clip_fn=clip_fn,
        clip_options=clip_options,
        loss_reduction=loss_reduction,
        norm_mode=norm_mode,
    )
    if adaptive is not None and engine.grouping is None:
        raise PrivacySetupError(
            "Adaptive clipping needs the groups up front; use a grouping other than an int, or explicit groups."
        )
    if distributed and engine.grouping is None:
        # An int M grouping resolves at the first forward pass, which a rank with an empty Poisson batch skips:
        # that rank would not know the thresholds (nor the noise's sensitivity), so it must be known up front.
        raise DistributedSetupError(
            f"grouping={grouping!r} (M blocks in execution order) is only known after a forward pass, which a rank "
            "may skip (an empty Poisson batch). Resolve it up front and pass the groups: groups = "
            "groupclip.grouping.resolve_grouping(model, M, order).groups with the parameter names in execution "
            "order (groupclip.training.runner.execution_order gives it), or use a named or explicit grouping."
        )
    if distributed:
        seed = dp.shared_seed(seed, process_group)
        check_agreement(
            agreement_settings(engine, clip_fn, clip_options, loss_reduction, norm_mode, settings, adaptive)
            | {"seed": seed, "secure_noise": secure_noise},
            what="grouping and privacy settings",
            group=process_group,
        )
        dp.broadcast_model(model, process_group)
    engine.attach()
    try:
        return PrivateTraining(
            model,
            optimizer,
            engine,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            expected_batch_size=expected,
            delta=delta,
            accountant=PrivacyAccountant(accountant),
            noise=GaussianNoise(seed=seed, secure=secure_noise),
            adaptive=adaptive,
            planned_steps=planned,
            seed=seed,
            process_group=process_group,
            distributed=distributed,
        )
    except BaseException:
        engine.detach()
        raise


def resolve_privacy_settings(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    target_delta: float | None,
    epochs: float | None,
    steps: int | None,
    sample_rate: float | None,
    batch_size: int | None,
    data_size: int | None,
    accountant: AccountantKind,
) -> dict[str, Any]:
    """The privacy settings of a run, checked and completed (see :func:`make_private` for the arguments).

    Returns ``{noise_multiplier, sample_rate, data_size, delta, accountant, planned_steps}``: ``sample_rate`` from
    ``batch_size / data_size`` if not given, ``delta`` defaulting to ``min(1e-5, 1/(10 N))``, ``planned_steps`` from
    ``steps`` or ``epochs``, and ``noise_multiplier`` calibrated to ``target_epsilon`` if not given.

    Raises:
        PrivacySetupError: missing or inconsistent settings.
        UnreachableEpsilonError: the target epsilon cannot be reached in the planned steps.
    """
    if data_size is None or data_size < 1:
        raise PrivacySetupError("Give data_size (the number of training examples N).")
    if sample_rate is None:
        if batch_size is None:
            raise PrivacySetupError("Give sample_rate, or batch_size (the expected batch size) with data_size.")
        sample_rate = batch_size / data_size
    elif batch_size is not None and not math.isclose(sample_rate * data_size, batch_size, rel_tol=1e-9):
        raise PrivacySetupError(
            f"sample_rate={sample_rate} and batch_size={batch_size} disagree for data_size={data_size} "
            f"(q * N = {sample_rate * data_size:g}); give one of them."
        )
    if not 0 < sample_rate <= 1:
        raise PrivacySetupError(f"Expected sample_rate={sample_rate} in (0, 1].")
    delta = target_delta if target_delta is not None else min(1e-5, 1 / (10 * data_size))
    if delta >= 1 / data_size:
        warnings.warn(
            f"target_delta={delta} >= 1/N = {1 / data_size:.3g}: such a delta allows leaking a whole example; "
            "use delta well below 1/N (e.g. 1/(10 N)).",
            stacklevel=3,
        )
    planned = steps if steps is not None else (expected_steps(sample_rate, epochs) if epochs is not None else None)
    if noise_multiplier is None:
        if target_epsilon is None or target_delta is None or planned is None:
            raise PrivacySetupError(
                "Give noise_multiplier, or target_epsilon with target_delta and epochs or steps to calibrate it."
            )
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, sample_rate, planned, accountant)
    elif target_epsilon is not None:
        raise PrivacySetupError("Give noise_multiplier or target_epsilon, not both.")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacySetupError(f"Expected noise_multiplier={noise_multiplier} in [0, inf).")
    return {
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "data_size": data_size,
        "delta": delta,
        "accountant": accountant,
        "planned_steps": planned,
    }


def agreement_settings(
    engine: ClippingEngine,
    clip_fn: str | ClipFunction,
    clip_options: Mapping[str, float] | None,
    loss_reduction: str,
    norm_mode: Any,
    privacy: Mapping[str, Any],
    adaptive: AdaptiveClipping | None,
) -> dict[str, Any]:
    """What every rank (or pipeline stage) of one run must agree on, for
    :func:`~groupclip.distributed.agreement.check_agreement`."""
    return {
        "grouping": engine.grouping.groups if engine.grouping is not None else engine.grouping_spec,
        "thresholds": engine.thresholds,
        "clip_fn": clip_fn if isinstance(clip_fn, str) else type(clip_fn).__qualname__,
        "clip_options": dict(clip_options or {}),
        "loss_reduction": loss_reduction,
        "norm_mode": norm_mode,
        **privacy,
        "adaptive": repr(adaptive),
        "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in trainable_parameters(engine.model).items()],
    }


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = trainable_parameters(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    foreign = [
        f"tensor of shape {tuple(p.shape)}" for g in optimizer.param_groups for p in g["params"] if id(p) not in names
    ]
    missing = [n for n, p in trainable.items() if id(p) not in held]
    if foreign or missing:
        parts = []
        if foreign:
            parts.append(f"the optimizer holds {len(foreign)} parameter(s) not in the model ({', '.join(foreign)})")
        if missing:
            parts.append(f"trainable model parameters missing from the optimizer: {missing}")
        raise ValueError(
            "; ".join(parts) + ". Build the optimizer from model.parameters() (or freeze the "
            "parameters it should not train)."
        )


_REDUCTION_CODES = {1: "mean", 2: "sum"}  # at::Reduction: 0 none, 1 mean, 2 sum


def check_loss_reduction(loss: Tensor, declared: str) -> None:
    """Raise :class:`LossReductionError` if ``loss``'s last autograd node shows the other reduction.

    Detects ``x.mean()`` / ``x.sum()`` and loss functions that save their ``reduction`` (cross-entropy / NLL, MSE,
    L1, ...). Anything else (a custom combination) cannot be checked and passes.
    """
    node = loss.grad_fn
    if node is None:
        return
    name = type(node).__name__
    found = None
    if name.startswith("MeanBackward"):
        found = "mean"
    elif name.startswith("SumBackward"):
        found = "sum"
    else:
        code = getattr(node, "_saved_reduction", None)
        found = _REDUCTION_CODES.get(code) if isinstance(code, int) else None
    if found is not None and found != declared:
        raise LossReductionError(
            f"The loss was reduced with '{found}' ({name}) but loss_reduction='{declared}' was declared: per-sample "
            f"norms would be off by a factor of the batch size. Declare loss_reduction='{found}' or reduce the loss "
            f"with '{declared}'."
        )
