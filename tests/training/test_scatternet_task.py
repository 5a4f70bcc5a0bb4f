"""ScatterNet features and the scatter-linear / scatter-cnn models (the fashion-mnist-scatternet recipe), on a slice of
the data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groupclip.training.datasets import DatasetMissingError, load_fashion_mnist
from groupclip.training.recipe import RecipeError, load_recipe
from groupclip.training.tasks import build_task
from groupclip.training.tasks.image import scatter_cnn, scatter_linear
from groupclip.training.tasks.scattering import cached_scatter, scatter, scattering_channels
from tests.reference import check_engine, max_relative_error

pytest.importorskip("kymatio")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    try:
        train, _ = load_fashion_mnist(limit=40)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    return train.x


def test_channels_formula() -> None:
    assert scattering_channels() == 81  # J = 2, L = 8: 1 + 16 + 64
    assert scattering_channels(J=3, L=4) == 1 + 12 + 48
    assert scattering_channels(order2=False) == 17


def test_scatter_is_a_per_image_map(images: torch.Tensor) -> None:
    """Each image's features depend on that image only: the batch's result equals each image's alone, so the
    features cost no privacy (no statistic of the data set enters them)."""
    together = scatter(images[:6])
    assert together.shape == (6, 81, 7, 7) and together.dtype == torch.float32
    alone = torch.cat([scatter(images[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    changed = images[:6].clone()
    changed[3] = 0
    assert torch.equal(scatter(changed)[[0, 1, 2, 4, 5]], together[[0, 1, 2, 4, 5]])


def test_cache_round_trip(images: torch.Tensor, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    first = cached_scatter(images[:8])
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    torch.testing.assert_close(cached_scatter(images[:8]), first, rtol=0, atol=0)
    files[0].write_bytes(b"not a tensor")  # a damaged cache file is recomputed, not trusted
    torch.testing.assert_close(cached_scatter(images[:8]), first, rtol=0, atol=0)


def test_task_with_holdout_scores_on_training_images(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatternet")
    data = {**recipe.data, "limit": 48, "holdout": 16}
    try:
        setup = build_task(recipe.task, data, recipe.model, seed=0)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    assert len(setup.train) == 32 and setup.headline == "val_accuracy"
    assert setup.info["val_size"] == 16 and setup.info["features"] == "scattering"
    x, _ = setup.train[0]
    assert x.shape == (81, 7, 7)
    assert set(setup.evaluate(setup.model)) == {"val_accuracy", "val_loss"}


@pytest.mark.parametrize(
    "data, model, match",
    [
        ({"holdout": -1}, {}, "holdout"),
        ({"holdout": 40}, {}, "holdout"),
        ({"features": "pixels"}, {}, "set both together"),
        ({}, {"name": "tanh-cnn"}, "set both together"),
        ({"features": "wavelets"}, {"name": "tanh-cnn"}, "features = 'wavelets': one of 'pixels'"),
        ({}, {"groups": 4}, "must divide the 81"),
        ({}, {"name": "scatter-cnn", "groups": 4}, "must divide the 81"),
        ({"features": "pixels"}, {"name": "scatter-cnn"}, "set both together"),
    ],
)
def test_bad_options_name_the_field(data, model, match, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatternet")
    try:
        load_fashion_mnist(limit=1)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    with pytest.raises(RecipeError, match=match):
        build_task(recipe.task, {**recipe.data, "limit": 40, **data}, {**recipe.model, **model}, seed=0)


@pytest.mark.parametrize("grouping", ["all-layer", "param-wise"])
def test_scatter_linear_clipping_is_exact(images: torch.Tensor, grouping: str) -> None:
    torch.manual_seed(0)
    model = scatter_linear()
    features = scatter(images[:5])
    labels = torch.tensor([0, 3, 9, 3, 1])

    def loss(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="none")

    batch = (features, labels)
    _, got, want, norms, want_norms = check_engine(model, loss, batch, grouping=grouping, max_grad_norm=0.5)
    assert set(want) == {"2.weight", "2.bias"}  # GroupNorm without affine parameters trains nothing
    assert max_relative_error(got, want) < 1e-5
    for group, norm in want_norms.items():
        torch.testing.assert_close(norms[group].double(), norm, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise", "param-wise"])
def test_scatter_cnn_clipping_is_exact(images: torch.Tensor, grouping: str) -> None:
    torch.manual_seed(0)
    model = scatter_cnn(width=0.25)  # 8 channels: the shapes of the recipe's model, smaller
    features = scatter(images[:5])
    labels = torch.tensor([0, 3, 9, 3, 1])
    assert model(features).shape == (5, 10)

    def loss(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="none")

    batch = (features, labels)
    _, got, want, norms, want_norms = check_engine(model, loss, batch, grouping=grouping, max_grad_norm=0.5)
    assert set(want) == {"1.weight", "1.bias", "4.weight", "4.bias", "7.weight", "7.bias"}
    assert max_relative_error(got, want) < 1e-5
    for group, norm in want_norms.items():
        torch.testing.assert_close(norms[group].double(), norm, rtol=1e-5, atol=1e-7)


def test_scatter_cnn_task_builds_on_scattering_features(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatternet")
    model = {**recipe.model, "name": "scatter-cnn", "width": 0.5}
    try:
        setup = build_task(recipe.task, {**recipe.data, "limit": 24}, model, seed=0)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    assert setup.info["model"] == "scatter-cnn"
    assert setup.info["parameters"] == (81 * 9 + 1) * 16 + (16 * 9 + 1) * 16 + (16 * 9 + 1) * 10
    assert float(setup.loss(setup.model, setup.example_batch).detach()) > 0


@pytest.mark.parametrize("grouping", ["all-layer", "param-wise"])
def test_flip_views_clip_one_gradient_per_example_exactly(images: torch.Tensor, grouping: str) -> None:
    """Augmentation multiplicity: an example's two views fold into the batch inside the model; the clipped
    per-sample gradient is that of the mean over its views (the reference differentiates each example's own loss)."""
    from groupclip.training.tasks.image import ViewsInBatch, view_averaged_loss

    torch.manual_seed(0)
    model = ViewsInBatch(scatter_linear(), example_dims=3)
    x = torch.stack([scatter(images[:5]), scatter(images[:5].flip(-1))], 1)
    labels = torch.tensor([0, 3, 9, 3, 1])

    def loss(net, batch):  # per example, from one forward call over the batch
        xs, ys = batch
        size, views = xs.shape[:2]
        log_probs = F.log_softmax(net(xs), dim=-1)
        return -log_probs.gather(2, ys.view(size, 1, 1).expand(size, views, 1)).sum((1, 2)) / views

    def summed(net, batch):  # the task's loss: one call over the whole batch
        return view_averaged_loss(net, *batch)

    _, got, want, norms, want_norms = check_engine(model, loss, (x, labels), grouping=grouping, max_grad_norm=0.5)
    assert max_relative_error(got, want) < 1e-5
    for group, norm in want_norms.items():
        assert norms[group].shape == (5,)  # five examples, not ten views
        torch.testing.assert_close(norms[group].double(), norm, rtol=1e-5, atol=1e-7)
    per_example = loss(model, (x, labels))
    torch.testing.assert_close(per_example.sum(), summed(model, (x, labels)))
    alone = torch.stack([summed(model, (x[i : i + 1], labels[i : i + 1])) for i in range(5)])
    torch.testing.assert_close(per_example, alone)


def test_flip_views_task_shapes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("fashion-mnist-scatternet")
    try:
        setup = build_task(recipe.task, {**recipe.data, "limit": 24, "flip_views": True}, recipe.model, seed=0)
    except DatasetMissingError as error:
        pytest.skip(str(error))
    x, _ = setup.train[0]
    assert x.shape == (2, 81, 7, 7)
    assert float(setup.loss(setup.model, setup.example_batch).detach()) > 0
    with pytest.raises(RecipeError, match="flip_views"):
        build_task(recipe.task, {**recipe.data, "limit": 24, "flip_views": "yes"}, recipe.model, seed=0)
