"""Mixed precision under make_private: bf16 autocast, bf16 models, fp16 autocast with a GradScaler (on CPU).

* bf16 autocast and a bf16 model: the clipped sums in ``.grad`` against a same-precision reference -- each sample's
  gradient by its own backward pass under the same autocast / dtype, clipped by definition (factors from the
  float32 norms of those gradients), summed in float32. Tolerance 1e-2 relative to the sum's norm: bf16 keeps 8
  significant bits (unit roundoff 2^-8 = 3.9e-3); the engine and the reference round the activations' gradients and
  their products in different orders (batched vs one sample), a few roundings each; the clipping is active, so
  a sum clipped wrongly (or not at all) misses by far more (checked).
* fp16 autocast with ``torch.amp.GradScaler("cpu")`` attached (``make_private(grad_scaler=...)``): the loss scale
  is a power of two, so scaling is exact and the run must take the same steps as the unscaled run (same noise
  seed) up to float32 rounding; the per-sample norms are those of the unscaled loss (without the scaler attached
  they come out multiplied by the scale -- checked, so the test can fail); the noise is added after
  ``unscale_`` (else it would be divided by the scale and the parameters would differ).
* an overflowing sample: dropped like any non-finite sample (a warning says so), the step proceeds with noise and
  is charged; the scaler sees finite gradients, so its scale does not move on the data's account.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from groupclip import make_private
from groupclip.engine.loss_scale import LossScaleOverflowWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, D_IN, HIDDEN, CLASSES = 8, 6, 16, 3
THRESHOLDS = {"0": 0.05, "2": 0.05, "3": 0.05}


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, CLASSES)).to(dtype)


def data(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D_IN, generator=g).to(dtype), torch.arange(B) % CLASSES


def groups_of(model: nn.Module) -> dict[str, list[str]]:
    return {k: [n for n, _ in model.named_parameters() if n.startswith(k + ".")] for k in THRESHOLDS}


def private_of(model, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = make_private(
            model, opt, grouping="layer-wise", max_grad_norm=THRESHOLDS, noise_multiplier=0.0, batch_size=B,
            data_size=10 * B, **kwargs,
        )  # fmt: skip
    return opt, private


def reference(model: nn.Module, x, y, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Clipped per-sample gradients by definition, one backward pass per sample, summed in float32."""
    total = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    unclipped = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    for i in range(B):
        model.zero_grad()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        for group, names in groups_of(model).items():
            grads = {n: dict(model.named_parameters())[n].grad.float() for n in names}
            norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
            factor = min(1.0, THRESHOLDS[group] / float(norm))
            for n, g in grads.items():
                total[n] += factor * g
                unclipped[n] += g
    model.zero_grad()
    return total, unclipped


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    diff = torch.sqrt(sum((got[n].float() - want[n]).square().sum() for n in want))
    return float(diff / torch.sqrt(sum(w.square().sum() for w in want.values())))


@pytest.mark.parametrize("kind", ["autocast", "model"])
def test_bf16_matches_same_precision_reference(kind):
    dtype = torch.bfloat16 if kind == "model" else torch.float32
    autocast = torch.bfloat16 if kind == "autocast" else None
    model = build(dtype=dtype)
    x, y = data(dtype)
    want, unclipped = reference(model, x, y, autocast)
    _, private = private_of(model)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert all(g.dtype == dtype for g in got.values())
    error = relative_error(got, want)
    assert error < 1e-2  # measured: 1.9e-3 (autocast), 2.4e-3 (bf16 model)
    assert relative_error(unclipped, want) > 0.5  # the clipping is active: a sum clipped wrongly would fail
    factors = private.engine.last_report.factors
    assert bool((factors < 1).all())


def scaled_run(scaler: torch.amp.GradScaler | None, attach: bool = True, steps: int = 3):
    model = build()
    x, y = data()
    opt, private = private_of(model, noise_seed=7, grad_scaler=scaler if attach else None, **{})
    norms = []
    for step in range(steps):
        xb, yb = x.roll(step, 0), y.roll(step, 0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(xb), yb)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        norms.append(private.engine.last_report.squared_norms.clone())
        opt.zero_grad()
    return model, private, norms


def test_grad_scaler_takes_the_unscaled_steps():
    plain_model, plain, plain_norms = scaled_run(None)
    scale = 2.0**12
    model, private, norms = scaled_run(torch.amp.GradScaler("cpu", init_scale=scale))
    assert private.steps == plain.steps == 3 and private.noise_multiplier == 0.0
    for got, want in zip(norms, plain_norms, strict=True):
        assert torch.allclose(got, want, rtol=1e-5)
    for (n, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n
    # Without the scaler attached, the norms are those of the scaled loss: the test above can fail.
    _, _, wrong = scaled_run(torch.amp.GradScaler("cpu", init_scale=scale), attach=False, steps=1)
    assert torch.allclose(wrong[0], plain_norms[0] * scale**2, rtol=1e-5)


def test_grad_scaler_noise_is_added_after_unscale():
    def run(scaler):
        model = build()
        x, y = data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_private(
                model, opt, max_grad_norm=0.1, noise_multiplier=2.0, batch_size=B, data_size=10 * B, noise_seed=5,
                grad_scaler=scaler,
            )  # fmt: skip
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
        return [p.detach().clone() for p in model.parameters()]

    before = [p.detach().clone() for p in build().parameters()]
    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    moved = max(float((a - b).abs().max()) for a, b in zip(plain, before, strict=True))
    diff = max(float((a - b).abs().max()) for a, b in zip(plain, scaled, strict=True))
    # Noise std 2.0 * 0.1 / 8 * lr per coordinate moved the parameters; divided by the scale it would be ~1000x less.
    assert moved > 1e-3 and diff <= 1e-4 * moved


def test_overflowed_samples_are_dropped_and_the_step_proceeds_with_noise():
    # A skip decided by the data without noise would not be covered by the guarantee: an overflowed sample is
    # dropped like any non-finite one, the step proceeds (noise added, round charged), the scaler sees finite
    # gradients and so never backs off on the data's account.
    model = build()
    x, y = data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # 2^24 / 8 times a logit gradient overflows float16
    opt, private = private_of(model, grad_scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    with pytest.warns(LossScaleOverflowWarning, match="overflowed"):
        scaler.scale(loss).backward()
    dropped = private.engine.last_report.dropped
    assert all(rows == list(range(B)) for rows in dropped.values())  # every sample overflowed: all dropped ...
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # ... and the scaler sees finite sums
    scaler.step(opt)
    scaler.update()
    assert private.steps == 1 and private.accountant.steps == 1  # stepped (noise only) and charged
    assert scaler.get_scale() == 2.0**24  # no back-off decided by the data


def test_grad_scaler_argument_is_checked():
    with pytest.raises(TypeError, match="grad_scaler"):
        private_of(build(), grad_scaler=object())
