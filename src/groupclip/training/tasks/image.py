"""Image classification from scratch: Fashion-MNIST (full) and the MNIST 5k subset, with BatchNorm-free CNNs.

Models:
    ``tanh-cnn``: Tramer & Boneh (2021)'s end-to-end DP CNN for (Fashion-)MNIST -- conv 8x8/2 - tanh - maxpool 2/1 -
        conv 4x4/2 - tanh - maxpool 2/1 - linear 32 - tanh - linear 10 -- with a ``width`` multiplier of the channel
        and hidden sizes (width 1: 16, 32, 32; 26k parameters) and ``extra_convs`` 3x3 same-size convs after the
        second conv (depth), for the model-size study.
    ``small-cnn``: a GroupNorm tanh CNN (the embedded default's model).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..datasets import TensorSplit, load_fashion_mnist, load_mnist5k
from ..recipe import RecipeError
from . import TaskSetup, model_device, register_task, take_options


def tanh_cnn(width: float = 1.0, extra_convs: int = 0, num_classes: int = 10) -> nn.Sequential:
    """Tramer & Boneh's end-to-end CNN (for 1x28x28 inputs), scaled by ``width`` and deepened by ``extra_convs``."""
    c1, c2, hidden = (max(1, round(width * size)) for size in (16, 32, 32))
    layers: list[nn.Module] = [
        nn.Conv2d(1, c1, 8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(c1, c2, 4, stride=2),
        nn.Tanh(),
    ]
    for _ in range(extra_convs):
        layers += [nn.Conv2d(c2, c2, 3, padding=1), nn.Tanh()]
    layers += [nn.MaxPool2d(2, 1), nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """A tanh CNN with GroupNorm (no BatchNorm): the embedded default's model."""
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


def _load(data: dict[str, Any]) -> tuple[TensorSplit, TensorSplit]:
    if data["name"] == "fashion-mnist":
        train, test = load_fashion_mnist(limit=data["limit"] or None)
        if data["test_limit"]:
            test = TensorSplit(test.x[: data["test_limit"]], test.y[: data["test_limit"]])
        return train, test
    if data["name"] == "mnist5k":
        train, test = load_mnist5k(test_size=1000, seed=0)
        if data["limit"]:
            train = TensorSplit(train.x[: data["limit"]], train.y[: data["limit"]])
        if data["test_limit"]:
            test = TensorSplit(test.x[: data["test_limit"]], test.y[: data["test_limit"]])
        return train, test
    raise RecipeError(f"[data] name = {data['name']!r}: the image task reads 'fashion-mnist' or 'mnist5k'.")


def _model(options: dict[str, Any]) -> nn.Module:
    if options["name"] == "tanh-cnn":
        return tanh_cnn(options["width"], options["extra_convs"])
    if options["name"] == "small-cnn":
        return small_cnn()
    raise RecipeError(f"[model] name = {options['name']!r}: the image task builds 'tanh-cnn' or 'small-cnn'.")


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (eval mode; train mode restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch):
        labels = y[start : start + batch].to(device)
        logits = model(x[start : start + batch].to(device))
        correct += int((logits.argmax(1) == labels).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return correct / len(y), loss / len(y)


@register_task("image-classification")
def build_image_classification(data: dict[str, Any], model: dict[str, Any], seed: int) -> TaskSetup:
    """Image classification; ``[data]``: name, limit, test_limit; ``[model]``: name, width, extra_convs."""
    data = take_options("data", data, {"name": "fashion-mnist", "limit": 0, "test_limit": 0})
    model = take_options("model", model, {"name": "tanh-cnn", "width": 1.0, "extra_convs": 0})
    train, test = _load(data)
    torch.manual_seed(seed)
    net = _model(model)

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="sum")

    def evaluate(net: nn.Module) -> dict[str, float]:
        acc, mean_loss = accuracy_and_loss(net, test.x, test.y)
        return {"test_accuracy": acc, "test_loss": mean_loss}

    return TaskSetup(
        model=net,
        train=TensorDataset(train.x, train.y),
        loss=loss,
        evaluate=evaluate,
        headline="test_accuracy",
        higher_is_better=True,
        example_batch=(train.x[:4], train.y[:4]),
        info={
            "data": data["name"],
            "train_size": len(train),
            "test_size": len(test),
            "model": model["name"],
            "parameters": sum(p.numel() for p in net.parameters()),
        },
    )
