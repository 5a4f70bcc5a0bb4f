"""Engine modes for pipeline stages: several live passes, deferred clipping, suspension (one process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groupclip import ClippingEngine


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _micro(n: int = 3, rows: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(rows, 5, generator=gen, dtype=torch.float64) * 2, torch.randint(0, 3, (rows,), generator=gen))
        for _ in range(n)
    ]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="sum")


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _sequential_grads(grouping: str) -> dict[str, torch.Tensor]:
    model = _model()
    with ClippingEngine(model, grouping=grouping, max_grad_norm=0.3, loss_reduction="sum"):
        for x, y in _micro():
            _loss(model(x), y).backward()
    return _grads(model)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]])
def test_concurrent_passes_equal_one_pass_at_a_time(order):
    model = _model()
    with ClippingEngine(model, grouping="layer-wise", max_grad_norm=0.3, loss_reduction="sum") as engine:
        engine.concurrent_passes = True
        losses = [_loss(model(x), y) for x, y in _micro()]  # three forwards before any backward (GPipe)
        for k in order:
            losses[k].backward()
    want = _sequential_grads("layer-wise")
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-10, atol=1e-12)


def test_deferred_clipping_with_own_norms_equals_immediate_and_holds_every_pass():
    immediate = _model()
    with ClippingEngine(immediate, max_grad_norm=0.3, loss_reduction="sum") as engine:
        for x, y in _micro():
            _loss(immediate(x), y).backward()
        one_pass_peak = engine.peak_held_bytes
    model = _model()
    reports = []
    with ClippingEngine(model, max_grad_norm=0.3, loss_reduction="sum") as engine:
        engine.defer_clipping = engine.concurrent_passes = True
        engine.add_report_hook(reports.append)
        losses = [_loss(model(x), y) for x, y in _micro()]
        for loss in losses:
            loss.backward()
        assert engine.deferred_passes == 3 and all(p.grad is None for p in model.parameters())
        assert engine.deferred_squared_norms().shape == (12,)
        engine.clip_deferred()
        assert engine.deferred_passes == 0 and len(reports) == 3
        assert [r.started_fresh for r in reports] == [True, False, False]
        # all three passes' kept tensors were held together until clip_deferred
        assert engine.peak_held_bytes >= 2.5 * one_pass_peak
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, _grads(immediate)[name], rtol=1e-10, atol=1e-12)


def test_deferred_halves_with_summed_norms_equal_all_layer_on_the_whole_model():
    """Two engines on the two halves of a model, as two pipeline stages; the combine sums their squared norms."""
    whole = _model()
    front, back = _model()[:2], _model()[2:]
    engines = [ClippingEngine(m, max_grad_norm=0.3, loss_reduction="sum").attach() for m in (front, back)]
    try:
        for engine in engines:
            engine.defer_clipping = engine.concurrent_passes = True
        sends = []
        for x, y in _micro():
            h = front(x)
            received = h.detach().requires_grad_()
            sends.append((h, received, _loss(back(received), y)))
        for h, received, loss in sends:
            loss.backward()  # the back stage's backward ...
            h.backward(received.grad)  # ... then the front's, with the gradient it was sent
        parts = [engine.deferred_squared_norms() for engine in engines]
        for engine in engines:
            engine.clip_deferred(lambda flat: parts[0] + parts[1])
        norms = engines[1].last_report.per_sample_norms["all"]
    finally:
        for engine in engines:
            engine.detach()
    with ClippingEngine(whole, max_grad_norm=0.3, loss_reduction="sum") as engine:
        for x, y in _micro():
            _loss(whole(x), y).backward()
        torch.testing.assert_close(norms, engine.last_report.per_sample_norms["all"])
        assert bool((engine.last_report.clip_factors["all"] < 1).any())
    got = {k: p.grad for half in (front, back) for k, p in half.named_parameters()}  # slices keep the names
    for name, grad in _grads(whole).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12)


def test_suspended_engine_records_nothing():
    model = _model()
    reports = []
    with ClippingEngine(model, loss_reduction="sum") as engine:
        engine.add_report_hook(reports.append)
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        with engine.suspended():  # a shape-inference run: forward, then input gradients only
            (grad,) = torch.autograd.grad(model(x).sum(), [x])
        assert grad.shape == x.shape and not reports
        assert all(p.grad is None for p in model.parameters())
        x0, y0 = _micro(1)[0]
        _loss(model(x0), y0).backward()  # and records again afterwards
        assert len(reports) == 1
