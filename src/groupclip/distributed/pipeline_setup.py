"""Set-up of pipeline stages (:mod:`groupclip.distributed.pipeline`): local checks, the stages' groups, and the
cross-stage checks that every stage runs on the same gathered data, so that all raise together or none does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedSetupError
from ..grouping import _matcher, parameter_aliases, resolve_grouping, trainable_parameters
from ..privacy_plan import plan_privacy
from . import data_parallel as dp

PipelineGrouping = str | Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | Callable[[str, nn.Parameter], Any]

_LOCAL_NAMED = ("per-device", "layer-wise", "param-wise")


def locally(fn: Callable[[], None]) -> str | None:
    """Run a purely local set-up step; its error, as text, to be raised on every stage together."""
    try:
        fn()
    except Exception as err:  # every error becomes a DistributedSetupError on every stage
        return f"{type(err).__name__}: {err}"
    return None


def gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def raise_if_errors(errors: list[str | None], what: str) -> None:
    failed = {rank: e for rank, e in enumerate(errors) if e is not None}
    if failed:
        detail = "; ".join(f"stage {rank}: {e}" for rank, e in failed.items())
        raise DistributedSetupError(f"Pipeline {what} failed ({detail}); every stage stops.")


def prepare_stage(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int,
    world: int,
    stage_index: int,
    num_stages: int,
    grouping: PipelineGrouping,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    target_delta: float | None,
    epochs: float | None,
    steps: int | None,
    sample_rate: float | None,
    batch_size: int | None,
    data_size: int | None,
    accountant: str,
) -> dict[str, Any]:
    """Local validation and privacy calibration; the stage's groups (``layout``) for the cross-stage checks."""
    if num_stages != world or stage_index != rank:
        raise ValueError(
            f"Stage {stage_index} of {num_stages} runs on rank {rank} of a group of {world}: groupclip pipelines run "
            "one stage per process, stage i on rank i (single-stage schedules)."
        )
    dp.refuse_ddp_wrapper(module)
    trainable = trainable_parameters(module)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if held != {id(p) for p in trainable.values()}:
        raise ValueError(
            "The optimizer must hold exactly the stage module's trainable parameters "
            f"(missing: {[n for n, p in trainable.items() if id(p) not in held]}, "
            f"foreign: {len(held - {id(p) for p in trainable.values()})} tensor(s))."
        )
    plan = plan_privacy(
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
        steps=steps, sample_rate=sample_rate, batch_size=batch_size, data_size=data_size, accountant=accountant,
    )  # fmt: skip
    groups, matched = local_groups(module, grouping, stage_index)
    return {"plan": plan, "layout": {"names": list(trainable), "groups": groups, "matched": matched}}


def local_groups(
    module: nn.Module, spec: PipelineGrouping, stage_index: int
) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """This stage's ``{group: [parameter names]}`` and, for explicit groups, the (group, pattern) pairs it matched.

    Explicit patterns may match nothing here (their parameters live on another stage); unmatched parameters and
    patterns matching on no stage are caught across stages by :func:`check_layout`.
    """
    params = trainable_parameters(module)
    if not params:
        raise ValueError(f"Stage {stage_index}'s module has no trainable parameters.")
    if isinstance(spec, str):
        if spec == "per-device":
            return {f"stage{stage_index}": list(params)}, []
        if spec == "all-layer":
            return {"all": list(params)}, []
        if spec in _LOCAL_NAMED:
            return {g: list(ns) for g, ns in resolve_grouping(module, spec).groups.items()}, []
        raise ValueError(
            f"Unknown pipeline grouping {spec!r}; expected 'per-device', 'all-layer', 'layer-wise', 'param-wise', "
            "explicit patterns or a callable (name, param) -> group."
        )
    if isinstance(spec, int | bool):
        raise ValueError(
            f"grouping={spec!r} (blocks in execution order) is not supported across pipeline stages; give explicit "
            "groups, each within one stage."
        )
    if callable(spec):
        groups: dict[str, list[str]] = {}
        for name, p in params.items():
            groups.setdefault(str(spec(name, p)), []).append(name)
        return groups, []
    items = list(spec.items()) if isinstance(spec, Mapping) else [(f"group{i}", pats) for i, pats in enumerate(spec)]
    aliases = parameter_aliases(module)
    groups, matched, where = {}, [], {}
    for group_name, patterns in items:
        if isinstance(patterns, str):
            raise ValueError(f"Group {group_name!r} must be a list of name patterns, got the string {patterns!r}.")
        for pattern in patterns:
            match = _matcher(pattern)
            hits = [n for n, p in params.items() if any(match(a) for a in aliases[id(p)])]
            if hits:
                matched.append((str(group_name), pattern))
            for name in hits:
                where.setdefault(name, [])
                if str(group_name) not in where[name]:
                    where[name].append(str(group_name))
                    groups.setdefault(str(group_name), []).append(name)
    missing = [n for n in params if n not in where]
    several = {n: gs for n, gs in where.items() if len(gs) > 1}
    if missing or several:
        raise ValueError(
            f"Every trainable parameter of stage {stage_index} must be in exactly one group; in no group: {missing}; "
            f"in several: {several}."
        )
    return groups, matched


def check_layout(layouts: list[dict[str, Any]], spec: PipelineGrouping, all_layer: bool) -> list[str]:
    """Cross-stage checks on the gathered layouts (the same on every stage, so all raise together); global groups."""
    owners: dict[str, list[int]] = {}
    for stage, layout in enumerate(layouts):
        for name in layout["names"]:
            owners.setdefault(name, []).append(stage)
    shared = {n: s for n, s in owners.items() if len(s) > 1}
    if shared:
        listed = ", ".join(f"{n!r} on stages {s}" for n, s in list(shared.items())[:5])
        raise DistributedSetupError(
            f"Parameter names appear on several pipeline stages ({listed}{' ...' if len(shared) > 5 else ''}). A "
            "parameter present on two stages (e.g. tied embeddings on the first and last stage) gets gradient from "
            "both, so no stage can clip it alone: untie it or keep its uses on one stage. If these are different "
            "parameters, give the stages distinct names (keep the full model's names)."
        )
    group_stages: dict[str, list[int]] = {}
    for stage, layout in enumerate(layouts):
        for g in layout["groups"]:
            group_stages.setdefault(g, []).append(stage)
    if not all_layer:
        split = {g: s for g, s in group_stages.items() if len(s) > 1}
        if split:
            detail = "; ".join(
                f"group {g!r} holds " + ", ".join(f"{layouts[s]['groups'][g][:3]} on stage {s}" for s in stages)
                for g, stages in split.items()
            )
            raise DistributedSetupError(
                f"Groups span pipeline stages ({detail}). A stage clips only groups whose parameters are all its "
                "own; use grouping='all-layer' for one group across every stage, or split the group by stage."
            )
    if not isinstance(spec, str) and not callable(spec):  # explicit patterns
        wanted = (
            [(str(g), p) for g, pats in spec.items() for p in pats]
            if isinstance(spec, Mapping)
            else [(f"group{i}", p) for i, pats in enumerate(spec) for p in pats]
        )
        found = {tuple(m) for layout in layouts for m in layout["matched"]}
        unmatched = [f"{g}: {p!r}" for g, p in wanted if (g, p) not in found]
        if unmatched:
            raise DistributedSetupError(
                f"These patterns match no trainable parameter on any stage: {', '.join(unmatched)}."
            )
    return list(group_stages)


def stage_seed(seed: int, stage_index: int) -> int:
    """Independent noise seeds per stage, from the shared seed (equal seeds would correlate the stages' noise)."""
    state = np.random.SeedSequence([seed & (2**63 - 1), stage_index, 0x70697065]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
