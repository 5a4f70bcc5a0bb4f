"""``groupclip plan``: sizes, the choice of grouping against the cost model, and a measured check."""

from __future__ import annotations

import pytest

from benchmarks.harness.presets import build_workload
from groupclip.grouping import resolve_grouping
from groupclip.planning.costmodel import trace_model
from groupclip.planning.planner import greedy_blocks, parse_bytes, plan_grouping

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("1500MB", 1_500_000_000), ("3g", 3 * 2**30), ("512", 512), (" 1.5 mib ", 1572864)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1GB"])
def test_parse_bytes_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_a_generous_budget_gets_all_layer() -> None:
    work = build_workload("bert-tiny", batch_size=8, seq_len=32)
    plan = plan_grouping(work, 10 * 2**40, measure="cuda")
    assert plan.chosen is not None and plan.chosen.label == "all-layer" and plan.chosen.groups == 1


def test_a_tight_budget_gets_the_fewest_groups_that_fit() -> None:
    work = build_workload("bert-tiny", batch_size=8, seq_len=64)
    cost = trace_model(work, trace_batch=2)
    flat = cost.predict("all-layer", 8).peak_bytes
    layer = cost.predict("layer-wise", 8).peak_bytes
    assert layer < flat
    budget = (flat + layer) // 2
    plan = plan_grouping(work, budget, measure="cuda")
    chosen = plan.chosen
    assert chosen is not None and 1 < chosen.groups
    assert chosen.predicted_peak_bytes <= budget
    # it is a valid partition, contiguous in execution order
    resolved = resolve_grouping(work.model, chosen.grouping)
    assert sorted(n for g in resolved.groups.values() for n in g) == sorted(cost.execution_order)
    flat_order = [n for names in chosen.grouping for n in names]
    assert flat_order == cost.execution_order
    # and no candidate with fewer groups fits
    assert all(not c.fits for c in plan.candidates if c.groups < chosen.groups)


def test_an_impossible_budget_is_reported_not_faked() -> None:
    work = build_workload("bert-tiny", batch_size=4, seq_len=16)
    plan = plan_grouping(work, 1024, measure="cuda")
    assert plan.chosen is None
    assert plan.candidates and not any(c.fits for c in plan.candidates)


def test_greedy_blocks_partition_in_execution_order() -> None:
    work = build_workload("gpt2-tiny", batch_size=4, seq_len=16)
    cost = trace_model(work)
    blocks = greedy_blocks(cost, 4, "auto", limit_extra=0)
    assert [n for b in blocks for n in b] == cost.execution_order
    assert len(blocks) > 1
    one = greedy_blocks(cost, 4, "auto", limit_extra=2**50)
    assert len(one) == 1
