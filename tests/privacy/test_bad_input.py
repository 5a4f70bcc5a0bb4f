"""Bad input to the DP front end is refused before anything changes.

Every case calls :func:`groupclip.make_private` (or :meth:`PrivateTraining.load_state_dict`) with one bad setting
and checks three things:

* the error type, and a message fragment naming the argument (and, where there is one, the fix);
* that NOTHING changed: parameter values, gradients and ``requires_grad`` flags; the optimizer's state,
  ``param_groups`` and hook dictionaries (``_optimizer_step_pre_hooks`` / ``_optimizer_step_post_hooks`` ...); every
  submodule's hook dictionaries (``_forward_hooks``, ``_forward_pre_hooks``, ``_backward_hooks``,
  ``_backward_pre_hooks`` and the rest) and its instance attributes; torch's global module / optimizer hooks,
  default dtype, grad mode and global RNG state; for checkpoints also the ledger, steps, rounds, noise and sampler
  generator states, thresholds and adaptive counts;
* that the same model and optimizer then work with a correct ``make_private`` (nothing was left attached).

Suspicious but legal settings warn instead (``noise_multiplier=0``: :class:`NoPrivacyWarning`; a delta of at least
``1/N``: ``UserWarning``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from groupclip import AdaptiveClipping, AttachError, GroupingError, PrivacySetupError, make_private
from groupclip.errors import DistributedSetupError
from groupclip.privacy_plan import NoPrivacyWarning

DTYPE = torch.float64
GOOD = {"noise_multiplier": 1.0, "batch_size": 8, "data_size": 80}
TARGET = {"noise_multiplier": None, "target_epsilon": 3.0, "target_delta": 1e-3}


# ---------------------------------------------------------------------- the model and optimizer every case uses
def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def build() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A float64 MLP with a frozen last layer and user hooks, and an Adam optimizer that has taken one step (so it
    has state to protect)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 3)).to(DTYPE)
    model[3].requires_grad_(False)
    model[0].register_forward_hook(_noop)
    model.register_forward_pre_hook(_noop)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    opt.register_step_pre_hook(_noop)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------- snapshots of everything a call could touch
def _hook_dicts(obj: object) -> dict[str, tuple]:
    """Every dict attribute of ``obj`` whose name mentions hooks, as (key, identity of the hook) pairs."""
    out = {}
    for name, value in vars(obj).items():
        if "hook" in name and isinstance(value, dict):
            out[name] = tuple((k, id(v) if callable(v) else v) for k, v in value.items())
    return out


def _tensor(t: torch.Tensor | None) -> Any:
    if t is None:
        return None
    t = t.detach()
    return ("meta", tuple(t.shape), t.dtype) if t.is_meta else t.clone()


def _optimizer_state(opt: object) -> Any:
    if not isinstance(opt, torch.optim.Optimizer):
        return repr(opt)
    names = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    return {
        "state": {
            names.get(id(p), id(p)): {k: _tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in opt.state.items()
        },
        "groups": [
            {k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in sorted(g.items())}
            for g in opt.param_groups
        ],
        "hooks": _hook_dicts(opt),
        "attributes": sorted(vars(opt)),
    }


def _model_state(model: object) -> Any:
    if not isinstance(model, nn.Module):
        return repr(model)
    return {
        "parameters": {
            n: (
                _tensor(p),
                _tensor(p.grad),
                p.requires_grad,
                sorted(vars(p)),
                _hook_dicts(p) if hasattr(p, "__dict__") else None,
            )
            for n, p in model.named_parameters()
        },
        "buffers": {n: _tensor(b) for n, b in model.named_buffers()},
        "modules": {path: (type(m), sorted(vars(m)), _hook_dicts(m)) for path, m in model.named_modules()},
    }


def _global_state() -> Any:
    module_globals = torch.nn.modules.module
    optim_globals = optimizer_module
    return {
        "module hooks": [
            tuple(getattr(module_globals, name).keys())
            for name in dir(module_globals)
            if name.startswith("_global_") and name.endswith("hooks")
        ],
        "optimizer hooks": [
            tuple(getattr(optim_globals, name).keys())
            for name in dir(optim_globals)
            if name.startswith("_global_") and name.endswith("hooks")
        ],
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "rng": torch.get_rng_state(),
    }


def _private_state(private: Any) -> Any:
    if private is None:
        return None
    return {
        "ledger": copy.deepcopy(private.accountant.ledger),
        "kind": private.accountant.kind,
        "steps": private.steps,
        "rounds": private.rounds,
        "open": private._open_round,
        "noise": copy.deepcopy(private.noise.state_dict()),
        "sampler": copy.deepcopy(private.sampler.state_dict()) if private.sampler is not None else None,
        "thresholds": dict(private.engine.thresholds),
        "adaptive": copy.deepcopy(private.tracker.state_dict()) if private.tracker is not None else None,
        "attached": private.engine.attached,
    }


def snapshot(model: object, opt: object, private: Any = None) -> Any:
    return {
        "model": _model_state(model),
        "optimizer": _optimizer_state(opt),
        "global": _global_state(),
        "private": _private_state(private),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} -> {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} -> {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} -> {b!r}"


def works_after(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """A correct ``make_private`` on the same objects trains one step (nothing was left attached)."""
    private = make_private(model, opt, **GOOD)
    try:
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        x, y = _batch(seed=2)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert private.steps == 1
        after = [p for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    finally:
        private.detach()


# ---------------------------------------------------------------------- make_private cases
@dataclass
class Lazy:
    """A value built inside ``pytest.raises`` (its construction may be what raises)."""

    make: Callable[[], Any]


@dataclass
class Case:
    kwargs: dict[str, Any]
    error: type[BaseException]
    match: str
    model: Callable[[nn.Module], Any] | None = None  # what is passed as model, from the built one
    optimizer: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None
    before: Callable[[nn.Module, torch.optim.Optimizer], Callable[[], None]] | None = None  # returns a cleanup
    works_after: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _meta_model(model: nn.Module) -> nn.Module:
    with torch.device("meta"):
        return nn.Linear(5, 3)


def _already_private(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
    return make_private(model, opt, **GOOD).detach


def _layer_groups(*names: str) -> dict[str, list[str]]:
    return {"a": ["0.weight", "0.bias"], "b": ["2.weight", "2.bias"], **{f"x{i}": [n] for i, n in enumerate(names)}}


CASES: dict[str, Case] = {
    # ---- privacy settings (privacy_plan)
    "target_epsilon-epochs=0": Case({**TARGET, "epochs": 0}, PrivacySetupError, r"epochs=0 .*> 0"),
    "target_epsilon-steps=0": Case({**TARGET, "steps": 0}, PrivacySetupError, r"steps=0 .*> 0"),
    "delta=0": Case({"target_delta": 0}, PrivacySetupError, r"target_delta=0 .*> 0"),
    "delta=1": Case({"target_delta": 1}, PrivacySetupError, r"target_delta=1.0 in \(0, 1\)"),
    "delta=2": Case({"target_delta": 2}, PrivacySetupError, r"target_delta=2.0 in \(0, 1\)"),
    "delta=-1": Case({"target_delta": -1}, PrivacySetupError, r"target_delta=-1 .*> 0"),
    "epochs-and-steps": Case({**TARGET, "epochs": 1, "steps": 10}, PrivacySetupError, "Give epochs or steps, not both"),
    "epochs-and-steps-with-sigma": Case({"epochs": 1, "steps": 10}, PrivacySetupError, "epochs or steps, not both"),
    "data_size=100.7": Case({"data_size": 100.7}, PrivacySetupError, r"data_size=100.7 to be a whole number"),
    "data_size=0": Case({"data_size": 0}, PrivacySetupError, r"data_size=0 .*> 0"),
    "data_size-missing": Case({"data_size": None}, PrivacySetupError, "Give data_size"),
    "batch_size>data_size": Case({"batch_size": 100}, PrivacySetupError, "batch_size=100 exceeds data_size=80"),
    "batch_size=0": Case({"batch_size": 0}, PrivacySetupError, r"batch_size=0 .*> 0"),
    "sample_rate=2": Case({"batch_size": None, "sample_rate": 2}, PrivacySetupError, r"sample_rate=2.0 in \(0, 1\]"),
    "sample_rate-disagrees": Case({"sample_rate": 0.5}, PrivacySetupError, "sample_rate=0.5 and batch_size=8"),
    "noise_multiplier=-1": Case({"noise_multiplier": -1}, PrivacySetupError, r"noise_multiplier=-1 .*>= 0"),
    "noise_multiplier=nan": Case({"noise_multiplier": math.nan}, PrivacySetupError, "noise_multiplier=nan"),
    "noise_multiplier-and-target": Case(
        {**TARGET, "noise_multiplier": 1.0, "steps": 10}, PrivacySetupError, "noise_multiplier or target_epsilon"
    ),
    "target_epsilon=0": Case({**TARGET, "target_epsilon": 0, "steps": 10}, PrivacySetupError, "target_epsilon=0"),
    "target_epsilon=-1": Case({**TARGET, "target_epsilon": -1, "steps": 10}, PrivacySetupError, "target_epsilon=-1"),
    "target_epsilon-without-delta": Case(
        {**TARGET, "target_delta": None, "steps": 10}, PrivacySetupError, "needs target_delta"
    ),
    "target_epsilon-without-length": Case({**TARGET}, PrivacySetupError, "give epochs or steps"),
    "accountant=zcdp": Case({"accountant": "zcdp"}, PrivacySetupError, r"accountant='zcdp' in \('rdp', 'pld'\)"),
    # ---- clipping settings (engine, setup_checks)
    "max_grad_norm=0": Case({"max_grad_norm": 0}, ValueError, r"max_grad_norm for group 'all'=0.0 in \(0, inf\)"),
    "max_grad_norm=-1": Case({"max_grad_norm": -1}, ValueError, r"max_grad_norm for group 'all'=-1.0"),
    "max_grad_norm=nan": Case({"max_grad_norm": math.nan}, ValueError, r"max_grad_norm for group 'all'=nan"),
    "max_grad_norm-list-wrong-length": Case(
        {"grouping": "layer-wise", "max_grad_norm": [1.0, 2.0, 3.0]},
        TypeError,
        r"max_grad_norm=\[1.0, 2.0, 3.0\] is a list.*mapping \{group name: threshold\}.*\['0', '2'\]",
    ),
    "max_grad_norm-list": Case(
        {"grouping": "layer-wise", "max_grad_norm": (1.0, 2.0)}, TypeError, r"max_grad_norm=\(1.0, 2.0\) is a tuple"
    ),
    "max_grad_norm-mapping-wrong-groups": Case(
        {"grouping": "layer-wise", "max_grad_norm": {"0": 1.0}}, ValueError, r"max_grad_norm .*missing \['2'\]"
    ),
    "max_grad_norm='1'": Case({"max_grad_norm": "1"}, TypeError, "max_grad_norm to be a number"),
    "max_grad_norm=True": Case({"max_grad_norm": True}, TypeError, "max_grad_norm to be a number"),
    "clip_fn-unknown": Case({"clip_fn": "bogus"}, ValueError, "Unknown clip_fn='bogus'"),
    "grouping-unknown-name": Case({"grouping": "bogus-wise"}, GroupingError, "Unknown grouping 'bogus-wise'"),
    "grouping-names-absent-parameter": Case(
        {"grouping": _layer_groups("9.weight")}, GroupingError, r"match no trainable parameter: x0: '9.weight'"
    ),
    "grouping-frozen-parameter": Case(
        {"grouping": _layer_groups("3.weight")}, GroupingError, "match no trainable parameter"
    ),
    "grouping-parameter-in-two-groups": Case(
        {"grouping": _layer_groups("2.weight")}, GroupingError, r"2.weight -> \['b', 'x0'\]"
    ),
    "grouping=0": Case({"grouping": 0}, GroupingError, "grouping=0 .*>= 1"),
    "loss_reduction=max": Case({"loss_reduction": "max"}, ValueError, r"loss_reduction='max' in \('mean', 'sum'\)"),
    "norm_mode-unknown": Case({"norm_mode": "fast"}, ValueError, "norm_mode='fast'"),
    # ---- randomness
    "seed='abc'": Case({"seed": "abc"}, TypeError, "seed to be a non-negative int or None; got 'abc'"),
    "noise_seed='abc'": Case({"noise_seed": "abc"}, TypeError, "noise_seed to be a non-negative int or None"),
    "noise_seed=-1": Case({"noise_seed": -1}, TypeError, "noise_seed to be a non-negative int"),
    "seed-and-noise_seed-differ": Case({"seed": 1, "noise_seed": 2}, PrivacySetupError, "seed is the old name"),
    "secure_noise='no'": Case({"secure_noise": "no"}, TypeError, "secure_noise to be True or False"),
    # ---- model and optimizer (setup_checks)
    "optimizer='adam'": Case({}, TypeError, "optimizer to be a torch.optim.Optimizer", optimizer=lambda m, o: "adam"),
    "optimizer-missing-parameter": Case(
        {},
        ValueError,
        r"missing from the optimizer: \['2.weight', '2.bias'\]",
        optimizer=lambda m, o: torch.optim.SGD(m[0].parameters(), lr=0.1),
    ),
    "optimizer-foreign-tensor": Case(
        {},
        ValueError,
        r"1 parameter\(s\) not in the model \(tensor of shape \(7, 2\)\)",
        optimizer=lambda m, o: torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad] + [nn.Parameter(torch.zeros(7, 2))], lr=0.1
        ),
    ),
    "model=None": Case({}, TypeError, "model to be a torch.nn.Module; got NoneType", model=lambda m: None),
    "model-on-meta-device": Case(
        {},
        ValueError,
        r"\['weight', 'bias'\] are on the meta device.*to_empty",
        model=_meta_model,
        optimizer=lambda m, o: torch.optim.SGD(m.parameters(), lr=0.1),
    ),
    "unknown-keyword": Case({"bogus": 1}, TypeError, "unexpected keyword argument 'bogus'"),
    "make_private-twice": Case({}, AttachError, "already has a ClippingEngine attached", before=_already_private),
    # ---- topology options
    "distributed='yes'": Case({"distributed": "yes"}, TypeError, "distributed to be True or False"),
    "distributed-without-process-group": Case({"distributed": True}, DistributedSetupError, "init_process_group"),
    "process_group-without-distributed": Case(
        {"process_group": object()}, PrivacySetupError, "process_group is used only with distributed=True"
    ),
    "topology-not-a-topology": Case({"topology": "local"}, TypeError, "topology to be a groupclip.topology.Topology"),
    # ---- adaptive thresholds
    "adaptive-quantile=0": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(target_quantile=0))}, ValueError, r"target_quantile=0 in \(0, 1\)"
    ),
    "adaptive-quantile=1.5": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(target_quantile=1.5))}, ValueError, r"target_quantile=1.5 in"
    ),
    "adaptive-learning_rate=-1": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(learning_rate=-1))}, ValueError, r"learning_rate=-1 > 0"
    ),
    "adaptive-learning_rate=inf": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(learning_rate=math.inf))}, ValueError, "learning_rate=inf .*finite"
    ),
    "adaptive-count_noise_std=0": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(count_noise_std=0))}, ValueError, r"count_noise_std=0 > 0"
    ),
    "adaptive-rescale-unknown": Case(
        {"adaptive": Lazy(lambda: AdaptiveClipping(rescale="max"))}, ValueError, r"rescale='max' in"
    ),
    "adaptive=True": Case({"adaptive": True}, TypeError, r"adaptive to be None or a groupclip.AdaptiveClipping"),
    "adaptive-count-noise-over-budget": Case(
        {"grouping": "layer-wise", "adaptive": AdaptiveClipping(count_noise_std=0.1)},
        ValueError,
        r"2 groups with count noise std 0.1 would spend more than the whole budget.*count_noise_std > 0.7071",
    ),
    "adaptive-without-noise": Case(
        {"noise_multiplier": 0.0, "adaptive": AdaptiveClipping()}, ValueError, "needs a positive noise multiplier"
    ),
    "adaptive-with-int-grouping": Case(
        {"grouping": 2, "adaptive": AdaptiveClipping()}, PrivacySetupError, "Adaptive clipping needs the groups up"
    ),
}


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.make() if isinstance(v, Lazy) else v for k, v in kwargs.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_make_private_refuses_and_changes_nothing(name):
    case = CASES[name]
    model, opt = build()
    cleanup = case.before(model, opt) if case.before is not None else None
    passed_model = case.model(model) if case.model is not None else model
    passed_opt = case.optimizer(passed_model if case.model else model, opt) if case.optimizer is not None else opt
    states = [snapshot(model, opt)]
    if passed_opt is not opt or passed_model is not model:
        states.append(snapshot(passed_model, passed_opt))
    with pytest.raises(case.error, match=case.match):
        make_private(passed_model, passed_opt, **{**GOOD, **_resolve(case.kwargs)})
    assert_same(states[0], snapshot(model, opt), "built")
    if len(states) > 1:
        assert_same(states[1], snapshot(passed_model, passed_opt), "passed")
    if cleanup is not None:
        cleanup()
    works_after(model, opt)


def test_the_matrix_has_every_case():
    assert len(CASES) >= 40


# ---------------------------------------------------------------------- a DDP-wrapped model (gloo, one process)
@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("distributed", [False, True])
def test_ddp_wrapped_model_is_refused(gloo_group, distributed):
    model, opt = build()
    wrapped = nn.parallel.DistributedDataParallel(model)
    before = snapshot(wrapped, opt)
    with pytest.raises(TypeError, match=r"DistributedDataParallel-wrapped model.*ddp_model.module.*distributed=True"):
        make_private(wrapped, opt, distributed=distributed, **GOOD)
    assert_same(before, snapshot(wrapped, opt))


# ---------------------------------------------------------------------- load_state_dict
def _run(grouping: str = "all-layer", sample_rate: float = 0.25, sigma: float = 1.0, hidden: int = 6, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    private = make_private(
        model, opt, grouping=grouping, noise_multiplier=sigma, sample_rate=sample_rate, data_size=40,
        target_delta=1e-3, **kw,
    )  # fmt: skip
    return model, opt, private


def _train(model, opt, private, steps: int = 3) -> None:
    x, y = _batch(40, seed=3)
    for xb, yb in private.poisson_loader(TensorDataset(x, y), steps=steps):
        if len(yb):
            F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()


def _checkpoint(**kw) -> dict[str, Any]:
    model, opt, private = _run(**kw)
    _train(model, opt, private, 2)
    return copy.deepcopy(private.state_dict())


LOAD_CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "foo": (lambda: {"foo": 1}, r"Not a PrivateTraining checkpoint.*got \['foo'\].*private.state_dict\(\)"),
    "not-a-mapping": (lambda: [1, 2], "Not a PrivateTraining checkpoint.*got list"),
    "other-grouping": (lambda: _checkpoint(grouping="layer-wise"), r"groups \['0', '2'\] differ.*same grouping"),
    "other-sample-rate": (lambda: _checkpoint(sample_rate=0.5), r"'sample_rate': 0.5.*same settings"),
    "other-noise-multiplier": (lambda: _checkpoint(sigma=2.0), r"'noise_multiplier': 2.0.*same settings"),
    "other-architecture": (
        lambda: _checkpoint(hidden=7),
        r"model state does not fit.*0.weight: \(7, 5\) vs \(6, 5\).*same model architecture",
    ),
    "model-state-not-a-dict": (
        lambda: {**_checkpoint(), "model": None},
        "checkpoint's model state is a NoneType",
    ),
}


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("name", list(LOAD_CASES))
def test_load_state_dict_refuses_and_changes_nothing(name, adaptive):
    make_state, match = LOAD_CASES[name]
    state = make_state()
    settings = {"adaptive": AdaptiveClipping(count_noise_std=10.0)} if adaptive else {}
    model, opt, private = _run(**settings)
    _train(model, opt, private, 3)
    assert private.accountant.steps == 3 and private.steps == 3
    before = snapshot(model, opt, private)
    with pytest.raises(PrivacySetupError, match=match):
        private.load_state_dict(state)
    assert_same(before, snapshot(model, opt, private))
    # the run goes on: a good checkpoint of its own loads
    good = copy.deepcopy(private.state_dict())
    _train(model, opt, private, 1)
    private.load_state_dict(good)
    restored = snapshot(model, opt, private)
    restored["global"]["rng"] = before["global"]["rng"]  # the DataLoader of that step drew its base seed from it
    assert_same(before, restored)


def test_load_state_dict_refuses_a_sampler_state_without_a_loader():
    state = _checkpoint()
    model, opt, private = _run()
    before = snapshot(model, opt, private)
    with pytest.raises(PrivacySetupError, match=r"call poisson_loader\(\) before loading"):
        private.load_state_dict(state)
    assert_same(before, snapshot(model, opt, private))


# ---------------------------------------------------------------------- suspicious but legal: warnings
def test_noise_multiplier_zero_warns_no_privacy():
    model, opt = build()
    with pytest.warns(NoPrivacyWarning, match="not differentially private"):
        private = make_private(model, opt, **{**GOOD, "noise_multiplier": 0.0})
    assert private.noise_multiplier == 0.0 and private.epsilon() == 0.0  # nothing spent yet
    private.detach()


def test_delta_of_at_least_one_over_n_warns():
    model, opt = build()
    with pytest.warns(UserWarning, match=r"target_delta=0.0125 >= 1/N"):
        private = make_private(model, opt, **{**GOOD, "target_delta": 1 / 80})
    private.detach()


def test_the_snapshot_sees_what_make_private_attaches():
    """The comparison is not vacuous: a successful ``make_private`` changes what it watches (hooks, attributes),
    and so does one optimizer step (values, state)."""
    model, opt = build()
    before = snapshot(model, opt)
    private = make_private(model, opt, **GOOD)
    with pytest.raises(AssertionError, match=r"hooks|attributes|modules"):
        assert_same(before, snapshot(model, opt))
    private.detach()
    detached = snapshot(model, opt)
    x, y = _batch(seed=4)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(AssertionError, match=r"parameters|state"):
        assert_same(detached, snapshot(model, opt))
