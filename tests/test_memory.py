"""Why groups save memory (docs/MATH.md, Memory held for clipping): a group is clipped -- and what it kept released
-- as soon as it is complete.

``ClipReport.peak_held_bytes`` is the peak of :class:`groupclip.bookkeeping.MemoryLedger` ``held_bytes``: the bytes the
engine keeps *beyond* what non-private autograd would (activations and output gradients of uses whose backward has
run but whose group is not clipped yet, plus instantiated per-sample gradients). All-layer clipping holds every
layer's until the backward pass ends; layer-wise holds about one layer's at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groupclip import ClippingEngine
from reference import per_sample_gradients, reference_clip

WIDTH, BLOCKS, BATCH, STEPS = 64, 12, 8, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def deep_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(BLOCKS)])


def loss_fn(model, batch):
    (x,) = batch
    return model(x).pow(2).mean((1, 2))


@pytest.fixture(scope="module")
def peaks():
    model = deep_model()
    x = torch.randn(BATCH, STEPS, WIDTH, generator=torch.Generator().manual_seed(1))
    out = {}
    for grouping in ("all-layer", 4, "layer-wise"):
        model.zero_grad(set_to_none=True)
        with ClippingEngine(model, grouping=grouping, max_grad_norm=1.0) as engine:
            loss_fn(model, (x,)).mean().backward()
        assert engine.last_report.peak_held_bytes == engine.peak_held_bytes
        out[grouping] = engine.last_report
    return out


def test_layer_wise_holds_at_most_a_quarter_of_all_layer(peaks):
    all_layer, layer_wise = peaks["all-layer"].peak_held_bytes, peaks["layer-wise"].peak_held_bytes
    assert layer_wise > 0
    assert layer_wise <= all_layer / 4, (layer_wise, all_layer)


def test_four_groups_sit_between(peaks):
    all_layer = peaks["all-layer"].peak_held_bytes
    four = peaks[4].peak_held_bytes
    layer_wise = peaks["layer-wise"].peak_held_bytes
    assert layer_wise < four < all_layer, (layer_wise, four, all_layer)
    # Each of 4 balanced blocks covers 3 of the 12 blocks: it should hold roughly a quarter of all-layer's peak
    # (at most the block being finished plus what the next one has started).
    assert four <= all_layer / 2, (four, all_layer)


def test_all_layer_holds_every_layer(peaks):
    # With ghost norms (2 T^2 = 512 < p d = 4096) each of the 24 Linear uses keeps its input and output gradient,
    # [B, T, 64] float32 each, until the single group is clipped. Storages shared between uses count once, so the
    # peak is at least the 24 distinct output gradients (the activations may alias the residual stream).
    per_tensor = BATCH * STEPS * WIDTH * 4
    assert peaks["all-layer"].peak_held_bytes >= 2 * BLOCKS * per_tensor
    # ... and layer-wise never holds more than a few layers' worth.
    assert peaks["layer-wise"].peak_held_bytes <= 4 * 2 * per_tensor


def test_memory_saving_groupings_are_still_exact():
    model = deep_model().double()
    x = torch.randn(3, 4, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    per_sample = per_sample_gradients(model, loss_fn, (x,))
    for grouping in ("all-layer", 4, "layer-wise"):
        model.zero_grad(set_to_none=True)
        with ClippingEngine(model, grouping=grouping, max_grad_norm=0.05) as engine:
            loss_fn(model, (x,)).mean().backward()
        want, _ = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
        total = sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
        for n, p in model.named_parameters():
            assert float((p.grad - want[n]).norm()) <= 1e-9 * max(float(want[n].norm()), 1e-3 * total), (grouping, n)


def _state_ref(engine):
    """A weak reference to the newest recorded forward trace (which its backward state also references)."""
    import weakref

    newest = max(engine.live, key=lambda trace: trace.number)
    return weakref.ref(newest)


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
def test_pass_state_is_freed_after_backward(grouping):
    """No reference cycle through autograd's graph keeps a forward trace (its uses, backward state) alive."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    ids = torch.randint(0, 11, (4, 5))
    with ClippingEngine(model, grouping=grouping) as engine:
        out = model(ids)
        ref = _state_ref(engine)
        out.pow(2).mean().backward()
        del out
        gc.collect()
        assert ref() is None, "the pass state outlived its backward pass"
        # A forward pass whose loss is dropped without backward is freed too.
        out = model(ids)
        ref = _state_ref(engine)
        del out
        model(ids[:2]).sum().backward()
        gc.collect()
        assert ref() is None, "an abandoned forward pass was never freed"


def _vector_model() -> nn.Module:
    """Blocks with biases and norm layers: in param-wise (and, for the norms, layer-wise) groups of vectors only."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def test_vector_groups_wait_within_a_share_of_the_last_peak():
    """Groups of per-sample vectors only wait for the end of the pass in the first pass; from the second on they are
    clipped early once their vectors pass PILE_SHARE of the previous pass' peak of everything else held."""
    from groupclip.engine.backward import PILE_SHARE

    model = _vector_model()
    x = torch.randn(BATCH, STEPS, WIDTH, generator=torch.Generator().manual_seed(3))
    with ClippingEngine(model, grouping="param-wise", max_grad_norm=1.0) as engine:
        peaks = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss_fn(model, (x,)).mean().backward()
            peaks.append(engine.last_report.peak_held_bytes)
        others = engine.plan.others_peak_per_sample * BATCH
    vectors = BATCH * 6 * 3 * WIDTH * 4  # every bias, LayerNorm weight and bias: [B, 64] float32 each
    assert peaks[0] >= others + vectors  # the first pass holds them all to the end
    assert peaks[1] == peaks[2] < peaks[0]
    # at most the share, plus what one use adds before the next event looks
    assert peaks[1] <= others * (1 + PILE_SHARE) + 3 * BATCH * WIDTH * 4, (peaks, others)


@pytest.mark.parametrize("grouping", ["param-wise", "layer-wise"])
def test_vector_groups_clipped_early_are_exact(grouping):
    """Passes after the first clip vector-only groups early; their clipped sums are still the definition's, also at
    another batch size (the limit scales with it)."""
    model = _vector_model().double()
    batches = [
        torch.randn(size, 4, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for size, seed in ((6, 4), (6, 5), (3, 6), (9, 7))
    ]
    references = [per_sample_gradients(model, loss_fn, (x,)) for x in batches]
    with ClippingEngine(model, grouping=grouping, max_grad_norm=0.05) as engine:
        for x, per_sample in zip(batches, references, strict=True):
            size = x.shape[0]
            model.zero_grad(set_to_none=True)
            loss_fn(model, (x,)).mean().backward()
            want, _ = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
            for n, p in model.named_parameters():
                assert torch.allclose(p.grad, want[n], rtol=1e-9, atol=1e-12), (grouping, size, n)
