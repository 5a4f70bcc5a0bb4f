"""The core never imports distributed, training, integration, audit or benchmark code.

Read from the source (every ``import`` and ``from ... import`` statement, also inside functions and ``TYPE_CHECKING``
blocks), so a lazy import in a function body cannot slip past the way it would slip past ``sys.modules`` checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "groupclip"
CORE = [
    "engine",
    "norms",
    "dataflow",
    "grouping.py",
    "clipping.py",
    "noise.py",
    "sampling.py",
    "accounting.py",
    "adaptive.py",
    "private.py",
    "privacy_plan.py",
    "topology.py",
    "metrics.py",
    "setup_checks.py",
    "gradient_guard.py",
    "errors.py",
]
FORBIDDEN = ("distributed", "training", "integrations", "audit", "bench", "planning", "cli")


def _core_files() -> list[Path]:
    files = []
    for entry in CORE:
        path = PACKAGE / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _package_of(path: Path) -> tuple[str, ...]:
    """("groupclip", "engine") for engine/x.py and for engine/__init__.py."""
    return path.relative_to(PACKAGE.parent).parts[:-1]


def _imported_modules(source: str, package: tuple[str, ...]) -> list[str]:
    """Absolute dotted names of every module ``source`` imports (relative imports resolved against ``package``)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)  # `from . import distributed`
    return names


def _violations(source: str, package: tuple[str, ...]) -> list[str]:
    bad = []
    for name in _imported_modules(source, package):
        parts = name.split(".")
        if parts[0] == "benchmarks" or (parts[0] == "groupclip" and len(parts) > 1 and parts[1] in FORBIDDEN):
            bad.append(name)
    return bad


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_imports_no_outer_layer(path):
    found = _violations(path.read_text(), _package_of(path))
    assert not found, f"{path.relative_to(PACKAGE)} imports {found}: the core must not"


def test_the_check_sees_relative_and_lazy_imports():
    # The checker itself must catch what it is for: relative, absolute and in-function imports.
    source = "from ..distributed import x\nimport groupclip.training\ndef f():\n    from .. import audit\n"
    found = _violations(source, ("groupclip", "engine"))
    assert found == ["groupclip.distributed", "groupclip.distributed.x", "groupclip.training", "groupclip.audit"]
    assert _violations("from .norms import x\nimport torch\n", ("groupclip",)) == []
