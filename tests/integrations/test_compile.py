"""torch.compile and make_private, in either order.

The engine records each forward call with module hooks, a torch-function mode and autograd taps, which Dynamo
cannot trace; make_private makes the call of the model opaque to Dynamo, so a compiled model runs eagerly under the
engine. Checked, for make_private after ``torch.compile(model)`` and before it:

* 20 steps with Poisson batch sizes (varying, empty batches skipped) compile at most 2 graphs (Dynamo's counters);
* the parameters after every step equal (exactly) those of the uncompiled private run with the same seeds;
* groups, thresholds and checkpoint keys use the user's parameter names, without ``_orig_mod.``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from groupclip import make_private

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

N, D_IN, CLASSES = 160, 5, 3


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, CLASSES)).to(torch.float64)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(
        torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=g)
    )


def run(order: str, steps: int = 20):
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kwargs = dict(
        grouping="layer-wise", max_grad_norm=0.5, noise_multiplier=0.5, batch_size=8, data_size=N, noise_seed=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if order == "compile-first":
            call = torch.compile(model)
            private = make_private(call, opt, **kwargs)
        else:
            private = make_private(model, opt, **kwargs)
            call = torch.compile(model) if order == "compile-after" else model
    history, sizes = [], []
    for x, y in private.poisson_loader(dataset()):
        sizes.append(len(x))
        if len(x):
            F.cross_entropy(call(x), y).backward()
        opt.step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in model.parameters()])
        if len(history) == steps:
            break
    return private, history, sizes


@pytest.mark.parametrize("order", ["compile-first", "compile-after"])
def test_compiled_private_run_is_exact_with_bounded_compiles(order):
    _, want, want_sizes = run("eager")
    dynamo.reset()
    counters.clear()
    private, got, sizes = run(order)
    assert sizes == want_sizes and len(set(sizes)) > 3  # the batch sizes varied
    assert counters["frames"]["total"] >= 1  # Dynamo did run on the compiled call
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2, dict(counters["stats"])
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True)), step
    assert sorted(private.engine.thresholds) == ["0", "2"]
    assert sorted(private.state_dict()["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert private.engine.last_report.groups == ["0", "2"]
