"""Engine lifetime: attach/detach leave the model as it was, passes pair up, gradients accumulate like autograd's."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from groupclip import AttachError, ClippingEngine, GroupClipError, PassError, attached
from reference import HOOK_DICTS, check_engine, per_sample_gradients, reference_clip


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.block(h)
        return self.head(h.mean(1))


def net_loss(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y, reduction="none")


def net_batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (b, 5), generator=g), torch.randint(0, 3, (b,), generator=g)


def hook_snapshot(model: nn.Module):
    modules = {name: {attr: tuple(getattr(m, attr).keys()) for attr in HOOK_DICTS} for name, m in model.named_modules()}
    params = {
        name: (p.requires_grad, tuple((p._backward_hooks or {}).keys()))
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    return modules, params


def state_snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------- detach restores the model
def test_detach_leaves_model_exactly_as_before():
    torch.manual_seed(0)
    model = Net()
    model.block[3].bias.requires_grad_(False)  # a partly frozen module
    calls = []
    # The user's own hooks must survive attach/detach untouched.
    model.block.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model.head.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model.head.weight.register_hook(lambda g: calls.append("grad"))
    never_attached = copy.deepcopy(model)
    hooks_before, state_before = hook_snapshot(model), state_snapshot(model)

    engine = ClippingEngine(model, grouping="layer-wise", max_grad_norm=0.5)
    engine.attach()
    assert hook_snapshot(model) != hooks_before  # attach did install hooks
    for seed in (1, 2):
        net_loss(model, net_batch(seed=seed)).mean().backward()
    with pytest.raises(IndexError):  # a forward that raises inside a hooked module, mid-pass
        model(torch.full((2, 5), 99))
    model(net_batch(seed=3)[0])  # a forward left without backward
    engine.detach()
    assert not engine.attached

    assert hook_snapshot(model) == hooks_before
    assert_same_state(state_before, state_snapshot(model))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in never_attached.parameters()]

    # A plain backward after detach is ordinary autograd, equal to the never-attached copy's.
    model.zero_grad(set_to_none=True)
    calls.clear()
    batch = net_batch(seed=4)
    net_loss(model, batch).mean().backward()
    assert calls == ["fwd", "pre", "grad"]  # the user's hooks still run, once each
    net_loss(never_attached, batch).mean().backward()
    for (name, p), q in zip(model.named_parameters(), never_attached.parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
        else:
            assert p.grad is None and q.grad is None


def test_detach_is_idempotent_and_reattach_works():
    model = Net().double()
    engine = ClippingEngine(model, grouping="all-layer")
    engine.detach()  # detaching a never-attached engine is harmless
    with engine:
        pass
    engine.detach()
    _, got, want, _, _ = check_engine(model, net_loss, net_batch(), grouping="all-layer", max_grad_norm=0.1)
    assert max(rel(got[n], want[n]) for n in want) < 1e-10


# ---------------------------------------------------------------------- attaching twice
def test_attach_twice_refused():
    model = Net()
    engine = ClippingEngine(model).attach()
    hooks = hook_snapshot(model)
    with pytest.raises(AttachError, match="already attached"):
        engine.attach()
    assert hook_snapshot(model) == hooks  # the refused attach added nothing
    engine.detach()


@pytest.mark.parametrize("target", ["same", "child", "parent"])
def test_second_engine_on_same_model_refused(target):
    model = Net()
    outer = nn.Sequential(model)
    first = ClippingEngine(model).attach()
    hooks = hook_snapshot(outer)
    other_model = {"same": model, "child": model.block, "parent": outer}[target]
    second = ClippingEngine(other_model)
    with pytest.raises(AttachError, match="already has a ClippingEngine"):
        second.attach()
    assert not second.attached
    assert hook_snapshot(outer) == hooks
    first.detach()
    second.attach()  # fine once the first one is gone
    second.detach()
    assert hook_snapshot(outer)[0] == {
        n: {a: () for a in HOOK_DICTS} for n, _ in outer.named_modules()
    }  # nothing left behind by either engine


def test_unrelated_models_can_each_have_an_engine():
    a, b = Net(), Net()
    with ClippingEngine(a), ClippingEngine(b):
        net_loss(a, net_batch()).mean().backward()
        net_loss(b, net_batch()).mean().backward()
    assert all(p.grad is not None for p in (*a.parameters(), *b.parameters()))


# ---------------------------------------------------------------------- context managers
def test_context_manager_detaches_on_exception():
    model = Net()
    hooks = hook_snapshot(model)
    engine = ClippingEngine(model)
    with pytest.raises(RuntimeError, match="boom"), engine as entered:
        assert entered is engine and engine.attached
        raise RuntimeError("boom")
    assert not engine.attached
    assert hook_snapshot(model) == hooks


def test_attached_helper():
    model = Net()
    hooks = hook_snapshot(model)
    engine = ClippingEngine(model)
    with pytest.raises(KeyError), attached(engine) as e:
        assert e is engine and engine.attached
        raise KeyError
    assert not engine.attached and hook_snapshot(model) == hooks


# ---------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
def test_gradient_accumulation_adds_clipped_sums(grouping):
    torch.manual_seed(0)
    model = Net().double()
    batches = [net_batch(b=3, seed=1), net_batch(b=5, seed=2)]
    prior = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = prior[n].clone()
    with ClippingEngine(model, grouping=grouping, max_grad_norm=0.2) as engine:
        for batch in batches:
            net_loss(model, batch).mean().backward()
    want = {n: prior[n].clone() for n in prior}
    for batch in batches:
        clipped, _ = reference_clip(
            per_sample_gradients(model, net_loss, batch), engine.grouping, engine.thresholds, engine.clip_fn
        )
        for n in want:
            want[n] += clipped[n]
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) < 1e-10, n
    assert engine.last_report.batch_size == 5


# ---------------------------------------------------------------------- frozen parameters
def test_frozen_parameters_get_no_grad_and_their_module_is_not_hooked():
    torch.manual_seed(0)
    model = Net().double()
    model.emb.requires_grad_(False)
    model.block[0].requires_grad_(False)
    model.head.bias.requires_grad_(False)  # partly frozen: still hooked, for its weight
    engine = ClippingEngine(model, grouping="param-wise", max_grad_norm=0.3)
    with engine:
        model(*net_batch()[:1])
        (trace,) = engine.live
        assert {use.path for use in trace.uses} == {"block.1", "block.3", "head"}  # frozen modules record nothing
        for p in (model.emb.weight, model.block[0].weight, model.block[0].bias):
            assert not p._backward_hooks
    assert "emb.weight" not in engine.grouping.group_of()
    _, got, want, norms, ref_norms = check_engine(model, net_loss, net_batch(), grouping="param-wise")
    for p in (model.emb.weight, model.block[0].weight, model.block[0].bias, model.head.bias):
        assert p.grad is None and not p.requires_grad
    assert set(want) == {"block.1.weight", "block.1.bias", "block.3.weight", "block.3.bias", "head.weight"}
    for n in want:
        assert rel(got[n], want[n]) < 1e-10, n
    for g in ref_norms:
        assert rel(norms[g], ref_norms[g]) < 1e-10, g


def test_unused_module_in_a_pass_gets_no_grad():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.a(x)))  # self.b is never used

    torch.manual_seed(0)
    model = Branchy().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    loss = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none")  # noqa: E731
    _, got, want, norms, ref_norms = check_engine(model, loss, (x, y), grouping="layer-wise", max_grad_norm=0.1)
    assert set(norms) == set(ref_norms) == {"a", "b", "out"}
    assert model.b.weight.grad is None  # like autograd: an unused parameter gets no gradient
    assert torch.equal(norms["b"], torch.zeros(4, dtype=norms["b"].dtype))
    for n in want:
        assert rel(got[n], want[n]) < 1e-10 or float(want[n].norm()) == 0, n


def test_frozen_module_input_is_not_kept():
    """A frozen first layer's input is not saved by the engine: activation_bytes drops by exactly its size."""
    x = torch.randn(4, 32)
    reports = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 2))
        model[0].requires_grad_(not frozen)
        with ClippingEngine(model) as engine:
            model(x).sum().backward()
        reports[frozen] = engine.last_report
    assert reports[False].activation_bytes - reports[True].activation_bytes == x.numel() * x.element_size()
    assert set(reports[True].per_sample_norms) == {"all"}


def _clear_error_or_exact(model, engine, x):
    """After the model changed, a backward must either raise a groupclip error or clip every trainable tensor."""
    loss = lambda m, b: m(b[0]).pow(2).sum(1)  # noqa: E731
    try:
        with engine if not engine.attached else contextlib.nullcontext():
            loss(model, (x,)).mean().backward()
    except GroupClipError:
        return
    finally:
        engine.detach()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(engine.grouping.group_of()) == trainable, "a trainable parameter is in no clipping group"
    want, _ = reference_clip(
        per_sample_gradients(model, loss, (x,)), engine.grouping, engine.thresholds, engine.clip_fn
    )
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, want[n]) < 1e-10, n


def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


@pytest.mark.parametrize("change", ["unfreeze", "replace_module", "replace_param"])
def test_model_changed_while_attached_is_refused_or_exact(change):
    model = _small_mlp()
    if change == "unfreeze":
        model[0].requires_grad_(False)
    engine = ClippingEngine(model, grouping="all-layer", max_grad_norm=1e-3).attach()
    if change == "unfreeze":
        model[0].requires_grad_(True)  # gradual unfreezing during fine-tuning
    elif change == "replace_module":
        model[0] = nn.Linear(4, 6).double()  # e.g. a resized embedding / new head
    else:
        model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    _clear_error_or_exact(model, engine, torch.randn(5, 4, dtype=torch.float64))


def test_unfrozen_between_construction_and_attach_is_refused_or_exact():
    model = _small_mlp()
    model[0].requires_grad_(False)
    engine = ClippingEngine(model, grouping="layer-wise", max_grad_norm=1e-3)
    model[0].requires_grad_(True)
    _clear_error_or_exact(model, engine, torch.randn(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
def test_empty_batch_gives_zero_clipped_sum(grouping):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with ClippingEngine(model, grouping=grouping, loss_reduction="sum") as engine:
        model(torch.randn(0, 4)).pow(2).sum().backward()
    for p in model.parameters():
        assert p.grad is None or not bool(p.grad.any())
    assert engine.last_report.batch_size == 0
    assert all(v.shape == (0,) for v in engine.last_report.per_sample_norms.values())


# ---------------------------------------------------------------------- forward errors and no_grad
class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.inner = nn.Linear(3, 3)

    def forward(self, x, fail=False):
        h = self.inner(x)
        if fail:
            raise RuntimeError("forward failed")
        return self.lin(h)


def test_forward_raising_restores_requires_grad_and_next_pass_is_exact():
    torch.manual_seed(0)
    model = Raises().double()
    model.inner.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    with ClippingEngine(model, grouping="layer-wise", max_grad_norm=0.1) as engine:
        with pytest.raises(RuntimeError, match="forward failed"):
            model(x, fail=True)
        assert [p.requires_grad for p in model.parameters()] == flags
        with pytest.raises(RuntimeError):  # a hooked leaf module raising (shape mismatch)
            model.lin(torch.randn(4, 5, dtype=torch.float64))
        assert [p.requires_grad for p in model.parameters()] == flags
        model(x).pow(2).sum(1).mean().backward()
    assert [p.requires_grad for p in model.parameters()] == flags
    per_sample = per_sample_gradients(model, lambda m, b: m(b[0]).pow(2).sum(1), (x,))
    want, _ = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, want[n]) < 1e-10, n


def test_forward_under_no_grad_records_nothing():
    model = Net()
    with ClippingEngine(model, grouping="layer-wise") as engine:
        with torch.no_grad():
            out = model(net_batch()[0])
        assert not out.requires_grad
        assert all(p.requires_grad for p in model.parameters())
        assert engine.last_report is None
        with torch.inference_mode():
            model(net_batch()[0])
        net_loss(model, net_batch()).mean().backward()
        assert engine.last_report is not None and engine.last_report.batch_size == 4


def test_no_grad_forward_between_forward_and_backward_does_not_supersede():
    torch.manual_seed(0)
    model = Net().double()
    batch = net_batch()
    with ClippingEngine(model, grouping="layer-wise", max_grad_norm=0.2) as engine:
        loss = net_loss(model, batch).mean()
        with torch.no_grad():  # e.g. logging a metric on another batch
            model(net_batch(seed=9)[0])
        loss.backward()
    want, _ = reference_clip(
        per_sample_gradients(model, net_loss, batch), engine.grouping, engine.thresholds, engine.clip_fn
    )
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) < 1e-10, n


# ---------------------------------------------------------------------- passes must pair up
def test_backward_of_an_earlier_forward_is_exact_and_the_later_one_too():
    """Each forward is a trace of its own: backward of the earlier one after a later forward clips that pass."""
    torch.manual_seed(0)
    model = Net().double()
    b1, b2 = net_batch(seed=1), net_batch(seed=2)
    per_sample = [per_sample_gradients(model, net_loss, b) for b in (b1, b2)]
    with ClippingEngine(model, grouping="all-layer", max_grad_norm=0.2) as engine:
        earlier = net_loss(model, b1).mean()
        later = net_loss(model, b2).mean()
        for loss, grads in ((earlier, per_sample[0]), (later, per_sample[1])):
            model.zero_grad(set_to_none=True)
            loss.backward()
            want, _ = reference_clip(grads, engine.grouping, engine.thresholds, engine.clip_fn)
            for n, p in model.named_parameters():
                assert rel(p.grad, want[n]) < 1e-10, n


def test_one_backward_over_two_forwards_needs_aligned_calls_and_writes_nothing():
    model = Net().double()
    with ClippingEngine(model, grouping="all-layer", max_grad_norm=0.2):
        loss = net_loss(model, net_batch(seed=1)).mean() + net_loss(model, net_batch(seed=2)).mean()
        with pytest.raises(PassError, match="aligned_calls=True"):
            loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_backward_twice_raises_and_keeps_grads():
    model = Net()
    with ClippingEngine(model):
        loss = net_loss(model, net_batch()).mean()
        loss.backward(retain_graph=True)
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(PassError):
            loss.backward()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_backward_twice_error_says_twice():
    model = Net()
    with ClippingEngine(model):
        loss = net_loss(model, net_batch()).mean()
        loss.backward(retain_graph=True)
        with pytest.raises(PassError, match="twice"):
            loss.backward()


def test_report_describes_the_pass():
    model = Net()
    with ClippingEngine(model, grouping="layer-wise", max_grad_norm=2.0) as engine:
        net_loss(model, net_batch(b=7)).mean().backward()
    report = engine.last_report
    assert report.batch_size == 7
    assert set(report.per_sample_norms) == set(engine.grouping.groups) == set(report.clip_factors)
    assert all(v.shape == (7,) for v in report.per_sample_norms.values())
    assert report.thresholds == engine.thresholds
    assert report.activation_bytes > 0


# ---------------------------------------------------------------------- execution order != registration order
class Reordered(nn.Module):
    """Registered a, b, c, d; runs d, b, a, then b again, then c (a module used twice, out of order)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 2)
        self.d = nn.Linear(4, 5, bias=False)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.d(x))))
        h = torch.tanh(self.b(torch.tanh(self.a(h)))) + h
        return self.c(h)


def _reordered_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("grouping", ["layer-wise", 2, 3, {"ab": ["a.*", "b.*"], "cd": ["c.*", "d.*"]}])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_execution_order_differs_from_registration(grouping, clip_fn):
    torch.manual_seed(0)
    model = Reordered().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,)))
    engine, got, want, norms, ref_norms = check_engine(
        model, _reordered_loss, batch, grouping=grouping, max_grad_norm=0.2, clip_fn=clip_fn
    )
    assert all(p.grad is not None for p in model.parameters())  # no layer dropped
    for n in want:
        assert rel(got[n], want[n]) < 1e-10, n
    for g in ref_norms:
        assert rel(norms[g], ref_norms[g]) < 1e-10, g
    assert bool((torch.cat(list(engine.last_report.clip_factors.values())) < 0.99).any())
    if grouping == 3:
        first = engine.grouping.groups["block0"]
        assert first[0] == "d.weight"  # the first module to run heads block 0
