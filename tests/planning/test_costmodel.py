"""The analytic cost model against what the engine measures; its FLOP formulas against docs/MATH.md, Cost of a step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.harness.presets import Workload, build_workload
from groupclip import ClippingEngine
from groupclip.planning.costmodel import style_grouping, trace_model

STYLES = ["all-layer", "groups-2", "layer-wise", "param-wise"]
MODES = ["auto", "ghost", "instantiate"]


def _measured_kept(work: Workload, style: str, mode: str) -> int:
    engine = ClippingEngine(work.model, grouping=style_grouping(style), max_grad_norm=1.0, norm_mode=mode)
    with engine:
        work.loss().backward()
    for p in work.model.parameters():
        p.grad = None
    return engine.last_report.peak_held_bytes


def _mlp_workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 3))
    return Workload(model, {"input": torch.randn(6, 5, 12)}, torch.randint(0, 3, (6,)), "classify")


class _PooledMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp_workload().model

    def forward(self, input):
        return self.body(input).mean(1)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "cnn-tiny", "mlp"])
def test_predicted_kept_bytes_match_the_engine_ledger(name: str) -> None:
    pytest.importorskip("transformers")
    if name == "mlp":
        base = _mlp_workload()
        work = Workload(_PooledMLP(), base.inputs, base.targets, "classify")
    else:
        work = build_workload(name, seed=1)
    cost = trace_model(work, trace_batch=2)  # traced on 2 samples, scaled to the batch
    for style in STYLES:
        for mode in MODES:
            predicted = cost.predict(style, work.batch_size, mode).kept_bytes
            measured = _measured_kept(work, style, mode)
            assert measured > 0
            assert abs(predicted / measured - 1) <= 0.10, (style, mode, predicted, measured)


def test_all_layer_keeps_more_than_layer_wise_on_a_transformer() -> None:
    pytest.importorskip("transformers")
    cost = trace_model(build_workload("bert-tiny"))
    flat = cost.predict("all-layer").kept_bytes
    layer = cost.predict("layer-wise").kept_bytes
    assert flat > 4 * layer


def test_linear_flops_follow_the_book_keeping_formulas() -> None:
    b, t, p, d = 3, 7, 5, 11
    model = nn.Linear(p, d)
    work = Workload(model, {"input": torch.randn(b, t, p)}, torch.zeros(b, dtype=torch.long), "classify")
    cost = trace_model(work)
    (use,) = cost.uses
    assert (use.steps, use.cols, use.rows) == (t, p, d)
    non_private = 6 * b * t * p * d
    assert cost.flops("non-private", b) == non_private
    assert cost.flops("layer-wise", b, "ghost") == non_private + 2 * b * t * t * (p + d)
    assert cost.flops("layer-wise", b, "instantiate") == non_private + 4 * b * (p * d + d)
    assert cost.flops("opacus-ghost", b) == non_private + 2 * (2 * b * t * p * d) + 2 * b * t * t * (p + d)


class _SharedInput(nn.Module):
    """Three projections of one input, like attention's q, k, v."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, input):
        return (self.q(input) * self.k(input) + self.v(input)).mean(1)


def test_the_input_gram_of_a_shared_input_is_counted_once() -> None:
    b, t = 2, 6
    work = Workload(_SharedInput(), {"input": torch.randn(b, t, 8)}, torch.zeros(b, dtype=torch.long), "classify")
    cost = trace_model(work)
    extra = cost.flops("layer-wise", b, "ghost") - cost.flops("non-private", b)
    assert extra == 3 * 2 * b * t * t * 8 + 1 * 2 * b * t * t * 8  # three output Grams, one input Gram


def test_trace_counts_saved_activations_and_scales_with_batch() -> None:
    pytest.importorskip("transformers")
    small = trace_model(build_workload("bert-tiny", batch_size=2))
    assert small.saved_bytes_per_sample > 0
    assert small.predict("non-private", 8).peak_bytes > small.predict("non-private", 2).peak_bytes
    assert small.execution_order[0].startswith("bert.embeddings")
