"""The embedded default job: a short DP-SGD run of a small CNN on the MNIST 5k subset.

Poisson sampling (each example in each step independently with rate q), per-sample clipping by
:class:`~groupclip.ClippingEngine`, Gaussian noise ``N(0, sigma^2 S^2)`` with S the engine's sensitivity, divided by
the expected batch size; epsilon from Google's ``dp-accounting`` (RDP) when it is installed. The full training API
(any optimizer, calibration, checkpoints) is separate; this is the smallest honest DP training loop.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import load_mnist5k
from .engine import ClippingEngine


@dataclass
class QuickConfig:
    grouping: str | int = "layer-wise"
    clip_fn: str = "abadi"
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    expected_batch_size: int = 256
    epochs: int = 8
    lr: float = 0.5
    momentum: float = 0.9
    delta: float = 1e-5
    norm_mode: str = "auto"
    seed: int = 0
    threads: int = 0  # 0: torch default


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A tanh CNN with GroupNorm (no BatchNorm), in the spirit of Tramer & Boneh's end-to-end DP CNNs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        nn.GroupNorm(4, 16),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(4, 32),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.Tanh(),
        nn.Linear(64, num_classes),
    )


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float | None:
    """Epsilon of Poisson-subsampled Gaussian steps by dp-accounting's RDP accountant, or None if not installed."""
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        return None
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that fail to converge are dropped; not news
    if noise_multiplier == 0:
        return math.inf
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def run(config: QuickConfig, log=print) -> dict:
    """Train and return the final metrics (test accuracy, epsilon, wall time, peak RSS)."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train, test = load_mnist5k(seed=config.seed)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    n = len(train)
    rate = config.expected_batch_size / n
    steps_per_epoch = round(1 / rate)
    sampler = torch.Generator().manual_seed(config.seed + 1)
    noise_gen = torch.Generator().manual_seed(config.seed + 2)
    engine = ClippingEngine(
        model,
        grouping=config.grouping,
        max_grad_norm=config.max_grad_norm,
        clip_fn=config.clip_fn,
        loss_reduction="sum",
        norm_mode=config.norm_mode,
    )
    steps = 0
    with engine:
        for epoch in range(config.epochs):
            for _ in range(steps_per_epoch):
                chosen = torch.nonzero(torch.rand(n, generator=sampler) < rate).flatten()
                optimizer.zero_grad(set_to_none=True)
                if len(chosen):
                    loss = F.cross_entropy(model(train.x[chosen]), train.y[chosen], reduction="sum")
                    loss.backward()
                std = config.noise_multiplier * engine.sensitivity
                for p in model.parameters():
                    noise = torch.randn(p.shape, generator=noise_gen) * std
                    grad = noise if p.grad is None else p.grad + noise
                    p.grad = grad / config.expected_batch_size
                optimizer.step()
                steps += 1
            log(f"epoch {epoch + 1}/{config.epochs}: test accuracy {accuracy(model, test.x, test.y):.4f}")
    eps = rdp_epsilon(config.noise_multiplier, rate, steps, config.delta)
    return {
        "config": asdict(config),
        "train_size": n,
        "steps": steps,
        "sample_rate": rate,
        "test_accuracy": accuracy(model, test.x, test.y),
        "epsilon": eps,
        "delta": config.delta,
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
