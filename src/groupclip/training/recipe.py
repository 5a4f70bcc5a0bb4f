"""Recipes: a training job as a small TOML file (name, task, data, model, privacy, clipping, optimizer, schedule).

    recipe = load_recipe("fashion-mnist-cnn")                       # a bundled recipe, or a path to a .toml file
    recipe = apply_overrides(recipe, ["clipping.grouping=layer-wise", "privacy.epsilon=8", "run.seed=1"])
    print(recipe_to_toml(recipe))                                    # the resolved recipe, as written to a run folder

Every field can be overridden with ``section.field=value``; values are parsed as TOML literals where they parse
(``8``, ``1e-5``, ``true``) and taken as strings otherwise (``layer-wise``). The ``data`` and ``model`` sections
are free-form: their keys are checked by the task that reads them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import GroupClipError


class RecipeError(GroupClipError, ValueError):
    """A recipe file or override is malformed: names the file/key and what is expected."""


@dataclass
class PrivacyConfig:
    """``epsilon`` > 0 calibrates the noise multiplier (unless ``noise_multiplier`` is given); ``private = false``
    trains the same model without DP (shuffled fixed-size batches, no clipping, no noise).

    ``noise_seed`` (unset by default): the noise is secret, its generator seeded from OS entropy -- NOT from
    ``run.seed``, which is written into the run folder. An int makes the noise reproducible: anyone who knows it
    can regenerate and subtract the noise, so a seeded run is for tests and debugging, not for a release
    (``final.json`` records ``"noise": "reproducible (seeded)"``)."""

    private: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "rdp"
    noise_seed: int | None = None


@dataclass
class ClippingConfig:
    """``grouping``: all-layer | layer-wise | param-wise | an int M (M blocks in execution order).

    ``max_grad_norm`` is the total threshold R (each of M groups gets R/sqrt(M)); ``adaptive`` tracks the
    ``target_quantile`` of each group's norms (learning rate ``adaptive_lr``); ``clip_fn`` abadi | automatic."""

    grouping: str | int = "all-layer"
    clip_fn: str = "abadi"
    max_grad_norm: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    adaptive_lr: float = 0.2
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

    ``lr_schedule``: constant | cosine | linear (decay to 0), after ``warmup_steps`` of linear warm-up."""

    epochs: float = 1.0
    batch_size: int = 256
    physical_batch_size: int = 256
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch (and always at the end)
    max_steps: int = 0  # > 0: stop early after this many steps (smoke runs); privacy is planned for the full run


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
    return Recipe(**kwargs)


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
    if kind == "float" and isinstance(value, int):
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
    raw = recipe_to_dict(recipe)
    for key, value in pairs:
        value = parse_value(value) if isinstance(value, str) else value
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


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (``None`` fields are left out, so they read back as their defaults)."""
    raw = recipe_to_dict(recipe)
    lines = [f"{k} = {_toml_value(raw[k])}" for k in _TOP_LEVEL]
    for section in (*_FREE_SECTIONS, *_SECTIONS):
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in raw[section].items() if v is not None]
    return "\n".join(lines) + "\n"


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
