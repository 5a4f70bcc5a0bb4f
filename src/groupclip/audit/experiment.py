"""A self-contained audit experiment: train a small model with groupclip's public API and canaries, then report.

The training uses only :func:`groupclip.make_private` (``grouping``, ``max_grad_norm`` as explicit per-group
thresholds, ``clip_fn``, ``noise_multiplier``, ``sample_rate``, ``data_size``, ``target_delta``, ``seed``),
``private.poisson_loader``, the ordinary ``loss.backward(); optimizer.step(); optimizer.zero_grad()``,
``private.epsilon()`` and ``private.detach()`` at the end; ``--epsilon`` is turned into sigma first with
:func:`groupclip.calibrate_noise_multiplier`. The planted bugs (:mod:`groupclip.audit.plants`) add their own
public objects.

White-box (default): a two-layer MLP on synthetic data with Dirac canaries in every group. With sample rate 1
and T steps each canary is a Gaussian mechanism with ``mu = sqrt(T) / sigma``, which the GDP estimate recovers.
Black-box: out-of-distribution input canaries (each along its own input direction) scored by loss decrease;
weaker, and its verdicts on planted bugs depend on the seed.

Example:
    >>> result = run_audit(AuditConfig(canaries=200, steps=2, noise_multiplier=2.0))  # doctest: +SKIP
    >>> result.report.contradicted                                                       # doctest: +SKIP
    False
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from .. import calibrate_noise_multiplier, make_private, resolve_grouping
from .canaries import DEFAULT_BOOST, DiracCanaries, InputCanaries, expected_mu
from .one_run import epsilon_one_run
from .plants import PLANTS, PlantedSetup, check_planted, plant_after_setup, planted_setup
from .run import Auditor, AuditReport, json_ready

KINDS = ("white-box", "black-box")
BLACK_BOX_SCALE = 30.0  # norm of a black-box canary input, far outside the data (norm ~4)


class AuditConfigError(ValueError):
    """An experiment setting is out of range or inconsistent (a user mistake: one line explains it)."""


@dataclass(frozen=True)
class AuditConfig:
    """Settings of :func:`run_audit`.

    Attributes:
        canaries: m, the number of canaries (each included with probability 1/2).
        steps: training steps T.
        noise_multiplier: sigma; or None with ``epsilon`` to calibrate it.
        epsilon: target epsilon at ``delta`` over ``steps`` (instead of ``noise_multiplier``).
        grouping: a named grouping (``"all-layer"``, ``"layer-wise"``, ``"param-wise"``).
        max_grad_norm: total threshold R (each of G groups gets ``R / sqrt(G)``).
        seed: seeds the model, the data, the coin flips, the sampler and the noise.
        alpha: significance level of the certified bounds.
        delta: the run's delta.
        plant: a planted bug from :data:`~groupclip.audit.plants.PLANTS` (``"none"``: an honest run).
        kind: ``"white-box"`` (Dirac gradient canaries) or ``"black-box"`` (input canaries).
        sample_rate: Poisson sampling rate q (1: full batches).
        examples: ordinary training examples.
        lr: SGD learning rate.
        boost: white-box canary gradient per group in units of the group's threshold.
    """

    canaries: int = 1000
    steps: int = 4
    noise_multiplier: float | None = 4.0
    epsilon: float | None = None
    grouping: str = "layer-wise"
    max_grad_norm: float = 1.0
    seed: int = 0
    alpha: float = 0.05
    delta: float = 1e-5
    plant: str = "none"
    kind: str = "white-box"
    sample_rate: float = 1.0
    examples: int = 64
    lr: float = 1.0
    boost: float = DEFAULT_BOOST

    def validate(self) -> None:
        """Raise :class:`AuditConfigError` (one line) on the first bad setting."""
        checks = [
            (self.canaries >= 4, f"--canaries must be at least 4, got {self.canaries}"),
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.examples >= 1, f"examples must be at least 1, got {self.examples}"),
            ((self.noise_multiplier is None) != (self.epsilon is None), "give a noise multiplier or an epsilon"),
            (self.noise_multiplier is None or _positive(self.noise_multiplier), "--noise-multiplier must be > 0"),
            (self.epsilon is None or _positive(self.epsilon), "--epsilon must be > 0"),
            (_positive(self.max_grad_norm), f"--max-grad-norm must be > 0, got {self.max_grad_norm}"),
            (0 < self.alpha < 1, f"--alpha must be in (0, 1), got {self.alpha}"),
            (0 < self.delta < 1, f"--delta must be in (0, 1), got {self.delta}"),
            (0 < self.sample_rate <= 1, f"sample rate must be in (0, 1], got {self.sample_rate}"),
            (_positive(self.lr), f"learning rate must be > 0, got {self.lr}"),
            (self.boost > 1, f"boost must be > 1, got {self.boost}"),
            (self.plant in PLANTS, f"--plant must be one of {', '.join(PLANTS)}, got {self.plant!r}"),
            (self.kind in KINDS, f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}"),
            (isinstance(self.grouping, str), "--grouping must be a named grouping (all-layer, layer-wise, ...)"),
        ]
        for ok, message in checks:
            if not ok:
                raise AuditConfigError(message)


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


@dataclass(frozen=True)
class AuditResult:
    """What :func:`run_audit` found.

    Attributes:
        config: the settings.
        report: bounds and verdict.
        scores: ``[m]`` canary scores.
        included: ``[m]`` coin flips.
        noise_multiplier: the stated sigma the accountant used.
        expected_mu: white-box with sample rate 1: ``sqrt(T) / sigma`` of an honest run; else None.
        group_bounds: white-box: the one-run bound from each group's audit coordinates alone (where a leak is).
        seconds: wall time.
    """

    config: AuditConfig
    report: AuditReport
    scores: np.ndarray
    included: np.ndarray
    noise_multiplier: float
    expected_mu: float | None
    group_bounds: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-canary arrays)."""
        return json_ready(
            {
                "config": dataclasses.asdict(self.config),
                "report": self.report.to_dict(),
                "noise_multiplier": self.noise_multiplier,
                "expected_mu": self.expected_mu,
                "group_bounds": self.group_bounds,
                "seconds": self.seconds,
            }
        )


def _data(config: AuditConfig, features: int, classes: int) -> TensorDataset:
    """A synthetic classification set (labels from a random linear map), from ``config.seed``."""
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.examples, features, generator=generator)
    return TensorDataset(x, (x @ torch.randn(features, classes, generator=generator)).argmax(1))


def _mlp(config: AuditConfig, inputs: int, hidden: int, classes: int) -> nn.Module:
    """A two-layer MLP initialised from ``config.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _noise_multiplier(config: AuditConfig) -> float:
    """sigma: given, or calibrated to ``config.epsilon`` over ``config.steps`` with groupclip's accountant."""
    if config.epsilon is None:
        return float(config.noise_multiplier)
    return calibrate_noise_multiplier(config.epsilon, config.delta, config.sample_rate, config.steps)


def _private(
    model: nn.Module, config: AuditConfig, setup: PlantedSetup, grouping: Any, data_size: int, sigma: float
) -> tuple[Any, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    private = make_private(
        model,
        optimizer,
        grouping=grouping,
        max_grad_norm=setup.max_grad_norm,
        clip_fn=setup.clip_fn,
        noise_multiplier=sigma,
        sample_rate=config.sample_rate,
        data_size=data_size,
        target_delta=config.delta,
        seed=config.seed,
    )
    try:
        plant_after_setup(private, setup.plant)
    except BaseException:
        private.detach()
        raise
    return private, optimizer


def _train(
    private: Any,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[tuple], Tensor],
    config: AuditConfig,
    loader: DataLoader,
    check: Callable[[], None],
) -> None:
    """``config.steps`` ordinary DP-SGD steps; stops right after the last one, so no Poisson round is drawn unused."""
    taken = 0
    while taken < config.steps:
        for batch in loader:
            if len(batch[0]) > 0:  # an empty Poisson batch still steps: the noise alone is released
                loss_of(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            taken += 1
            if taken == 1:
                check()
            if taken == config.steps:
                return


def _white_box(config: AuditConfig) -> tuple[AuditReport, np.ndarray, np.ndarray, float, dict[str, float]]:
    body, data = _mlp(config, inputs=8, hidden=16, classes=2), _data(config, features=8, classes=2)
    canaries = DiracCanaries(config.canaries, body, grouping=config.grouping, boost=config.boost, seed=config.seed)
    setup = planted_setup(config.plant, canaries.groups, config.max_grad_norm)
    train = canaries.training_set(data, template=(torch.zeros(8), torch.tensor(0)))
    model = canaries.model
    sigma = _noise_multiplier(config)
    # data_size is the real training-set size, as a user would pass it. It depends on the coin flips only through
    # their count, which scales every canary's score alike and so cannot help rank them.
    private, optimizer = _private(model, config, setup, canaries.grouping, len(train), sigma)
    try:
        canaries.use_thresholds(setup.max_grad_norm)
        auditor = Auditor(canaries, delta=config.delta, alpha=config.alpha)
        auditor.start(model)

        def loss_of(batch: tuple) -> Tensor:
            canary, x, y = batch
            out, audit = model(canary, x)
            return canaries.loss(F.cross_entropy(out, y, reduction="none"), audit, canary).mean()

        loader = private.poisson_loader(train)
        _train(private, optimizer, loss_of, config, loader, lambda: check_planted(private, setup, sigma))
        report = auditor.finish(model, claimed_epsilon=private.epsilon())
        per_group = canaries.group_scores().numpy()
        group_bounds = {
            g: epsilon_one_run(per_group[:, k], auditor.included, delta=config.delta, alpha=config.alpha).epsilon
            for k, g in enumerate(canaries.groups)
        }
        return report, auditor.scores(model), auditor.included, sigma, group_bounds
    finally:
        private.detach()


def _black_box(config: AuditConfig) -> tuple[AuditReport, np.ndarray, np.ndarray, float, dict[str, float]]:
    features, classes, m = 16, 4, config.canaries
    body = _mlp(config, inputs=features + m, hidden=16, classes=classes)
    # Ordinary inputs live in the first `features` coordinates; canary j is the out-of-distribution input
    # BLACK_BOX_SCALE * e_(features + j) with a random label. Random dense inputs would make every included canary
    # move every other canary's loss, drowning the membership signal; orthogonal inputs keep it per canary.
    x, y = _data(config, features=features, classes=classes).tensors
    data = TensorDataset(torch.cat([x, torch.zeros(len(x), m)], dim=1), y)
    inputs = torch.zeros(m, features + m)
    inputs[torch.arange(m), features + torch.arange(m)] = BLACK_BOX_SCALE
    labels = torch.randint(0, classes, (m,), generator=torch.Generator().manual_seed(config.seed + 1))
    canaries = InputCanaries(inputs, labels, seed=config.seed)
    groups = list(resolve_grouping(body, config.grouping).groups)
    setup = planted_setup(config.plant, groups, config.max_grad_norm)
    train = canaries.training_set(data)
    sigma = _noise_multiplier(config)
    private, optimizer = _private(body, config, setup, config.grouping, len(train), sigma)
    try:
        auditor = Auditor(canaries, delta=config.delta, alpha=config.alpha)
        auditor.start(body)

        def loss_of(batch: tuple) -> Tensor:
            xb, yb = batch
            return F.cross_entropy(body(xb), yb)

        loader = private.poisson_loader(train)
        _train(private, optimizer, loss_of, config, loader, lambda: check_planted(private, setup, sigma))
        report = auditor.finish(body, claimed_epsilon=private.epsilon())
        return report, auditor.scores(body), auditor.included, sigma, {}
    finally:
        private.detach()


def run_audit(config: AuditConfig) -> AuditResult:
    """Train a small model with canaries (and a planted bug, if asked) and audit it.

    Raises:
        AuditConfigError: a setting is out of range.
        groupclip.GroupClipError: the privacy settings are inconsistent (e.g. an unreachable epsilon).
        PlantError: a planted bug could not be planted or did not take effect.
    """
    config.validate()
    start = time.perf_counter()
    run = _white_box if config.kind == "white-box" else _black_box
    report, scores, included, sigma, group_bounds = run(config)
    mu = expected_mu(config.steps, sigma) if config.kind == "white-box" and config.sample_rate == 1 else None
    return AuditResult(config, report, scores, included, sigma, mu, group_bounds, time.perf_counter() - start)
