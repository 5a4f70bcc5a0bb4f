"""``torch.nn.utils.clip_grad_norm_`` after make_private is refused at ``optimizer.step()``.

Under make_private, ``.grad`` between backward and step holds the SUM of the clipped per-sample gradients, before
the noise: clipping it would shrink the signal and leave the noise as it is. The engine records each ``.grad``'s
version counter when it writes; the step pre-hook compares. Checked here:

* a loop with clip_grad_norm_ (and clip_grad_value_, an in-place edit, a replaced ``.grad``) raises
  :class:`GradientChangedError` naming clip_grad_norm_ and the fix, and nothing is stepped (parameters, noise
  generator and step count unchanged);
* the same even when clip_grad_norm_ would not clip (it rescales by a clamped factor of 1 in place);
* a loop without it, with gradient accumulation and ``zero_grad(set_to_none=False)``, steps as before;
* the Hugging Face Trainer's own clipping is switched off (its ``_clip_grad_norm`` does nothing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from groupclip import make_private
from groupclip.private import GradientChangedError

DTYPE = torch.float64


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    private = make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, data_size=64, seed=3)
    x = torch.randn(8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(8) % 3
    return model, opt, private, x, y


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.1),
        lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1e12),  # would not clip: still rescales in place
        lambda m: nn.utils.clip_grad_value_(m.parameters(), 0.01),
        lambda m: m[0].weight.grad.mul_(0.5),
        lambda m: setattr(m[2].bias, "grad", m[2].bias.grad.clone()),
    ],
    ids=["clip_grad_norm", "clip_grad_norm_inactive", "clip_grad_value", "in_place", "replaced"],
)
def test_changed_gradient_is_refused_and_nothing_steps(tamper):
    model, opt, private, x, y = setup()
    F.cross_entropy(model(x), y).backward()
    tamper(model)
    before, noise_state = snapshot(model), private.noise.state_dict()
    with pytest.raises(GradientChangedError, match=r"clip_grad_norm_.*max_grad_norm"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert private.steps == 0
    after = private.noise.state_dict()["generators"]
    assert after.keys() == noise_state["generators"].keys()
    assert all(torch.equal(after[k], noise_state["generators"][k]) for k in after)  # no noise was drawn


def test_loop_without_clipping_steps_as_before():
    model, opt, private, x, y = setup()
    for _ in range(2):  # accumulation: two passes, one step; then in-place zeroing between steps
        for half in (slice(0, 4), slice(4, 8)):
            F.cross_entropy(model(x[half]), y[half]).backward()
        before = snapshot(model)
        opt.step()
        opt.zero_grad(set_to_none=False)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert private.steps == 2


def test_trainer_switches_its_clipping_off():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from groupclip.integrations.transformers import PrivateTrainer

    model, _, _, x, y = setup()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert PrivateTrainer._clip_grad_norm(None, model) is None  # the Trainer's call lands here: nothing clipped
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
