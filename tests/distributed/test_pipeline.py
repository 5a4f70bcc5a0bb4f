"""Pipeline DP (groupclip.distributed.pipeline) on 2 gloo processes equals one process with the same groups."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from spawn import run_ranks
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

from groupclip import ClippingEngine
from groupclip.distributed.pipeline import fixed_size_chunks, make_private_pipeline

ROWS, MICRO, DATA = 8, 4, 32
STAGE_LAYERS = (("0", "1", "2"), ("3", "4", "5"))
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def _full(seed: int = 0) -> nn.Sequential:
    """The whole model; its children keep these names in the stages (stage 0: 0-2, stage 1: 3-5)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(layers))).double()


def _stage(full: nn.Sequential, stage: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict((k, full._modules[k]) for k in STAGE_LAYERS[stage]))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(ROWS, 6, generator=gen, dtype=torch.float64) * 3, torch.randint(0, 3, (ROWS,), generator=gen))
        for _ in range(2)
    ]


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target, reduction="sum", ignore_index=-100)


def _pipeline_run(rank: int, grouping, schedule: str, max_grad_norm) -> dict:
    """Two DP steps (noise 0) of the 2-stage pipeline; this stage's gradients and parameters.

    ``schedule`` "<name>-static" gives the stage its input and output shapes (no shape inference run).
    """
    module = _stage(_full(), rank)
    shapes = {}
    if schedule.endswith("-static"):
        schedule, rows = schedule.removesuffix("-static"), ROWS // MICRO
        shapes["input_args"] = torch.zeros(rows, (6, 8)[rank], dtype=torch.float64).requires_grad_(rank == 1)
        shapes["output_args"] = torch.zeros(rows, (8, 3)[rank], dtype=torch.float64).requires_grad_()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    private = make_private_pipeline(
        module,
        optimizer,
        stage_index=rank,
        num_stages=2,
        grouping=grouping,
        max_grad_norm=max_grad_norm,
        noise_multiplier=0.0,
        sample_rate=ROWS / DATA,
        data_size=DATA,
        seed=3,
        **shapes,
    )
    try:
        sched = private.schedule(SCHEDULES[schedule], n_microbatches=MICRO, loss_fn=_loss)
        grads = []
        for x, y in _batches():
            sched.step(x) if rank == 0 else sched.step(target=y)
            optimizer.step()
            grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
            optimizer.zero_grad()
        return {
            "grads": grads,
            "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "communication": dict(private.communication),
            "sensitivity": private.sensitivity,
            "epsilon_steps": private.accountant.steps,
        }
    finally:
        private.detach()


def _pipeline_configs(rank: int, world: int, configs: list) -> list[dict]:
    return [_pipeline_run(rank, *config) for config in configs]


def _reference(grouping, max_grad_norm) -> dict:
    """One process, the unsplit model, the same microbatches; the same steps."""
    full = _full()
    optimizer = torch.optim.SGD(full.parameters(), lr=0.5, momentum=0.9)
    grads = []
    with ClippingEngine(full, grouping=grouping, max_grad_norm=max_grad_norm, loss_reduction="sum"):
        for x, y in _batches():
            for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
                _loss(full(xs), ys).backward()
            for p in full.parameters():
                p.grad.div_(ROWS)  # the expected batch size q N
            optimizer.step()
            grads.append({n: p.grad.clone() for n, p in full.named_parameters()})
            optimizer.zero_grad()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in full.named_parameters()}}


def _close(got: dict, want: dict, rel: float = 1e-6) -> None:
    for name, value in got.items():
        scale = want[name].abs().max().clamp_min(1e-12)
        assert ((value - want[name]).abs().max() / scale) < rel, name


BY_STAGE = {"stage0": ["0.*", "2.*"], "stage1": ["3.*", "5.*"]}
CASES = [
    ("per-device", "gpipe", {"stage0": 0.3, "stage1": 0.4}, BY_STAGE, {"stage0": 0.3, "stage1": 0.4}),
    ("per-device", "1f1b", 0.5, BY_STAGE, 0.5),
    ("all-layer", "gpipe", 0.5, "all-layer", 0.5),
    ("all-layer", "1f1b", 0.5, "all-layer", 0.5),
    ("layer-wise", "gpipe", 0.5, "layer-wise", 0.5),  # any grouping whose groups lie within stages: R / sqrt(4)
    ("all-layer", "1f1b-static", 0.5, "all-layer", 0.5),
]


@pytest.mark.slow
def test_two_stages_equal_one_process_with_the_same_groups():
    configs = [(grouping, schedule, r) for grouping, schedule, r, _, _ in CASES]
    stages = run_ranks(_pipeline_configs, 2, (configs,), timeout=150)
    for k, (grouping, _, r, ref_grouping, ref_r) in enumerate(CASES):
        want = _reference(ref_grouping, ref_r)
        for stage in stages:
            got = stage[k]
            for step_got, step_want in zip(got["grads"], want["grads"], strict=True):
                _close(step_got, step_want)
            _close(got["params"], want["params"])
            assert got["epsilon_steps"] == 2
            # groupclip's own traffic per step: none for groups within stages; all-layer a 1-value flag (float64)
            # at the step, a 4-value header and the squared norms of the step's 8 samples.
            expected = 2 * (8 + 32 + ROWS * 8) if grouping == "all-layer" else 0
            assert got["communication"]["bytes"] == expected
        expected_s = math.sqrt(sum(v * v for v in r.values())) if isinstance(r, dict) else r
        assert stages[0][k]["sensitivity"] == stages[1][k]["sensitivity"] == pytest.approx(expected_s)
    # the thresholds are active (otherwise the comparison would not test clipping)
    with ClippingEngine(_full(), grouping="all-layer", max_grad_norm=0.5, loss_reduction="sum") as engine:
        x, y = _batches()[0]
        _loss(engine.model(x), y).backward()
        assert bool((engine.last_report.clip_factors["all"] < 1).any())


def test_fixed_size_chunks_pad_and_never_drop():
    chunks = fixed_size_chunks(torch.arange(5), 2, fill=-1)
    assert [c.tolist() for c in chunks] == [[0, 1], [2, 3], [4, -1]]
    assert [c.tolist() for c in fixed_size_chunks(torch.zeros(0, dtype=torch.long), 3, fill=-1)] == [[-1, -1, -1]]


def _noise_run(rank: int, world: int, steps: int) -> dict:
    """Noise alone: optimizer steps without a backward (clipped sums 0), lr 0; the noise each step added."""
    module = _stage(_full(), rank)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    private = make_private_pipeline(
        module,
        optimizer,
        stage_index=rank,
        num_stages=2,
        grouping="per-device",
        max_grad_norm={"stage0": 1.0, "stage1": 1.0},  # S^2 = 2, each stage's own R^2 = 1
        noise_multiplier=2.0,
        sample_rate=ROWS / DATA,
        data_size=DATA,
        seed=11,
    )
    try:
        noise = []
        for _ in range(steps):
            optimizer.step()
            noise.append(torch.cat([p.grad.flatten() * ROWS for p in module.parameters()]))
            optimizer.zero_grad()
        return {"noise": torch.cat(noise), "epsilon": private.epsilon(), "std": private.last_metrics["noise_std"]}
    finally:
        private.detach()


@pytest.mark.slow
def test_each_stage_adds_noise_of_the_global_sensitivity_independently():
    stages = run_ranks(_noise_run, 2, (30,), timeout=120)
    sigma, s2 = 2.0, 2.0
    for stage in stages:
        assert stage["std"] == pytest.approx(sigma * math.sqrt(s2))
        var = float(stage["noise"].var())
        assert var == pytest.approx(sigma**2 * s2, rel=0.15), var  # not sigma^2 R_k^2 = 4 (local sensitivity)
        assert abs(float(stage["noise"].mean())) < 0.25
    a, b = stages[0]["noise"], stages[1]["noise"]
    n = min(a.numel(), b.numel())
    corr = float(torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1])
    assert abs(corr) < 0.1, corr  # independent draws per stage (a shared seed would give corr 1)
    assert stages[0]["epsilon"] == stages[1]["epsilon"] > 0


def _setup_error(rank: int, case: str) -> str:
    full = _full()
    module = _stage(full, rank)
    kwargs = {
        "stage_index": rank,
        "num_stages": 2,
        "grouping": "per-device",
        "noise_multiplier": 1.0,
        "sample_rate": ROWS / DATA,
        "data_size": DATA,
        "seed": 1,
    }
    if case == "group across stages":
        kwargs["grouping"] = {"mixed": ["0.*", "3.*"], "rest": ["2.*", "5.*"]}
    elif case == "parameter on two stages":
        module = nn.Sequential(*module.children())  # re-indexed: stage 1's "0.weight" is stage 0's name too
    elif case == "privacy settings differ":
        kwargs.update(noise_multiplier=1.0 + rank, sample_rate=(ROWS + rank) / DATA, target_delta=1e-3 * (1 + rank))
        kwargs["clip_fn"] = "abadi" if rank == 0 else "automatic"
    elif case == "bad argument on one stage":
        kwargs["data_size"] = DATA if rank == 0 else 0
    elif case == "pattern matches nothing":
        kwargs["grouping"] = {"a": ["0.*", "2.*"], "b": ["3.*", "5.*", "9.*"]}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    try:
        private = make_private_pipeline(module, optimizer, **kwargs)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    private.detach()
    return "ok"


def _setup_errors(rank: int, world: int, cases: list[str]) -> dict[str, str]:
    return {case: _setup_error(rank, case) for case in cases}


ERROR_CASES = {
    "group across stages": ["group 'mixed'", "stage 0", "stage 1", "grouping='all-layer'"],
    "parameter on two stages": ["'0.weight' on stages [0, 1]"],
    "privacy settings differ": ["noise_multiplier", "sample_rate", "clip_fn", "delta"],
    "bad argument on one stage": ["stage 1: PrivacySetupError", "data_size"],
    "pattern matches nothing": ["'9.*'"],
}


@pytest.mark.slow
def test_bad_setups_fail_on_every_stage():
    stages = run_ranks(_setup_errors, 2, (list(ERROR_CASES),), timeout=120)
    for case, fragments in ERROR_CASES.items():
        for stage in stages:
            assert stage[case].startswith("DistributedSetupError"), (case, stage[case])
            for fragment in fragments:
                assert fragment in stage[case], (case, fragment, stage[case])
        assert stages[0][case] == stages[1][case]  # the same message everywhere


def _runtime_error(rank: int, case: str, grouping: str) -> dict:
    module = _stage(_full(), rank)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    private = make_private_pipeline(
        module,
        optimizer,
        stage_index=rank,
        num_stages=2,
        grouping=grouping,
        noise_multiplier=1.0,
        sample_rate=ROWS / DATA,
        data_size=DATA,
        seed=1,
    )
    try:
        x, y = _batches()[0]
        if case == "scale_grads":
            sched = ScheduleGPipe(private.stage, MICRO, loss_fn=_loss)  # scale_grads=True by default
        else:
            sched = private.schedule(ScheduleGPipe, n_microbatches=MICRO, loss_fn=_loss)
            x = x.clone()
            x[1, 0] = float("nan")  # one sample of one microbatch
        outcome = "ok"
        try:
            sched.step(x) if rank == 0 else sched.step(target=y)
            optimizer.step()
        except Exception as err:
            outcome = f"{type(err).__name__}: {err}"
        finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
        return {"outcome": outcome, "steps": private.accountant.steps, "finite": finite}
    finally:
        private.detach()


def _runtime_errors(rank: int, world: int, cases: list) -> list[dict]:
    return [_runtime_error(rank, *case) for case in cases]


@pytest.mark.slow
def test_runtime_refusals_happen_on_every_stage_together_non_finite_samples_are_dropped():
    cases = [("scale_grads", "per-device"), ("nan", "per-device"), ("nan", "all-layer")]
    stages = run_ranks(_runtime_errors, 2, (cases,), timeout=120)
    for k, (case, _) in enumerate(cases):
        for stage in stages:
            outcome = stage[k]["outcome"]
            if case == "scale_grads":
                assert outcome.startswith("DistributedSetupError") and "scale_grads=False" in outcome
                assert stage[k]["steps"] == 0  # the accountant recorded nothing
            else:  # the sample is dropped on every stage; the step is taken and charged
                assert outcome == "ok" and stage[k]["finite"] and stage[k]["steps"] == 1
