"""``benchmarks/overhead_floor.py``: the scaffolding it times must leave training unchanged, and it reports every row.

Structure only: no timing is asserted (a shared CI machine's timings are noise).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def floor():
    sys.path.insert(0, str(REPO / "benchmarks"))
    threads = torch.get_num_threads()  # the script runs on one thread; the rest of this process keeps its own
    try:
        spec = importlib.util.spec_from_file_location("overhead_floor", REPO / "benchmarks" / "overhead_floor.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
        torch.set_num_threads(threads)


def _gradients(bench) -> dict[str, torch.Tensor]:
    bench.loss().backward()
    grads = {name: p.grad.clone() for name, p in bench.model.named_parameters()}
    bench.model.zero_grad(set_to_none=True)
    return grads


def test_the_scaffolding_is_an_identity_on_training(floor) -> None:
    # the floor times the non-private step plus the pieces an engine needs: they must not change what it computes
    bench = floor.Scaffolding()
    bench.configure(mode=False, hooks=False)
    state = {k: v.clone() for k, v in bench.model.state_dict().items()}
    plain = _gradients(bench)
    bench.configure(mode=True, hooks=True)  # runs two training steps: put the weights back
    bench.model.load_state_dict(state)
    assert len(bench.handles) == 2 * len(bench.owners) > 0
    scaffolded = _gradients(bench)
    assert plain.keys() == scaffolded.keys()
    for name, grad in plain.items():
        assert torch.equal(grad, scaffolded[name]), name
    loss = bench.loss()  # the taps are in the graph: one node per module use
    nodes, stack, seen = 0, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes += type(node).__name__ == "IdentityTapBackward"
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert nodes >= len(bench.owners)
    bench.configure(mode=False, hooks=False)


def test_writes_every_configuration(floor, tmp_path: Path) -> None:
    out = tmp_path / "floor"
    assert floor.main(["--rounds", "1", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result) == set(floor.CONFIGS)
    assert result["non-private"]["time_ratio"] == pytest.approx(1.0)
    assert all(row["median_ms"] > 0 for row in result.values())
    markdown = out.with_suffix(".md").read_text()
    assert "| + mode, hooks and taps (the floor) |" in markdown and "| engine, layer-wise (clip) |" in markdown
