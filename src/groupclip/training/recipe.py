"""Recipes: a training job as a small TOML file (name, task, data, model, privacy, clipping, optimizer, schedule).

    recipe = load_recipe("fashion-mnist-cnn")                       # a bundled recipe, or a path to a .toml file
    recipe = apply_overrides(recipe, ["clipping.grouping=layer-wise", "privacy.epsilon=8", "run.seed=1"])
    print(recipe_to_toml(recipe))                                    # the resolved recipe, as written to a run folder

Every field can be overridden with ``section.field=value``; values are parsed as TOML literals where they parse
(``8``, ``1e-5``, ``true``) and taken as strings otherwise (``layer-wise``); ``none`` (or ``null``) unsets a field
that may be unset (``privacy.noise_multiplier=none``). The ``data`` and ``model`` sections are free-form: their keys
are checked by the task that reads them. Values are range-checked when a recipe is built (``privacy.epsilon > 0``,
``schedule.batch_size >= 1``, a known ``clipping.clip_fn``, ...), so a bad value is an error naming the field before
any data is loaded.

The privacy budget is stated once: ``privacy.epsilon`` (a target; the noise multiplier is calibrated to reach it)
or ``privacy.noise_multiplier`` (fixed; epsilon is computed), never both. An override that sets one unsets the
other, so ``privacy.epsilon=8`` on a recipe with a fixed noise multiplier calibrates the noise for epsilon 8.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..adaptive import RESCALE_MODES
from ..errors import GroupClipError


class RecipeError(GroupClipError, ValueError):
    """A recipe file or override is malformed: names the file/key and what is expected."""


@dataclass
class PrivacyConfig:
    """Exactly one of ``epsilon`` and ``noise_multiplier`` is set: ``epsilon`` > 0 is a target (the noise multiplier
    is calibrated to reach it over the planned steps), ``noise_multiplier`` >= 0 is fixed (epsilon is computed). A
    recipe that gives neither (or unsets both) targets epsilon 3; one that gives ``noise_multiplier`` alone has
    ``epsilon = None``; one that gives both is an error. ``private = false`` trains the same model without DP
    (shuffled fixed-size batches, no clipping, no noise).

    ``noise_seed`` (unset by default): the noise is secret, its generator seeded from OS entropy -- NOT from
    ``run.seed``, which is written into the run folder. An int makes the noise reproducible: anyone who knows it
    can regenerate and subtract the noise, so a seeded run is for tests and debugging, not for a release
    (``final.json`` records ``"noise": "reproducible (seeded)"``)."""

    private: bool = True
    epsilon: float | None = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "rdp"
    noise_seed: int | None = None


@dataclass
class ClippingConfig:
    """``grouping``: all-layer | layer-wise | param-wise | an int M (M blocks in execution order).

    ``max_grad_norm`` is the total threshold R (each of M groups gets R/sqrt(M)); ``adaptive`` tracks the
    ``target_quantile`` of each group's norms (learning rate ``adaptive_lr``; ``adaptive_rescale``: auto | total |
    none, see :class:`groupclip.AdaptiveClipping`); ``clip_fn`` abadi | automatic."""

    grouping: str | int = "all-layer"
    clip_fn: str = "abadi"
    max_grad_norm: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    adaptive_lr: float = 0.2
    adaptive_rescale: str = "auto"
    automatic_gamma: float = 0.01
    norm_mode: str = "auto"


@dataclass
class OptimizerConfig:
    """``name``: sgd | adam | adamw."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """``batch_size`` is the expected (Poisson) batch size; ``physical_batch_size`` bounds memory (accumulation).

    ``lr_schedule``: constant | cosine | linear (decay to 0), after ``warmup_steps`` of linear warm-up.
    ``ema_decay`` > 0: evaluate an exponential moving average of the weights (post-processing: no privacy cost);
    the last iterate's metrics are recorded beside it as ``last_iterate_<metric>``."""

    epochs: float = 1.0
    batch_size: int = 256
    physical_batch_size: int = 256
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch (and always at the end)
    max_steps: int = 0  # > 0: stop early after this many steps (smoke runs); privacy is planned for the full run
    ema_decay: float = 0.0  # 0: off; e.g. 0.999


@dataclass
class RunConfig:
    """``seed`` seeds the model, the data order and the Poisson sampler (not the DP noise: ``privacy.noise_seed``).

    ``checkpoint_every``: steps between checkpoints in the run folder (0: once per epoch; -1: none);
    ``keep_checkpoint``: keep the last checkpoint when the run ends (it must then be kept private: it holds the
    noise generator's state); ``collective_timeout``: seconds a rank of a distributed launch waits on the others
    before it stops with an error (a dead or hung rank); it must exceed rank 0's longest evaluation."""

    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available); the run folder records the one used
    checkpoint_every: int = 0
    keep_checkpoint: bool = False
    collective_timeout: float = 600.0


@dataclass
class Recipe:
    name: str
    task: str
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    clipping: ClippingConfig = field(default_factory=ClippingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTIONS = {
    "privacy": PrivacyConfig,
    "clipping": ClippingConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "run": RunConfig,
}
_FREE_SECTIONS = ("data", "model")
# The two ways of stating a private run's budget: exactly one is set.
PRIVACY_BUDGET_FIELDS = ("privacy.epsilon", "privacy.noise_multiplier")
_TOP_LEVEL = ("name", "task", "description")


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``groupclip/recipes``."""
    folder = importlib.resources.files("groupclip") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A bundled recipe by name, or a recipe file by path."""
    if os.path.exists(name_or_path):
        source, text = name_or_path, open(name_or_path, encoding="utf-8").read()
    else:
        resource = importlib.resources.files("groupclip") / "recipes" / f"{name_or_path}.toml"
        if not resource.is_file():
            raise RecipeError(
                f"No recipe {name_or_path!r}: not a file, and not a bundled recipe ({', '.join(bundled_recipes())})."
            )
        source, text = f"recipes/{name_or_path}.toml", resource.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML ({exc}).") from exc
    return recipe_from_dict(raw, source)


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and type-check a recipe from its TOML table; unknown keys are errors that list the known ones."""
    known = set(_TOP_LEVEL) | set(_SECTIONS) | set(_FREE_SECTIONS)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown}; a recipe has {sorted(known)}.")
    for key in ("name", "task"):
        if not isinstance(raw.get(key), str):
            raise RecipeError(f"{source}: needs a string {key!r}.")
    kwargs: dict[str, Any] = {k: raw[k] for k in _TOP_LEVEL if k in raw}
    for section in _FREE_SECTIONS:
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: [{section}] must be a table.")
        kwargs[section] = dict(value)
    for section, cls in _SECTIONS.items():
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: [{section}] must be a table.")
        names = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - set(names))
        if bad:
            raise RecipeError(f"{source}: unknown key(s) {bad} in [{section}]; it has {sorted(names)}.")
        kwargs[section] = cls(**{k: _checked(f"{section}.{k}", names[k], v, source) for k, v in value.items()})
    _resolve_privacy_budget(kwargs["privacy"], raw.get("privacy", {}), source)
    recipe = Recipe(**kwargs)
    _check_ranges(recipe, source)
    return recipe


def _resolve_privacy_budget(privacy: PrivacyConfig, given: dict[str, Any], source: str) -> None:
    """Exactly one of ``epsilon`` (target) and ``noise_multiplier`` (fixed) states the budget of a private run."""
    epsilon, sigma = given.get("epsilon"), given.get("noise_multiplier")
    if epsilon is not None and sigma is not None:
        raise RecipeError(
            f"{source}: [privacy] sets both epsilon = {epsilon!r} and noise_multiplier = {sigma!r}; set exactly one: "
            "epsilon (a target: the noise multiplier is calibrated to reach it) or noise_multiplier (fixed: epsilon "
            "is computed)."
        )
    if sigma is not None and "epsilon" not in given:
        privacy.epsilon = None  # a fixed noise multiplier: the default target epsilon does not apply
    if privacy.epsilon is None and privacy.noise_multiplier is None:  # neither given, or both unset
        privacy.epsilon = PrivacyConfig.epsilon  # the default target


def _check_ranges(recipe: Recipe, source: str) -> None:
    """Range checks of the typed fields: an error names ``section.field``, the value given and what is allowed."""
    from ..clipping import get_clip_function
    from ..engine.settings import NORM_MODES
    from ..grouping import NAMED_GROUPINGS
    from ..privacy_plan import ACCOUNTANTS

    def fail(key: str, value: Any, expected: str) -> None:
        raise RecipeError(f"{source}: {key} = {value!r}: expected {expected}.")

    def number(key: str, value: Any, low: float, *, inclusive: bool = False, high: float | None = None) -> None:
        if value is None:
            return
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if high is not None:
            ok = ok and value < high
        if not ok:
            bound = f"in ({low:g}, {high:g})" if high is not None else f"{'>=' if inclusive else '>'} {low:g}"
            fail(key, value, f"a finite number {bound}")

    privacy, clipping, optimizer = recipe.privacy, recipe.clipping, recipe.optimizer
    schedule, run = recipe.schedule, recipe.run
    number("privacy.epsilon", privacy.epsilon, 0)
    number("privacy.noise_multiplier", privacy.noise_multiplier, 0, inclusive=True)
    number("privacy.delta", privacy.delta, 0, high=1)
    if privacy.accountant not in ACCOUNTANTS:
        fail("privacy.accountant", privacy.accountant, " or ".join(map(repr, ACCOUNTANTS)))
    grouping = clipping.grouping
    if isinstance(grouping, str) and grouping.isdigit():
        grouping = int(grouping)
    if isinstance(grouping, int) and grouping < 1:
        fail("clipping.grouping", clipping.grouping, "a number of blocks M >= 1")
    if isinstance(grouping, str) and grouping not in NAMED_GROUPINGS:
        fail("clipping.grouping", clipping.grouping, f"one of {', '.join(NAMED_GROUPINGS)}, or a number of blocks M")
    try:
        get_clip_function(clipping.clip_fn)
    except (ValueError, TypeError):
        fail(
            "clipping.clip_fn",
            clipping.clip_fn,
            "'abadi' or 'automatic' (or a name registered with groupclip.clipping.register_clip_function)",
        )
    number("clipping.max_grad_norm", clipping.max_grad_norm, 0)
    number("clipping.target_quantile", clipping.target_quantile, 0, high=1)
    number("clipping.adaptive_lr", clipping.adaptive_lr, 0)
    if clipping.adaptive_rescale not in RESCALE_MODES:
        fail("clipping.adaptive_rescale", clipping.adaptive_rescale, " or ".join(map(repr, RESCALE_MODES)))
    number("clipping.automatic_gamma", clipping.automatic_gamma, 0)
    if clipping.norm_mode not in NORM_MODES:
        fail("clipping.norm_mode", clipping.norm_mode, " or ".join(map(repr, NORM_MODES)))
    number("optimizer.lr", optimizer.lr, 0, inclusive=True)
    number("optimizer.momentum", optimizer.momentum, 0, inclusive=True)
    number("optimizer.weight_decay", optimizer.weight_decay, 0, inclusive=True)
    if len(optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in optimizer.betas):
        fail("optimizer.betas", optimizer.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    number("schedule.epochs", schedule.epochs, 0)
    if not 0 <= schedule.ema_decay < 1:
        fail("schedule.ema_decay", schedule.ema_decay, "a number in [0, 1) (0: no weight average; e.g. 0.999)")
    for key, value, low in (
        ("schedule.batch_size", schedule.batch_size, 1),
        ("schedule.physical_batch_size", schedule.physical_batch_size, 1),
        ("schedule.warmup_steps", schedule.warmup_steps, 0),
        ("schedule.eval_every", schedule.eval_every, 0),
        ("schedule.max_steps", schedule.max_steps, 0),
        ("run.threads", run.threads, 0),
        ("run.checkpoint_every", run.checkpoint_every, -1),
    ):
        if value < low:
            fail(key, value, f"a whole number >= {low}")
    number("run.collective_timeout", run.collective_timeout, 0)


def _checked(key: str, spec: dataclasses.Field, value: Any, source: str) -> Any:
    kind = str(spec.type)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "float | None": value is None or (isinstance(value, int | float) and not isinstance(value, bool)),
        "int | None": value is None or (isinstance(value, int) and not isinstance(value, bool)),
        "str | int": isinstance(value, str | int) and not isinstance(value, bool),
        "list[float]": isinstance(value, list) and all(isinstance(v, int | float) for v in value),
    }.get(kind, True)
    if not ok:
        raise RecipeError(f"{source}: {key} = {value!r} should be of type {kind}.")
    if kind in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_value(text: str) -> Any:
    """A TOML literal if ``text`` is one (``3``, ``1e-5``, ``true``, ``[1, 2]``), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: Recipe, overrides: list[str] | dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with ``section.field=value`` overrides applied (checked like the file itself)."""
    pairs = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    given: dict[str, Any] = {}
    for key, value in pairs:
        value = parse_value(value) if isinstance(value, str) else value
        if isinstance(value, str) and value.lower() in ("none", "null") and _may_be_unset(key):
            value = None
        given[key] = value
    raw = recipe_to_dict(recipe)
    budget = [key for key in PRIVACY_BUDGET_FIELDS if given.get(key) is not None]
    if len(budget) == 2:
        a, b = PRIVACY_BUDGET_FIELDS
        raise RecipeError(
            f"Overrides {a}={given[a]!r} and {b}={given[b]!r}: set one of them, not both (epsilon is a target that "
            "calibrates the noise multiplier; a fixed noise multiplier determines epsilon)."
        )
    if budget:  # setting one unsets the other, unless the overrides also name it
        other = next(key for key in PRIVACY_BUDGET_FIELDS if key != budget[0])
        given.setdefault(other, None)
    for key, value in given.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in _TOP_LEVEL:
            raw[parts[0]] = value
        elif len(parts) == 2 and parts[0] in raw and isinstance(raw[parts[0]], dict):
            if parts[0] in _SECTIONS and parts[1] not in {f.name for f in dataclasses.fields(_SECTIONS[parts[0]])}:
                fields = sorted(f.name for f in dataclasses.fields(_SECTIONS[parts[0]]))
                raise RecipeError(f"Override {key!r}: [{parts[0]}] has no field {parts[1]!r}; it has {fields}.")
            raw[parts[0]][parts[1]] = value
        else:
            sections = ", ".join([*_SECTIONS, *_FREE_SECTIONS])
            raise RecipeError(f"Override {key!r}: expected section.field with a section in ({sections}).")
    return recipe_from_dict(raw, "overrides")


def _may_be_unset(key: str) -> bool:
    """Whether the typed field ``section.field`` accepts None (``none`` / ``null`` in an override)."""
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])} if section in _SECTIONS else {}
    return name in fields and str(fields[name].type).endswith("| None")


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise RecipeError(f"Override {override!r}: expected section.field=value (e.g. clipping.grouping=layer-wise).")
    key, value = override.split("=", 1)
    return key.strip(), value.strip()


def parse_override(override: str) -> tuple[str, Any]:
    """``"section.field=value"`` -> ``("section.field", parsed value)`` (see :func:`parse_value`)."""
    key, value = _split(override)
    return key, parse_value(value)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


# Fields a resumed run may change: they do not affect what it computes.
RESUMABLE_CHANGES = frozenset({"run.checkpoint_every", "run.keep_checkpoint", "run.collective_timeout"})


def recipe_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(section.field, saved value, given value)]`` where two recipes (as :func:`recipe_to_dict`) differ."""
    out = []
    for key in sorted(set(saved) | set(given)):
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append((key, a, b))
    return out


def recipe_to_toml(recipe: Recipe, comments: dict[str, str] | None = None) -> str:
    """The resolved recipe as TOML (``None`` fields are left out, so they read back as their defaults; a recipe
    with a fixed noise multiplier reads back with ``epsilon = None``). ``comments`` maps ``section.field`` to a
    comment written after that field's value."""
    comments = comments or {}
    raw = recipe_to_dict(recipe)
    lines = [f"{k} = {_toml_value(raw[k])}" for k in _TOP_LEVEL]
    for section in (*_FREE_SECTIONS, *_SECTIONS):
        lines += ["", f"[{section}]"]
        for k, v in raw[section].items():
            if v is not None:
                note = comments.get(f"{section}.{k}")
                lines.append(f"{k} = {_toml_value(v)}" + (f"  # {' '.join(note.split())}" if note else ""))
    return "\n".join(lines) + "\n"


def privacy_budget_note(recipe: Recipe, data_size: int | None) -> tuple[str, str] | None:
    """``(section.field, note)``: which of ``privacy.epsilon`` / ``privacy.noise_multiplier`` states the budget of
    a private recipe, and what it implies for ``data_size`` training examples (None: not known yet): the calibrated
    noise multiplier of a target epsilon, or the epsilon a fixed noise multiplier gives after the planned steps.
    None for a non-private recipe. Raises the privacy plan's errors (an unreachable epsilon, a batch larger than
    the data)."""
    from ..accounting import compute_epsilon
    from ..privacy_plan import plan_privacy

    privacy, schedule = recipe.privacy, recipe.schedule
    if not privacy.private:
        return None
    if privacy.noise_multiplier is None:
        key = "privacy.epsilon"
        if data_size is None:
            return key, "target: the noise multiplier is calibrated to it when the training set is loaded"
    else:
        key = "privacy.noise_multiplier"
        if data_size is None:
            return key, "fixed: epsilon is computed from it when the training set is loaded"
    plan = plan_privacy(
        noise_multiplier=privacy.noise_multiplier,
        target_epsilon=privacy.epsilon if privacy.noise_multiplier is None else None,
        target_delta=privacy.delta,
        epochs=schedule.epochs,
        batch_size=schedule.batch_size,
        data_size=data_size,
        accountant=privacy.accountant,
    )
    steps = f"{plan.planned_steps} steps (sample rate {plan.sample_rate:.4g}, N = {data_size})"
    if key == "privacy.epsilon":
        return key, f"target: noise multiplier calibrated to {plan.noise_multiplier:.4g} over {steps}"
    eps = compute_epsilon(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, plan.delta, plan.accountant)
    return key, f"fixed: epsilon {eps:.4g} at delta {plan.delta:g} after {steps}, computed ({plan.accountant.upper()})"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
