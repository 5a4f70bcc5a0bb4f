"""Cross-rank agreement checks raise on every rank, never hang."""

from __future__ import annotations

import pytest
from spawn import RankFailures, run_ranks

from groupclip.distributed.agreement import canonical, check_agreement


def _agree(rank: int, world: int, differ: bool) -> str:
    settings = {"grouping": "layer-wise", "noise_multiplier": 1.0 + (rank if differ else 0), "R": {"b": 1, "a": 2}}
    check_agreement(settings, what="privacy settings")
    return "ok"


def test_canonical_is_order_independent():
    assert canonical({"b": 1, "a": [1.0, 2]}) == canonical({"a": (1.0, 2), "b": 1})


@pytest.mark.slow
def test_agreeing_ranks_pass_and_disagreeing_ranks_all_raise():
    assert run_ranks(_agree, 2, (False,), timeout=60) == ["ok", "ok"]
    with pytest.raises(RankFailures) as caught:
        run_ranks(_agree, 2, (True,), timeout=60)
    errors = caught.value.errors()
    assert sorted(errors) == [0, 1]  # every rank raised
    for message in errors.values():
        assert "DistributedSetupError" in message and "noise_multiplier" in message
        assert "rank 0 = 1.0" in message and "rank 1 = 2.0" in message
