"""Small modules with one job each: no module over 500 lines and no class over 300 lines in ``src/``."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    modules, classes = {}, {}
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(SOURCE))
        modules[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return modules, classes


def test_no_module_over_500_lines():
    modules, _ = _sizes()
    assert modules, "no sources found"
    assert {n: k for n, k in modules.items() if k > MAX_MODULE_LINES} == {}


def test_no_class_over_300_lines():
    _, classes = _sizes()
    assert classes, "no classes found"
    assert {n: k for n, k in classes.items() if k > MAX_CLASS_LINES} == {}
