"""The cost model asks the norms registry: a layer registered with ``register_layer`` is costed by its declared
:class:`~groupclip.norms.LayerCost`, a layer without a rule as the engine's generic fallback (instantiated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groupclip import ClippingEngine
from groupclip.norms import Factored, FactorShape, LayerCost, register_layer, registry
from groupclip.planning import Workload, layer_cost, plan_grouping, style_grouping, trace_model

B, T, P, D = 4, 5, 12, 40  # 2 T^2 = 50 < p d = 480: "auto" keeps the factors (ghost norm)


class _Scaled(nn.Module):
    """``2 x W^T``: a linear layer without bias that is not an ``nn.Linear``."""

    def __init__(self, p: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, p) / p**0.5)

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight)


class _ScaledUnregistered(_Scaled):
    """The same layer with its own ``forward``: no rule applies, the engine's generic fallback handles it."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight)


def _scaled_shape(module: nn.Module, x, out, batch: int) -> FactorShape:
    d, p = module.weight.shape
    return FactorShape(steps=x.numel() // (batch * p), cols=p, rows=d)


class _Net(nn.Module):
    def __init__(self, layer: type[nn.Module]) -> None:
        super().__init__()
        self.proj = layer(P, D)
        self.head = nn.Linear(D, 3)

    def forward(self, input):
        return self.head(torch.tanh(self.proj(input))).mean(1)


@pytest.fixture
def scaled_rule(monkeypatch):
    """Register ``_Scaled``'s rule with its declared cost; the registry is restored afterwards."""
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))

    @register_layer(_Scaled, right_is_input=True, cost=LayerCost("factored", shape=_scaled_shape, operand="input"))
    def scaled(module, activation, grad_output, wanted):
        a = activation.reshape(activation.shape[0], -1, 1, module.weight.shape[1])
        g = 2.0 * grad_output.reshape(grad_output.shape[0], -1, 1, module.weight.shape[0])
        return {"weight": Factored(g, a, module.weight.shape)}


def _workload(layer: type[nn.Module]) -> Workload:
    torch.manual_seed(0)
    return Workload(_Net(layer), {"input": torch.randn(B, T, P)}, torch.randint(0, 3, (B,)), "classify")


def _measured_kept(work: Workload, style: str, mode: str) -> int:
    engine = ClippingEngine(work.model, grouping=style_grouping(style), max_grad_norm=1.0, norm_mode=mode)
    with engine:
        work.loss().backward()
    for p in work.model.parameters():
        p.grad = None
    return engine.last_report.peak_held_bytes


def test_a_registered_layer_is_costed_by_its_declared_form(scaled_rule) -> None:
    work = _workload(_Scaled)
    assert layer_cost(work.model.proj).form == "factored"
    cost = trace_model(work)
    proj = next(u for u in cost.uses if u.path == "proj")
    assert (proj.form, proj.steps, proj.cols, proj.rows) == ("factored", T, P, D)
    assert proj.ghost("auto")
    # the ghost norm's Grams, per the declaration: 2 B T^2 (p + d) for proj, the same for the head (p=40, d=3)
    extra = cost.flops("layer-wise", B, "ghost") - cost.flops("non-private", B)
    assert extra == 2 * B * T * T * (P + D) + 2 * B * T * T * (D + 3)
    # what it keeps: the output gradient and the input, not a [B, d, p] per-sample gradient
    kept = sum(b for items in proj.kept("auto", B).values() for _, b in items)
    assert kept == B * T * (D + P) * 4
    for style in ("all-layer", "layer-wise"):
        for mode in ("auto", "instantiate"):
            predicted = cost.predict(style, B, mode).kept_bytes
            assert predicted == _measured_kept(work, style, mode), (style, mode)


def test_a_layer_without_a_rule_is_costed_as_the_generic_fallback(scaled_rule) -> None:
    work = _workload(_ScaledUnregistered)
    assert layer_cost(work.model.proj).form == "instantiated"
    cost = trace_model(work)
    proj = next(u for u in cost.uses if u.path == "proj")
    assert proj.form == "instantiated" and not proj.ghost("auto") and not proj.ghost("ghost")
    kept = sum(b for items in proj.kept("auto", B).values() for _, b in items)
    assert kept == B * D * P * 4  # the instantiated [B, d, p] per-sample gradient
    for style in ("all-layer", "layer-wise"):
        predicted = cost.predict(style, B, "auto").kept_bytes
        assert predicted == _measured_kept(work, style, "auto"), style


def test_a_rule_without_a_declared_cost_is_costed_as_instantiated(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))
    register_layer(_Scaled)(lambda module, activation, grad_output, wanted: {})
    assert layer_cost(_Scaled(P, D)).form == "instantiated"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"form": "outer"}, "form='outer'"),
        ({"form": "factored"}, "needs shape="),
        ({"form": "factored", "shape": _scaled_shape, "operand": "patches"}, "operand='patches'"),
    ],
)
def test_a_bad_layer_cost_is_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LayerCost(**kwargs)


def test_register_layer_refuses_a_cost_that_is_not_a_layer_cost() -> None:
    with pytest.raises(TypeError, match="LayerCost"):
        register_layer(_Scaled, cost="factored")


def test_the_planner_lists_each_grouping_once() -> None:
    work = _workload(_ScaledUnregistered)
    plan = plan_grouping(work, 2**50, measure="cuda")
    assert [c.label for c in plan.candidates] == ["all-layer"]  # the greedy single block is all-layer again
    tight = plan_grouping(work, 1, measure="cuda")
    groupings = [frozenset(frozenset(g) for g in c.grouping) for c in tight.candidates]
    assert len(groupings) == len(set(groupings)) and len(groupings) > 1
