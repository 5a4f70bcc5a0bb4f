"""``groupclip plan``: the grouping with the fewest groups whose predicted peak memory fits a budget.

The plan costs no training: one traced forward pass (:func:`groupclip.planning.trace_model`) and the
cost model's replay of the backward pass for each candidate. Candidates, fewest groups first: all-layer, ``M``
uniform blocks (balanced by parameter count in execution order, as ``grouping=M``), and non-uniform
contiguous blocks grown greedily in backward order, each block as large as the budget allows. Groups are
contiguous in execution order, so a group is complete (and clipped, its kept tensors freed) early in the
backward pass. Candidates that group the parameters the same way are listed once, under the first name.

Example::

    groupclip plan --model roberta-base --batch-size 8 --seq-len 128 --budget 2GiB --out plan.json
    groupclip bench --models roberta-base --grouping-file plan.json   # measure it
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..grouping import ResolvedGrouping
from .costmodel import ModelCost, NormMode, runtime_overhead_bytes, trace_model
from .workload import Workload

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS.update({"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40})


def parse_bytes(text: str | int) -> int:
    """``"2GiB"``, ``"1500MB"``, ``"2g"`` or a number of bytes -> bytes.

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"Expected a memory size like '2GiB', '1500MB' or a number of bytes; got {text!r}.")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class Candidate:
    label: str
    groups: int
    predicted_peak_bytes: int
    predicted_kept_bytes: int
    predicted_time_ratio: float
    fits: bool
    grouping: list[list[str]] = field(repr=False, default_factory=list)


@dataclass
class Plan:
    """The proposal: ``grouping`` (parameter names per group, execution order) and what it is predicted to cost.

    ``chosen`` is None when no candidate fits, not even param-wise; ``candidates`` lists what was considered.
    Predicted peaks are on the scale of ``measure`` (CPU: process RSS, the process overhead measured once
    in the planning process; CUDA: allocated tensor bytes).
    """

    budget_bytes: int
    batch_size: int
    measure: str
    overhead_bytes: int
    non_private_peak_bytes: int
    chosen: Candidate | None
    candidates: list[Candidate]

    def to_json(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "budget_bytes": self.budget_bytes,
            "batch_size": self.batch_size,
            "measure": self.measure,
            "overhead_bytes": self.overhead_bytes,
            "non_private_peak_bytes": self.non_private_peak_bytes,
            "chosen": None if chosen is None else chosen.label,
            "groups": None if chosen is None else chosen.groups,
            "predicted_peak_bytes": None if chosen is None else chosen.predicted_peak_bytes,
            "predicted_time_ratio": None if chosen is None else chosen.predicted_time_ratio,
            "grouping": None if chosen is None else chosen.grouping,
            "candidates": [{k: v for k, v in c.__dict__.items() if k != "grouping"} for c in self.candidates],
        }


def _as_lists(grouping: ResolvedGrouping) -> list[list[str]]:
    return [list(names) for names in grouping.groups.values()]


def _same_grouping(a: list[list[str]], b: list[list[str]]) -> bool:
    """Whether two groupings put the parameters into the same groups (group order aside)."""
    return {frozenset(g) for g in a} == {frozenset(g) for g in b}


def _candidate(
    cost: ModelCost, label: str, groups: list[list[str]], batch: int, mode: NormMode, overhead: int, budget: int
) -> Candidate:
    resolved = cost.grouping(groups)
    kept = cost.kept_bytes(resolved, batch, mode)
    extra = cost.kept_bytes(resolved, batch, mode, extra_only=True)
    peak = overhead + cost.base_peak_bytes(batch) + extra
    flops = cost.flops("layer-wise", batch, mode) / cost.flops("non-private", batch)
    return Candidate(label, len(groups), int(peak), int(kept), flops, peak <= budget, groups)


def greedy_blocks(cost: ModelCost, batch: int, mode: NormMode, limit_extra: int) -> list[list[str]]:
    """Contiguous blocks grown in backward order, each closed when the next parameter would push the kept
    bytes (beyond layer inputs) over ``limit_extra``; parameters not yet placed count as their own groups."""
    order = list(cost.execution_order)
    blocks: list[list[str]] = []
    current: list[str] = []
    for name in reversed(order):
        trial = [*blocks, [name, *current]]
        placed = {n for b in trial for n in b}
        rest = [[n] for n in order if n not in placed]
        if current and cost.kept_bytes(cost.grouping(trial + rest), batch, mode, extra_only=True) > limit_extra:
            blocks.append(current)
            current = [name]
        else:
            current = [name, *current]
    if current:
        blocks.append(current)
    return [list(b) for b in reversed(blocks)]


def plan_grouping(
    work: Workload,
    budget_bytes: int,
    mode: NormMode = "auto",
    measure: str = "cpu",
    optimizer_state_per_param: int = 0,
) -> Plan:
    """Propose the grouping with the fewest groups whose predicted peak fits ``budget_bytes``.

    Args:
        work: the model and a batch of the shape to plan for (its batch size is the plan's).
        budget_bytes: the memory budget, on the scale of ``measure``.
        mode: groupclip's norm mode.
        measure: ``"cpu"`` (peak RSS of a training process: the current process' RSS overhead beyond the
            parameters is added) or ``"cuda"`` (tensor bytes).
        optimizer_state_per_param: optimizer tensors per parameter (0: SGD, 1: momentum, 2: Adam).
    """
    batch = work.batch_size
    overhead = runtime_overhead_bytes(work) if measure == "cpu" else 0
    cost = trace_model(work, trace_batch=min(2, batch), optimizer_state_per_param=optimizer_state_per_param)
    candidates = [_candidate(cost, "all-layer", [list(cost.execution_order)], batch, mode, overhead, budget_bytes)]
    n_params = len(cost.execution_order)
    m = 2
    while m <= n_params and not any(c.fits for c in candidates):
        groups = _as_lists(cost.grouping(m))
        m = m + 1 if m < 8 else int(m * 1.5)
        if any(_same_grouping(c.grouping, groups) for c in candidates):
            continue
        candidates.append(
            _candidate(cost, f"{len(groups)} uniform blocks", groups, batch, mode, overhead, budget_bytes)
        )
    base = overhead + cost.base_peak_bytes(batch)
    blocks = greedy_blocks(cost, batch, mode, budget_bytes - base)
    if not any(_same_grouping(c.grouping, blocks) for c in candidates):  # e.g. one block: all-layer again
        candidates.append(
            _candidate(cost, f"{len(blocks)} non-uniform blocks", blocks, batch, mode, overhead, budget_bytes)
        )
    fitting = [c for c in candidates if c.fits]
    chosen = min(fitting, key=lambda c: (c.groups, c.predicted_peak_bytes)) if fitting else None
    return Plan(budget_bytes, batch, measure, overhead, base, chosen, candidates)


def render_plan(plan: Plan, model: str) -> str:
    lines = [
        f"plan for {model}, batch {plan.batch_size}, budget {plan.budget_bytes / 2**20:,.0f} MB ({plan.measure})",
        f"predicted non-private peak {plan.non_private_peak_bytes / 2**20:,.0f} MB",
        "",
        f"{'candidate':<28}{'groups':>7}{'predicted peak MB':>19}{'kept MB':>10}{'time x (FLOPs)':>16}  fits",
    ]
    for c in plan.candidates:
        lines.append(
            f"{c.label:<28}{c.groups:>7}{c.predicted_peak_bytes / 2**20:>19,.0f}"
            f"{c.predicted_kept_bytes / 2**20:>10,.0f}{c.predicted_time_ratio:>16.3f}  {'yes' if c.fits else 'no'}"
        )
    lines.append("")
    if plan.chosen is None:
        lines.append("No grouping fits the budget, not even one group per parameter: lower the batch size.")
    else:
        c = plan.chosen
        lines.append(
            f"proposed: {c.label} ({c.groups} groups), predicted peak {c.predicted_peak_bytes / 2**20:,.0f} MB"
        )
        for i, names in enumerate(c.grouping):
            lines.append(f"  group {i}: {names[0]} .. {names[-1]} ({len(names)} tensors)")
    return "\n".join(lines)
