"""Which trainable parameters are clipped together.

A grouping spec is one of:

* ``"all-layer"`` -- one group (flat clipping);
* ``"layer-wise"`` -- one group per module that owns parameters (a shared parameter joins its first owner);
* ``"param-wise"`` -- one group per parameter tensor;
* ``"per-device"`` -- one group per device the parameters live on (pipeline stages);
* an ``int`` M -- M contiguous blocks in execution order, balanced by parameter count;
* explicit groups -- a list of lists of name patterns, or a mapping ``group name -> patterns``. Patterns are
  ``fnmatch`` globs (``"encoder.layer.[0-5].*"``) or regular expressions prefixed ``"re:"``;
* a callable ``(name, param) -> key``.

Every trainable parameter must land in exactly one group; otherwise :class:`~groupclip.errors.GroupingError`
names the offenders. Frozen parameters (``requires_grad=False``) are never grouped.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import GroupingError

GroupingSpec = (
    str | int | Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | Callable[[str, nn.Parameter], Hashable]
)

NAMED_GROUPINGS = ("all-layer", "layer-wise", "param-wise", "per-device")


@dataclass(frozen=True)
class ResolvedGrouping:
    """The groups: ordered ``group name -> parameter names`` (canonical names from ``named_parameters``)."""

    spec: str
    groups: dict[str, tuple[str, ...]]

    def group_of(self) -> dict[str, str]:
        return {name: group for group, names in self.groups.items() for name in names}

    def describe(self, model: nn.Module, thresholds: Mapping[str, float] | None = None) -> str:
        """A human-readable table of groups, their parameters, sizes and thresholds."""
        params = dict(model.named_parameters())
        lines = [f"grouping {self.spec}: {len(self.groups)} group(s)"]
        for group, names in self.groups.items():
            size = sum(params[n].numel() for n in names)
            limit = f", R={thresholds[group]:.4g}" if thresholds else ""
            lines.append(f"  [{group}] {len(names)} tensor(s), {size:,} parameters{limit}")
            lines.extend(f"      {n} {tuple(params[n].shape)}" for n in names)
        return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter, for trainable parameters (each shared parameter once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(param) -> every name it is registered under`` (tied parameters have several)."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    return aliases


def needs_execution_order(spec: GroupingSpec) -> bool:
    """Whether the spec can only be resolved after seeing the order in which parameters are used."""
    return isinstance(spec, int) and not isinstance(spec, bool)


def resolve_grouping(
    model: nn.Module, spec: GroupingSpec, execution_order: Sequence[str] | None = None
) -> ResolvedGrouping:
    """Resolve ``spec`` against ``model``'s trainable parameters.

    Args:
        model: the model.
        spec: a grouping spec (see the module docstring).
        execution_order: canonical parameter names in the order the forward pass first used them; needed for
            an ``int`` spec. Parameters it does not list go last, in registration order.

    Raises:
        GroupingError: the spec is malformed, or leaves parameters out / puts one in two groups.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> resolve_grouping(model, "layer-wise").groups
        {'0': ('0.weight', '0.bias'), '1': ('1.weight', '1.bias')}
    """
    params = trainable_parameters(model)
    if not params:
        raise GroupingError("The model has no trainable parameters (all have requires_grad=False).")
    names = list(params)
    if isinstance(spec, str):
        groups = _named(model, spec, params)
        label = spec
    elif needs_execution_order(spec):
        groups = _blocks(spec, params, execution_order)
        label = f"{spec} blocks"
    elif callable(spec):
        groups = {}
        for name, p in params.items():
            groups.setdefault(str(spec(name, p)), []).append(name)
        label = f"callable {getattr(spec, '__name__', type(spec).__name__)}"
    elif isinstance(spec, Mapping | Sequence):
        groups = _explicit(model, spec, params)
        label = "explicit"
    else:
        raise GroupingError(
            f"Unknown grouping {spec!r}; expected one of {NAMED_GROUPINGS}, an int, patterns "
            "or a callable (name, param) -> key."
        )
    _validate_partition(groups, names)
    return ResolvedGrouping(label, {g: tuple(ns) for g, ns in groups.items()})


def _named(model: nn.Module, spec: str, params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    if spec == "all-layer":
        return {"all": list(params)}
    if spec == "param-wise":
        return {name: [name] for name in params}
    if spec == "per-device":
        groups: dict[str, list[str]] = {}
        for name, p in params.items():
            groups.setdefault(str(p.device), []).append(name)
        return groups
    if spec == "layer-wise":
        groups = {}
        for name in params:
            owner = name.rpartition(".")[0] or "<root>"
            groups.setdefault(owner, []).append(name)
        return groups
    raise GroupingError(
        f"Unknown grouping {spec!r}; expected one of {NAMED_GROUPINGS}, an int, patterns or a "
        "callable (name, param) -> key."
    )


def balanced_contiguous_split(sizes: Sequence[int], parts: int) -> list[int]:
    """Boundaries splitting ``sizes`` into ``parts`` contiguous non-empty blocks minimising the largest block sum.

    Returns the start index of every block after the first.
    """
    n = len(sizes)
    if not 1 <= parts <= n:
        raise GroupingError(
            f"Cannot split {n} parameter tensor(s) into {parts} non-empty blocks; "
            f"use an int grouping between 1 and {n}."
        )

    def cuts_for(limit: int) -> list[int] | None:
        cuts, load = [], 0
        for i, s in enumerate(sizes):
            # Leave at least one tensor for each block still to come.
            if load and (load + s > limit or n - i == parts - 1 - len(cuts)):
                cuts.append(i)
                load = 0
            load += s
            if load > limit:
                return None
        return cuts if len(cuts) <= parts - 1 else None

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts_for(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = cuts_for(lo) or []
    # Split further (at the largest blocks) until there are exactly `parts` blocks.
    while len(cuts) < parts - 1:
        bounds = [0, *cuts, n]
        spans = [(sum(sizes[a:b]), a, b) for a, b in itertools.pairwise(bounds) if b - a > 1]
        _, a, b = max(spans)
        half, best = sum(sizes[a:b]) / 2, a + 1
        for k in range(a + 1, b):
            if abs(sum(sizes[a:k]) - half) < abs(sum(sizes[a:best]) - half):
                best = k
        cuts = sorted([*cuts, best])
    return cuts


def _blocks(parts: int, params: dict[str, nn.Parameter], order: Sequence[str] | None) -> dict[str, list[str]]:
    if order is None:
        raise GroupingError(
            "An int grouping needs the execution order: run one forward pass with the engine "
            "attached (or call engine.resolve_grouping(*example_inputs)) before reading groups."
        )
    seen = [n for n in order if n in params]
    ordered = seen + [n for n in params if n not in set(seen)]
    cuts = balanced_contiguous_split([params[n].numel() for n in ordered], parts)
    bounds = [0, *cuts, len(ordered)]
    return {f"block{k}": ordered[a:b] for k, (a, b) in enumerate(itertools.pairwise(bounds))}


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _explicit(model: nn.Module, spec, params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    items = list(spec.items()) if isinstance(spec, Mapping) else [(f"group{i}", pats) for i, pats in enumerate(spec)]
    aliases = parameter_aliases(model)
    groups: dict[str, list[str]] = {}
    unmatched_patterns = []
    for group, patterns in items:
        if isinstance(patterns, str):
            raise GroupingError(
                f"Group {group!r} must be a list of name patterns, got the string {patterns!r} (write [{patterns!r}])."
            )
        members = []
        for pattern in patterns:
            match = _matcher(pattern)
            hits = [n for n, p in params.items() if any(match(a) for a in aliases[id(p)])]
            if not hits:
                unmatched_patterns.append(f"{group}: {pattern!r}")
            members.extend(h for h in hits if h not in members)
        groups[str(group)] = members
    if unmatched_patterns:
        raise GroupingError(
            "These patterns match no trainable parameter: "
            + ", ".join(unmatched_patterns)
            + f". Trainable parameters are: {list(params)}."
        )
    return groups


def _validate_partition(groups: Mapping[str, Sequence[str]], names: Sequence[str]) -> None:
    count: dict[str, list[str]] = {}
    for group, members in groups.items():
        for name in members:
            count.setdefault(name, []).append(group)
    missing = [n for n in names if n not in count]
    duplicated = {n: gs for n, gs in count.items() if len(gs) > 1}
    if missing or duplicated:
        parts = []
        if missing:
            parts.append(f"in no group: {missing}")
        if duplicated:
            parts.append("in several groups: " + ", ".join(f"{n} -> {gs}" for n, gs in duplicated.items()))
        raise GroupingError(
            "Every trainable parameter must be in exactly one group; "
            + "; ".join(parts)
            + ". Add a catch-all pattern or fix the overlapping patterns."
        )
    empty = [g for g, members in groups.items() if not members]
    if empty:
        raise GroupingError(f"Groups {empty} contain no trainable parameter.")
