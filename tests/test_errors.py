"""Bad input gets a clear error naming the module path / type / parameter and the fix -- never a wrong gradient.

Every refused ``attach`` must leave the model without any hook and with its ``requires_grad`` flags unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import groupclip
from groupclip import (
    BatchDimensionError,
    ClipFunction,
    ClippingEngine,
    GroupClipError,
    NonFiniteNormError,
    PassError,
    UnattributedGradientError,
    UnsupportedModuleError,
)
from reference import HOOK_DICTS, check_engine, per_sample_gradients


def assert_untouched(model: nn.Module, flags: list[bool]) -> None:
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(m, attr), f"{name or '<root>'}.{attr} left behind"
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"tensor hook left on {name}"
    assert [p.requires_grad for p in model.parameters()] == flags


def assert_close(got: dict, want: dict, tol: float = 1e-9) -> None:
    """Each tensor within ``tol`` relative to max(its norm, 1e-3 * the norm of all): tensors whose true gradient
    is zero (a conv bias feeding a per-channel GroupNorm) hold only float64 rounding noise."""
    total = sum(float(w.double().pow(2).sum()) for w in want.values()) ** 0.5
    for n, w in want.items():
        err = float((got[n].double() - w.double()).norm())
        assert err <= tol * max(float(w.double().norm()), 1e-3 * total), (n, err)


def refuse_attach(model: nn.Module, error: type[Exception], **kwargs) -> str:
    """Attach must raise ``error`` and leave the model exactly as it was; returns the message."""
    flags = [p.requires_grad for p in model.parameters()]
    engine = ClippingEngine(model, **kwargs)
    with pytest.raises(error) as info:
        engine.attach()
    assert not engine.attached
    assert_untouched(model, flags)
    assert isinstance(info.value, GroupClipError)
    return str(info.value)


# ---------------------------------------------------------------------- modules that mix samples
def cnn_with_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_batchnorm_training_refused_with_fix():
    model = cnn_with_batchnorm()
    message = refuse_attach(model, UnsupportedModuleError)
    assert "1.0" in message and "BatchNorm2d" in message
    assert "GroupNorm" in message and "replace_batchnorm" in message


def test_frozen_batchnorm_in_training_mode_still_refused():
    # Even with frozen affine parameters, training-mode BatchNorm mixes samples through its batch statistics.
    model = cnn_with_batchnorm()
    model[1][0].requires_grad_(False)
    message = refuse_attach(model, UnsupportedModuleError)
    assert "1.0 (BatchNorm2d)" in message


def test_batchnorm_switched_to_train_after_attach_refused_at_forward():
    model = cnn_with_batchnorm()
    model[1][0].eval()
    x = torch.randn(3, 3, 6, 6)
    with ClippingEngine(model):
        model(x)  # eval-mode BatchNorm is a per-sample affine map: accepted
        model.train()
        with pytest.raises(UnsupportedModuleError, match=r"1\.0 \(BatchNorm2d\).*GroupNorm"):
            model(x)
        assert all(p.requires_grad for p in model.parameters())


def test_replace_batchnorm_fixes_it_and_is_exact():
    torch.manual_seed(0)
    model = groupclip.replace_batchnorm(cnn_with_batchnorm())
    assert isinstance(model[1][0], nn.GroupNorm) and model[1][0].num_channels == 8
    assert model[1][0].num_groups == 8  # the largest divisor of 8 that is <= 32
    model = model.double()
    batch = (torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,)))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    _, got, want, norms, ref_norms = check_engine(model, loss, batch, grouping="layer-wise", max_grad_norm=0.1)
    assert_close(got, want)
    assert_close(norms, ref_norms)


def test_replace_batchnorm_group_count_and_affine():
    model = nn.Sequential(nn.BatchNorm1d(12, affine=False), nn.BatchNorm2d(7), nn.BatchNorm3d(64))
    groupclip.replace_batchnorm(model, num_groups=5)
    assert [m.num_groups for m in model] == [4, 1, 4]  # largest divisor <= 5 (7 is prime)
    assert not model[0].affine and model[1].affine
    with pytest.raises(ValueError, match="num_groups"):
        groupclip.replace_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), num_groups=0)


# ---------------------------------------------------------------------- layer configurations with no per-sample form
@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"max_norm": 1.0}, "max_norm"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"sparse": True}, "sparse"),
    ],
)
def test_embedding_options_refused(kwargs, what):
    model = nn.Sequential(nn.Embedding(10, 4, **kwargs), nn.Linear(4, 2))
    message = refuse_attach(model, UnsupportedModuleError)
    assert "0 (Embedding)" in message and what in message


def test_embedding_max_norm_frozen_is_fine():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    with ClippingEngine(model):
        model(torch.randint(0, 10, (3, 5))).sum().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None


class Seq(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": layer})

    def forward(self, x):
        out = self.encoder["layer"](x, x, x) if isinstance(self.encoder["layer"], nn.MultiheadAttention) else None
        if out is None:
            out = self.encoder["layer"](x)
        return out[0]


@pytest.mark.parametrize(
    "layer",
    [
        lambda bf: nn.MultiheadAttention(8, 2, batch_first=bf),
        lambda bf: nn.LSTM(8, 8, batch_first=bf),
        lambda bf: nn.GRU(8, 4, batch_first=bf),
    ],
    ids=["mha", "lstm", "gru"],
)
def test_sequence_first_layers_refused(layer):
    model = Seq(layer(False))
    message = refuse_attach(model, UnsupportedModuleError)
    assert "encoder.layer" in message and type(model.encoder["layer"]).__name__ in message
    assert "batch_first=True" in message


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: nn.LSTM(8, 4, batch_first=True),
        lambda: nn.GRU(8, 4, batch_first=True),
    ],
    ids=["mha", "lstm", "gru"],
)
def test_batch_first_layers_exact(make):
    torch.manual_seed(0)
    model = Seq(make()).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    loss = lambda m, b: m(b[0]).pow(2).flatten(1).sum(1)  # noqa: E731
    _, got, want, norms, ref_norms = check_engine(model, loss, (x,), grouping="param-wise", max_grad_norm=0.5)
    assert_close(got, want)
    assert_close(norms, ref_norms)


# ---------------------------------------------------------------------- batch dimension
class Flattening(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, x):  # x: [B, T, 4]
        h = self.embed(x)
        b, t, d = h.shape
        return self.proj(h.reshape(b * t, d)).view(b, t, -1)


def test_batch_folded_into_tokens_is_followed_and_exact():
    """OPT-style [B*T, d] rows: which rows belong to which sample is known from the reshape."""
    torch.manual_seed(0)
    model = Flattening().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    loss = lambda m, b: m(b[0]).pow(2).flatten(1).sum(1)  # noqa: E731
    for grouping in ("all-layer", "layer-wise"):
        _, got, want, norms, ref_norms = check_engine(model, loss, (x,), grouping=grouping, max_grad_norm=0.5)
        assert_close(got, want)
        assert_close(norms, ref_norms)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):  # [B, T, d] -> [T, B, d]: the samples move to dim 1
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


def test_batch_moved_to_another_dim_is_followed_and_exact():
    torch.manual_seed(0)
    model = Transposed().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)  # T == B: sizes cannot tell the axes apart
    loss = lambda m, b: m(b[0]).pow(2).flatten(1).sum(1)  # noqa: E731
    _, got, want, norms, ref_norms = check_engine(model, loss, (x,), grouping="param-wise", max_grad_norm=0.5)
    assert_close(got, want)
    assert_close(norms, ref_norms)


class BatchMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x - x.mean(0))  # centring by the batch mean mixes samples


def test_layer_seeing_mixed_samples_refused():
    model = BatchMean()
    with ClippingEngine(model), pytest.raises(BatchDimensionError, match=r"lin \(Linear\).*mixing samples"):
        model(torch.randn(3, 4))
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- gradients outside the owning module
class FunctionalUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.out(h @ self.lin.weight.T)  # lin.weight used outside lin's forward


def test_parameter_used_outside_its_module_is_exact():
    """``h @ lin.weight.T`` is a raw use of lin.weight: its per-sample gradient is recovered where it meets h."""
    torch.manual_seed(0)
    model = FunctionalUse().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    loss = lambda m, b: m(b[0]).pow(2).sum(1)  # noqa: E731
    for grouping in ("all-layer", "param-wise"):
        _, got, want, norms, ref_norms = check_engine(model, loss, (x,), grouping=grouping, max_grad_norm=0.3)
        assert_close(got, want)
        assert_close(norms, ref_norms)


def test_weight_decay_in_loss_refused_and_nothing_written():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with ClippingEngine(model):
        loss = model(torch.randn(3, 4)).pow(2).sum(1).mean() + 1e-2 * model[2].weight.pow(2).sum()
        with pytest.raises(UnattributedGradientError, match=r"'2\.weight'.*weight decay"):
            loss.backward()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- non-finite norms
def test_non_finite_norm_raises_and_writes_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    prior = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), prior, strict=True):
        p.grad = g.clone()
    x = torch.randn(5, 4)
    x[3, 1] = math.inf
    with ClippingEngine(model, grouping="layer-wise") as engine:
        with pytest.raises(NonFiniteNormError) as info:
            model(x).pow(2).sum(1).mean().backward()
        # the previous (accumulated) gradients are untouched: nothing was written for the step
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), prior, strict=True))
        message = str(info.value)
        assert "samples [3]" in message and "no gradient was written" in message
        # the engine keeps working on clean data
        model.zero_grad(set_to_none=True)
        model(torch.randn(5, 4)).pow(2).sum(1).mean().backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        assert engine.last_report.batch_size == 5


def test_nan_loss_of_one_sample_raises():
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(4, 4)
    with ClippingEngine(model, grouping="param-wise"):
        out = model(x)
        losses = out.pow(2).sum(1) * torch.tensor([1.0, math.nan, 1.0, 1.0])
        with pytest.raises(NonFiniteNormError, match=r"samples \[1\]"):
            losses.sum().backward()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- clip functions
def test_clip_function_breaking_its_bound_refused_and_nothing_written():
    bad = ClipFunction("double", lambda norms, r: torch.full_like(norms, 2.0))
    model = nn.Sequential(nn.Linear(4, 2))
    with ClippingEngine(model, clip_fn=bad, max_grad_norm=1e-3):
        with pytest.raises(ValueError, match="broke its bound"):
            model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_clip_function_whose_fast_form_breaks_its_bound_is_refused():
    # The many-groups ``normalized`` form of a user's function is checked like its plain form (only the built-ins,
    # bound_proven, are trusted).
    bad = ClipFunction(
        "double-fast",
        lambda norms, r: torch.full_like(norms, 2.0),
        normalized=lambda q, r, out: torch.full_like(q, 2.0),
    )
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with ClippingEngine(model, grouping="layer-wise", clip_fn=bad, max_grad_norm=1e-3):
        with pytest.raises(ValueError, match="broke its bound"):
            model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    fine = ClipFunction(
        "half-fast",
        lambda norms, r: torch.full_like(norms, 0.5) * (norms <= r),
        normalized=lambda q, r, out: 0.5 * (q <= 1).to(q.dtype),
    )
    with ClippingEngine(model, grouping="layer-wise", clip_fn=fine, max_grad_norm=1e-3):
        model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_custom_clip_function_respecting_bound_is_used():
    torch.manual_seed(0)
    hard = ClipFunction("hard-zero", lambda norms, r: (norms <= r).to(norms.dtype))
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64),)
    loss = lambda m, b: m(b[0]).pow(2).sum(1)  # noqa: E731
    per_sample = per_sample_gradients(model, loss, batch)
    total = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    r = float(total.median())
    engine, got, want, _, _ = check_engine(model, loss, batch, clip_fn=hard, max_grad_norm=r)
    factors = engine.last_report.clip_factors["all"]
    assert 0 < int(factors.sum()) < 6  # some samples dropped, some kept
    assert_close(got, want)


def test_registered_clip_function_by_name():
    @groupclip.register_clip_function("test-half")
    def half() -> ClipFunction:
        return ClipFunction("half", lambda norms, r: torch.where(norms > r, r / (2 * norms), 0.5))

    engine = ClippingEngine(nn.Linear(2, 2), clip_fn="test-half")
    assert engine.clip_fn.name == "half"
    x = torch.randn(3, 2)
    with engine:
        engine.model(x).sum().backward()
    assert torch.all(engine.last_report.clip_factors["all"] <= 0.5)


# ---------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_reduction": "avg"}, "loss_reduction='avg'"),
        ({"loss_reduction": None}, "loss_reduction"),
        ({"norm_mode": "fast"}, "norm_mode='fast'"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"max_grad_norm": math.inf}, "max_grad_norm"),
        ({"max_grad_norm": {"nope": 1.0}}, r"missing \['all'\], unknown \['nope'\]"),
        ({"clip_fn": "clip-it"}, "clip_fn='clip-it'"),
        ({"clip_fn": "automatic", "clip_options": {"gamma": 0.0}}, "gamma"),
        ({"clip_fn": "automatic", "clip_options": {"gamma": -1.0}}, "gamma"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=match):
        ClippingEngine(model, **kwargs)
    assert_untouched(model, [True, True])


def test_unknown_clip_option_raises_type_error():
    with pytest.raises(TypeError):
        ClippingEngine(nn.Linear(2, 2), clip_fn="abadi", clip_options={"gamma": 0.1})


# ---------------------------------------------------------------------- in-place modification
class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.mul_(2)  # modifies b's (saved) input after b used it
        return out, h


def test_in_place_modification_of_saved_input_refused():
    model = InPlace()
    # Plain autograd refuses it too (b's weight gradient needs the original h).
    out, h = model(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="inplace"):
        (out.sum() + h.sum()).backward()
    with ClippingEngine(model):
        out, h = model(torch.randn(3, 4))
        with pytest.raises(PassError, match=r"b \(Linear\).*in place"):
            (out.sum() + h.sum()).backward()
    assert all(p.grad is None for p in model.parameters())
