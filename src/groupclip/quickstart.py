"""The embedded default job: a short DP-SGD run of a small CNN on the MNIST 5k subset.

It is the plain loop of :func:`groupclip.make_private`: Poisson sampling (each example in each step independently
with rate q), per-sample clipping, Gaussian noise ``N(0, sigma^2 S^2)`` added once per batch and divided by the
expected batch size, and epsilon from Google's ``dp-accounting`` (RDP).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .datasets import load_mnist5k
from .private import make_private


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
    private = make_private(
        model,
        optimizer,
        grouping=config.grouping,
        max_grad_norm=config.max_grad_norm,
        clip_fn=config.clip_fn,
        loss_reduction="sum",
        norm_mode=config.norm_mode,
        noise_multiplier=config.noise_multiplier,
        batch_size=config.expected_batch_size,
        data_size=len(train),
        target_delta=config.delta,
        seed=config.seed,
    )
    loader = private.poisson_loader(TensorDataset(train.x, train.y))
    try:
        for epoch in range(config.epochs):
            for x, y in loader:
                if len(y):
                    F.cross_entropy(model(x), y, reduction="sum").backward()
                optimizer.step()  # noise once per batch, divided by the expected batch size
                optimizer.zero_grad(set_to_none=True)
            log(f"epoch {epoch + 1}/{config.epochs}: test accuracy {accuracy(model, test.x, test.y):.4f}")
    finally:
        private.detach()
    try:
        eps = private.epsilon()
    except ImportError:  # dp-accounting not installed: report no epsilon rather than a hand-made one
        eps = None
    return {
        "config": asdict(config),
        "train_size": len(train),
        "steps": private.steps,
        "sample_rate": private.sample_rate,
        "test_accuracy": accuracy(model, test.x, test.y),
        "epsilon": eps,
        "delta": config.delta,
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
