"""Image classification from scratch: Fashion-MNIST (full) and the MNIST 5k subset, with BatchNorm-free CNNs.

Models:
    ``tanh-cnn``: Tramer & Boneh (2021)'s end-to-end DP CNN for (Fashion-)MNIST -- conv 8x8/2 - tanh - maxpool 2/1 -
        conv 4x4/2 - tanh - maxpool 2/1 - linear 32 - tanh - linear 10 -- with a ``width`` multiplier of the channel
        and hidden sizes (width 1: 16, 32, 32; 26k parameters) and ``extra_convs`` 3x3 same-size convs after the
        second conv (depth), for the model-size study.
    ``small-cnn``: a GroupNorm tanh CNN (the embedded default's model).
    ``scatter-linear``: Tramer & Boneh (2021)'s ScatterNet + linear model, for ``[data] features = "scattering"``
        (81 x 7 x 7 wavelet scattering coefficients): GroupNorm (per sample, no affine parameters) then one linear
        layer.
    ``scatter-cnn``: ScatterNet + CNN, for the same features: the same GroupNorm, then two 3x3 tanh convolutions
        (``32 * width`` channels, a 2x2 max-pool between them: 7x7 -> 3x3) and a linear classifier.
    ``efficientnet-linear`` / ``scatter-efficientnet-linear``: for ``[data] features = "efficientnet"`` /
        ``"scattering+efficientnet"`` (a frozen ImageNet EfficientNet-Lite0's features, 112 x P x P with P =
        ``[data] efficientnet_pool``, after each image's scattering coefficients for the second, as one flat row):
        per-sample GroupNorm of each block (``pretrained_groups`` / ``groups``, no parameters), one linear layer.

``[data] holdout = N`` trains on all but the last N training images and evaluates on those N (``val_accuracy``):
hyperparameters are searched there, never on the test set.

``[data] flip_views = true`` is augmentation multiplicity (De et al. 2022) with the horizontal flip: each training
example is the pair (image, mirrored image), ``[B, 2, ...]``; its loss is the mean over the two views, so its ONE
per-sample gradient -- the one that is clipped -- averages them (the model folds the views into the batch
dimension, which groupclip's data-flow tracking follows). The privacy cost is that of one example, as before.
Evaluation reads the unflipped test images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TensorSplit, load_fashion_mnist, load_mnist5k
from ..recipe import RecipeError
from . import TaskSetup, model_device, register_task, take_options
from .pretrained_image import CHANNELS as EFFICIENTNET_CHANNELS
from .pretrained_image import POOLS as EFFICIENTNET_POOLS
from .pretrained_image import cached_efficientnet_features
from .scattering import cached_scatter, scattering_channels


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


def _scattering_norm(groups: int, channels: int) -> nn.GroupNorm:
    """Per-sample GroupNorm of the scattering maps, without parameters (nothing fitted to the data set)."""
    if groups < 1 or channels % groups:
        raise RecipeError(f"[model] groups = {groups}: must divide the {channels} scattering channels (e.g. 27, 9, 3).")
    return nn.GroupNorm(groups, channels, affine=False)


def scatter_linear(groups: int = 27, num_classes: int = 10, channels: int = 81, side: int = 7) -> nn.Sequential:
    """ScatterNet + linear: per-sample GroupNorm of the ``channels`` scattering maps, then a linear classifier."""
    return nn.Sequential(
        _scattering_norm(groups, channels),
        nn.Flatten(),
        nn.Linear(channels * side * side, num_classes),
    )


def scatter_cnn(
    groups: int = 27, width: float = 1.0, num_classes: int = 10, channels: int = 81, side: int = 7
) -> nn.Sequential:
    """ScatterNet + CNN: :func:`scatter_linear`'s GroupNorm, two 3x3 tanh convolutions of ``32 * width`` channels
    with a 2x2 max-pool between them, then a linear classifier."""
    width_channels = max(1, round(32 * width))
    pooled = side // 2
    return nn.Sequential(
        _scattering_norm(groups, channels),
        nn.Conv2d(channels, width_channels, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(width_channels, width_channels, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(width_channels * pooled * pooled, num_classes),
    )


class FeatureBlocksLinear(nn.Module):
    """One linear layer on feature blocks read from one flat input row, each block (``[C, H, W]``) normalised per
    sample by a GroupNorm without parameters: e.g. the scattering coefficients and the EfficientNet features."""

    def __init__(self, blocks: list[tuple[str, tuple[int, int, int], int]], num_classes: int = 10) -> None:
        """``blocks``: ``(groups field, [C, H, W], groups)`` per block, in input order (the field names errors)."""
        super().__init__()
        for field, shape, groups in blocks:
            if groups < 1 or shape[0] % groups:
                raise RecipeError(f"[model] {field} = {groups}: must divide its {shape[0]} feature channels.")
        self.shapes = [shape for _, shape, _ in blocks]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.norms = nn.ModuleList(nn.GroupNorm(groups, shape[0], affine=False) for _, shape, groups in blocks)
        self.linear = nn.Linear(sum(self.sizes), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        parts = x.split(self.sizes, dim=1)
        blocks = zip(self.norms, parts, self.shapes, strict=True)
        return self.linear(torch.cat([norm(part.reshape(-1, *shape)).flatten(1) for norm, part, shape in blocks], 1))


# each model that reads precomputed features, with the [data] features it reads
FEATURE_MODELS = {
    "scatter-linear": "scattering",
    "scatter-cnn": "scattering",
    "efficientnet-linear": "efficientnet",
    "scatter-efficientnet-linear": "scattering+efficientnet",
}
FEATURES = ("pixels", "scattering", "efficientnet", "scattering+efficientnet")


def _check_options(data: dict[str, Any], model: dict[str, Any]) -> None:
    """Reject bad ``[data]`` / ``[model]`` values before anything is loaded (the holdout's upper bound, which
    needs the data set's size, is checked by :func:`_load`)."""
    holdout = data["holdout"]
    if not isinstance(holdout, int) or isinstance(holdout, bool) or holdout < 0:
        raise RecipeError(f"[data] holdout = {holdout!r}: an integer >= 0 (0: evaluate on the test set).")
    if not isinstance(data["flip_views"], bool):
        raise RecipeError(f"[data] flip_views = {data['flip_views']!r}: true or false.")
    if data["features"] not in FEATURES:
        raise RecipeError(f"[data] features = {data['features']!r}: one of {', '.join(map(repr, FEATURES))}.")
    pool = data["efficientnet_pool"]
    if not isinstance(pool, int) or isinstance(pool, bool) or pool not in EFFICIENTNET_POOLS:
        raise RecipeError(f"[data] efficientnet_pool = {pool!r}: one of {EFFICIENTNET_POOLS}.")
    if FEATURE_MODELS.get(model["name"], "pixels") != data["features"]:
        raise RecipeError(
            f"[model] name = {model['name']!r} with [data] features = {data['features']!r}: 'scatter-linear' and "
            "'scatter-cnn' read 'scattering', 'efficientnet-linear' reads 'efficientnet', "
            "'scatter-efficientnet-linear' reads 'scattering+efficientnet', the CNNs read 'pixels'; set both together."
        )


def _load(data: dict[str, Any]) -> tuple[TensorSplit, TensorSplit]:
    train, test = _load_pixels(data)
    if data["holdout"] >= len(train):
        raise RecipeError(f"[data] holdout = {data['holdout']}: must be below the {len(train)} training images.")
    cut = len(train) - data["holdout"]
    # Features are per-image maps, so they commute with the holdout cut: computed (and cached) once for the whole
    # training set, whatever the holdout. With a holdout the test set is not read at all.
    x = _features(train.x, data)
    if data["holdout"]:
        evaluation = TensorSplit(x[cut:], train.y[cut:])
    else:
        evaluation = TensorSplit(_features(test.x, data), test.y)
    if data["flip_views"]:  # the mirror images are training views only; evaluation reads the unflipped images
        x = torch.stack([x, _features(train.x.flip(-1), data)], 1)
    return TensorSplit(x[:cut], train.y[:cut]), evaluation


def _features(pixels: Tensor, data: dict[str, Any]) -> Tensor:
    """Fixed per-image features of standardised Fashion-MNIST-style ``pixels`` (cached on disk): the pixels, the
    scattering coefficients ``[N, 81, 7, 7]``, or flat rows of the EfficientNet features (after the scattering
    coefficients, for both)."""
    features = data["features"]
    if features == "pixels":
        return pixels
    blocks = []
    if "scattering" in features:
        blocks.append(cached_scatter(pixels))
        if features == "scattering":
            return blocks[0]
    if "efficientnet" in features:
        pool = data["efficientnet_pool"]
        blocks.append(cached_efficientnet_features(pixels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, pool))
    return torch.cat([block.flatten(1) for block in blocks], 1)


class ViewsInBatch(nn.Module):
    """Runs ``net`` on ``[B, V, ...]`` inputs (V views of each example) by folding the views into the batch INSIDE
    the forward, and returns ``[B, V, classes]``; ``[B, ...]`` inputs pass straight through.

    The fold must happen inside the model: groupclip takes the rows of the model's input as the samples, so a
    ``[B * V, ...]`` tensor built outside the model would be clipped as B * V samples (each example's views clipped
    apart, twice its share of the sensitivity). Inside the forward, the data-flow tracking follows the fold.
    """

    def __init__(self, net: nn.Module, example_dims: int) -> None:
        super().__init__()
        self.net = net
        self.example_dims = example_dims  # dims of one view of one example, e.g. 3 for [C, H, W]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.example_dims + 1:
            return self.net(x)
        batch, views = x.shape[:2]
        return self.net(x.flatten(0, 1)).view(batch, views, -1)


def view_averaged_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Sum over the batch of each example's cross-entropy; with views (``net`` returns ``[B, V, classes]``) an
    example's loss is the mean over its views."""
    logits = net(x)
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction="sum")
    batch, views = logits.shape[:2]
    picked = F.log_softmax(logits, dim=-1).gather(2, y.view(batch, 1, 1).expand(batch, views, 1))
    return -picked.sum() / views


def _load_pixels(data: dict[str, Any]) -> tuple[TensorSplit, TensorSplit]:
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


def _model(options: dict[str, Any], data: dict[str, Any]) -> nn.Module:
    if options["name"] == "tanh-cnn":
        return tanh_cnn(options["width"], options["extra_convs"])
    if options["name"] == "small-cnn":
        return small_cnn()
    if options["name"] == "scatter-linear":
        return scatter_linear(options["groups"], channels=scattering_channels())
    if options["name"] == "scatter-cnn":
        return scatter_cnn(options["groups"], options["width"], channels=scattering_channels())
    if options["name"] in ("efficientnet-linear", "scatter-efficientnet-linear"):
        pool = data["efficientnet_pool"]
        blocks = [("pretrained_groups", (EFFICIENTNET_CHANNELS, pool, pool), options["pretrained_groups"])]
        if options["name"] == "scatter-efficientnet-linear":
            blocks.insert(0, ("groups", (scattering_channels(), 7, 7), options["groups"]))
        return FeatureBlocksLinear(blocks)
    raise RecipeError(
        f"[model] name = {options['name']!r}: the image task builds 'tanh-cnn', 'small-cnn', 'scatter-linear', "
        "'scatter-cnn', 'efficientnet-linear' or 'scatter-efficientnet-linear'."
    )


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
    """Image classification.

    ``[data]``: name, limit, test_limit, holdout, features (``pixels`` | ``scattering`` | ``efficientnet`` |
    ``scattering+efficientnet``), efficientnet_pool (the EfficientNet features' side, 1, 2 or 4), flip_views;
    ``[model]``: name, width, extra_convs, groups (the scattering models' GroupNorm groups), pretrained_groups (the
    EfficientNet block's GroupNorm groups).
    """
    defaults = {"name": "fashion-mnist", "limit": 0, "test_limit": 0, "holdout": 0, "features": "pixels"}
    data = take_options("data", data, {**defaults, "flip_views": False, "efficientnet_pool": 2})
    model_defaults = {"name": "tanh-cnn", "width": 1.0, "extra_convs": 0, "groups": 27, "pretrained_groups": 28}
    model = take_options("model", model, model_defaults)
    _check_options(data, model)
    train, test = _load(data)
    split = "val" if data["holdout"] else "test"
    torch.manual_seed(seed)
    net = _model(model, data)
    if data["flip_views"]:
        net = ViewsInBatch(net, example_dims=test.x.dim() - 1)

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return view_averaged_loss(net, *batch)

    def evaluate(net: nn.Module) -> dict[str, float]:
        acc, mean_loss = accuracy_and_loss(net, test.x, test.y)
        return {f"{split}_accuracy": acc, f"{split}_loss": mean_loss}

    return TaskSetup(
        model=net,
        train=TensorDataset(train.x, train.y),
        loss=loss,
        evaluate=evaluate,
        headline=f"{split}_accuracy",
        higher_is_better=True,
        example_batch=(train.x[:4], train.y[:4]),
        info={
            "data": data["name"],
            "features": data["features"],
            f"{split}_split": "the last holdout training images" if data["holdout"] else "the test set",
            "train_size": len(train),
            f"{split}_size": len(test),
            "model": model["name"],
            "parameters": sum(p.numel() for p in net.parameters()),
        },
    )
