"""Per-layer exactness: every registered layer rule and the generic fallback against the float64 reference.

Each layer is wrapped in a tiny model -- the layer, then a fixed random projection (a buffer, not trained) to three
logits -- with a per-sample cross-entropy loss. For every case the engine's clipped sums ``sum_i C_i g_i`` and its
per-sample group norms are compared with :mod:`reference` (float64 ``torch.func`` per-sample gradients clipped by
the definition), in every norm mode (``ghost``, ``instantiate``, ``auto``), in float64 and float32, and over the
configurations in ``CONFIGS`` (both loss reductions, batch of 1 and of 3, both built-in clip functions, one group
and one group per tensor; every pair of values of the first three axes occurs). The threshold of every group is
0.8 times the median reference norm of that group, so clipping is active in every run (checked on the report).

Error metric: a tensor whose true gradient is (mathematically) zero -- an attention key bias, to which softmax is
invariant -- has a meaningless relative error, so each tensor's error is taken relative to
``max(||want_n||, floor * ||want_all||)`` with ``floor = 1e-6`` in float64 and ``1e-3`` in float32/bfloat16. Any
error larger than ``tol * floor`` of the whole clipped gradient still fails.

Precision: the reference runs on exactly the same (dtype-rounded) parameters and inputs as the engine, upcast to
float64, so the only error is the engine's own rounding: float64 runs must agree to 1e-6, float32 to 1e-4, and
bfloat16 (forward and backward in bfloat16, unit roundoff 2^-8 = 3.9e-3; norms and clipped sums in float32) to 3e-2,
i.e. a few bfloat16 roundings of the activations and output gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from groupclip import ClippingEngine
from groupclip.grouping import trainable_parameters
from groupclip.norms import find_rule, register_transformers_layers, registered_types
from reference import per_sample_gradients, reference_clip

NORM_MODES = ["ghost", "instantiate", "auto"]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2}
FLOOR = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 1e-3}


@dataclass(frozen=True)
class Config:
    reduction: str
    batch: int
    clip_fn: str
    grouping: str

    def __str__(self) -> str:
        return f"{self.reduction}/B={self.batch}/{self.clip_fn}/{self.grouping}"


# Every pair of (reduction, batch, clip_fn) values occurs once.
CONFIGS = [
    Config("mean", 1, "abadi", "all-layer"),
    Config("mean", 3, "automatic", "param-wise"),
    Config("sum", 1, "automatic", "param-wise"),
    Config("sum", 3, "abadi", "all-layer"),
]


# ---------------------------------------------------------------------- checking one run
def tensor_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], floor: float) -> dict[str, float]:
    """name -> ||got_n - want_n|| / max(||want_n||, floor * ||want_all||)."""
    total = math.sqrt(sum(float(w.double().pow(2).sum()) for w in want.values()))
    low = max(floor * total, 1e-300)
    return {n: float((got[n].double() - w).norm()) / max(float(w.norm()), low) for n, w in want.items()}


def ce_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run_and_compare(
    model: nn.Module,
    batch: tuple,
    *,
    norm_mode: str,
    reduction: str,
    clip_fn: str,
    grouping: str = "all-layer",
    dtype: torch.dtype = torch.float64,
    loss: Callable = ce_loss,
    ref_loss: Callable | None = None,
    ref_batch: tuple | None = None,
):
    """Run the engine once with clipping active and assert its result equals the float64 reference.

    ``ref_loss``/``ref_batch`` (default ``loss``/``batch``) define the function the reference differentiates; they
    differ from the engine's only in the dropout test, where the reference is given the masks the engine drew.
    """
    tol, floor = TOL[dtype], FLOOR[dtype]
    per_sample = per_sample_gradients(model, ref_loss or loss, ref_batch if ref_batch is not None else batch)
    engine = ClippingEngine(model, grouping=grouping, clip_fn=clip_fn, loss_reduction=reduction, norm_mode=norm_mode)
    groups = engine.grouping.groups
    unclipped = {g: sum(per_sample[n].flatten(1).pow(2).sum(1) for n in names).sqrt() for g, names in groups.items()}
    engine.set_thresholds({g: max(0.8 * float(n.median()), 1e-6) for g, n in unclipped.items()})
    want, want_norms = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)

    model.zero_grad(set_to_none=True)
    with engine:
        losses = loss(model, batch)
        total = losses.mean() if reduction == "mean" else losses.sum()
        total.backward()
    report = engine.last_report

    params = trainable_parameters(model)
    assert set(params) == set(want)
    for name, p in params.items():
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
    got = {n: p.grad for n, p in params.items()}
    errs = tensor_errors(got, want, floor)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"clipped sum of {worst}: rel err {errs[worst]:.3e} > {tol} ({errs})"

    assert set(report.per_sample_norms) == set(want_norms)
    for g, ref in want_norms.items():
        norm = report.per_sample_norms[g].double()
        assert norm.shape == ref.shape, g
        err = float((norm - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
        # a group whose gradient is identically zero has norms of pure rounding noise
        assert err <= tol or float(ref.abs().max()) <= floor * max(float(n.max()) for n in want_norms.values()), (
            f"per-sample norms of group {g}: rel err {err:.3e} > {tol}"
        )
    assert any(bool((f < 1).any()) for f in report.clip_factors.values()), "clipping was not active"
    return engine, report


# ---------------------------------------------------------------------- the tiny models
class Head(nn.Module):
    """``body`` then a fixed random projection to 3 logits (a buffer: trained parameters are the body's only)."""

    def __init__(self, body: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        with torch.no_grad():
            features = body(example).flatten(1).shape[1]
        self.register_buffer("proj", torch.randn(features, 3) / math.sqrt(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1) @ self.proj


@dataclass(frozen=True)
class LayerCase:
    build: Callable[[], nn.Module]  # the body
    shape: tuple[int, ...]  # input shape without the batch dim
    vocab: int | None = None  # integer inputs in [0, vocab) (embeddings)
    force_id: int | None = None  # an id forced into position 0 of every sample (padding_idx)

    def inputs(self, batch: int) -> torch.Tensor:
        if self.vocab is None:
            return torch.randn(batch, *self.shape)
        ids = torch.randint(0, self.vocab, (batch, *self.shape))
        if self.force_id is not None:
            ids.view(batch, -1)[:, 0] = self.force_id
        return ids


def make_model(case: LayerCase, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    body = case.build()
    with torch.no_grad():  # move away from special initial values (LayerNorm weight 1, bias 0, ...)
        for p in body.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = Head(body, case.inputs(2))
    return model.to(dtype)


def make_batch(case: LayerCase, size: int, dtype: torch.dtype) -> tuple:
    x = case.inputs(size)
    if x.is_floating_point():
        x = x.to(dtype)
    return x, torch.randint(0, 3, (size,))


def _eval(module: nn.Module) -> nn.Module:
    return module.eval()


def _instance_norm(cls, channels: int, track: bool, train: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = cls(channels, affine=True, track_running_stats=track)
        if track:  # non-trivial running statistics, used in eval mode
            m.running_mean.copy_(torch.randn(channels))
            m.running_var.copy_(torch.rand(channels) + 0.5)
        return m.train(train)

    return build


RULE_CASES: dict[str, LayerCase] = {
    # nn.Linear: every non-batch, non-feature dim is a sequence dim
    "linear-2d": LayerCase(lambda: nn.Linear(5, 4), (5,)),
    "linear-seq": LayerCase(lambda: nn.Linear(5, 4), (6, 5)),
    "linear-4d": LayerCase(lambda: nn.Linear(5, 4), (2, 3, 5)),
    "linear-seq-no-bias": LayerCase(lambda: nn.Linear(5, 4, bias=False), (6, 5)),
    "linear-long-narrow": LayerCase(lambda: nn.Linear(3, 2), (9, 3)),  # T(p+d) >= pd: auto instantiates
    "linear-short-wide": LayerCase(lambda: nn.Linear(8, 7), (2, 8)),  # T(p+d) < pd: auto stays ghost
    # Hugging Face Conv1D (GPT-2): weight [in, out]
    "hf-conv1d-2d": LayerCase(lambda: Conv1D(4, 5), (5,)),
    "hf-conv1d-seq": LayerCase(lambda: Conv1D(4, 5), (6, 5)),
    "hf-conv1d-4d": LayerCase(lambda: Conv1D(3, 5), (2, 2, 5)),
    # convolutions
    "conv1d-stride2-pad1": LayerCase(lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
    "conv1d-same-reflect-dil2-groups3-nobias": LayerCase(
        lambda: nn.Conv1d(3, 6, 3, padding="same", padding_mode="reflect", dilation=2, groups=3, bias=False), (3, 8)
    ),
    "conv1d-circular-pad2": LayerCase(lambda: nn.Conv1d(2, 3, 4, padding=2, padding_mode="circular"), (2, 7)),
    "conv1d-valid": LayerCase(lambda: nn.Conv1d(2, 3, 3, padding="valid", stride=3), (2, 10)),
    "conv2d-basic": LayerCase(lambda: nn.Conv2d(2, 4, 3), (2, 5, 5)),
    "conv2d-same-even-kernel-replicate": LayerCase(
        lambda: nn.Conv2d(2, 4, (2, 4), padding="same", padding_mode="replicate"), (2, 5, 6)
    ),
    "conv2d-same-zeros-dil": LayerCase(lambda: nn.Conv2d(2, 2, 4, padding="same", dilation=(2, 1)), (2, 6, 5)),
    "conv2d-stride-dil-groups-circular": LayerCase(
        lambda: nn.Conv2d(4, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="circular"),
        (4, 6, 7),
    ),
    "conv2d-depthwise-reflect-nobias": LayerCase(
        lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, padding_mode="reflect", bias=False), (3, 5, 5)
    ),
    "conv2d-1x1-valid": LayerCase(lambda: nn.Conv2d(3, 5, 1, padding="valid"), (3, 3, 4)),
    "conv3d-basic-stride": LayerCase(lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 4, 4, 4)),
    "conv3d-same-circular-groups": LayerCase(
        lambda: nn.Conv3d(2, 4, 3, padding="same", padding_mode="circular", groups=2), (2, 3, 4, 4)
    ),
    "conv3d-replicate-dil": LayerCase(
        lambda: nn.Conv3d(2, 2, (1, 2, 3), padding=(0, 1, 2), dilation=(1, 1, 2), padding_mode="replicate"),
        (2, 3, 4, 5),
    ),
    "conv3d-reflect-nobias": LayerCase(
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), (2, 3, 3, 4)
    ),
    # nn.Embedding: 7 positions over 3 ids always repeat an id
    "embedding-repeated-ids": LayerCase(lambda: nn.Embedding(6, 4), (7,), vocab=3),
    "embedding-padding-idx": LayerCase(lambda: nn.Embedding(6, 4, padding_idx=0), (7,), vocab=4, force_id=0),
    "embedding-negative-padding-idx": LayerCase(lambda: nn.Embedding(5, 3, padding_idx=-1), (6,), vocab=5, force_id=4),
    "embedding-1d-ids": LayerCase(lambda: nn.Embedding(6, 4), (), vocab=6),
    "embedding-3d-ids": LayerCase(lambda: nn.Embedding(6, 4, padding_idx=2), (2, 3), vocab=4, force_id=2),
    # normalization layers
    "layernorm-seq": LayerCase(lambda: nn.LayerNorm(5), (6, 5)),
    "layernorm-2d": LayerCase(lambda: nn.LayerNorm(5), (5,)),
    "layernorm-multi-dim": LayerCase(lambda: nn.LayerNorm((3, 5)), (2, 3, 5)),
    "layernorm-no-bias": LayerCase(lambda: nn.LayerNorm(5, bias=False), (6, 5)),
    "layernorm-no-affine-after-linear": LayerCase(
        lambda: nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5, elementwise_affine=False)), (6, 5)
    ),
    "layernorm-eval": LayerCase(lambda: _eval(nn.LayerNorm(5, eps=1e-2)), (6, 5)),
    "groupnorm-1d": LayerCase(lambda: nn.GroupNorm(2, 4), (4, 5)),
    "groupnorm-2d": LayerCase(lambda: nn.GroupNorm(3, 6), (6, 3, 3)),
    "groupnorm-channels-only": LayerCase(lambda: nn.GroupNorm(2, 4), (4,)),
    "groupnorm-one-group": LayerCase(lambda: nn.GroupNorm(1, 3, eps=1e-3), (3, 2, 2)),
    "rmsnorm-seq": LayerCase(lambda: nn.RMSNorm(5), (6, 5)),
    "rmsnorm-2d": LayerCase(lambda: nn.RMSNorm(5, eps=1e-3), (5,)),
    "rmsnorm-multi-dim": LayerCase(lambda: nn.RMSNorm((3, 5)), (2, 3, 5)),
}
for _cls, _shape in ((nn.InstanceNorm1d, (3, 6)), (nn.InstanceNorm2d, (3, 3, 4)), (nn.InstanceNorm3d, (3, 2, 3, 3))):
    for _track in (False, True):
        for _train in (True, False):
            _id = f"{_cls.__name__.lower()}-{'tracked' if _track else 'untracked'}-{'train' if _train else 'eval'}"
            RULE_CASES[_id] = LayerCase(_instance_norm(_cls, 3, _track, _train), _shape)


# ---------------------------------------------------------------------- modules without a registered rule
class ClsPos(nn.Module):
    """ViT-style: prepend a learned cls token, add learned position embeddings (raw parameters)."""

    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos


class ScaledLinear(nn.Linear):
    """Overrides forward, so the Linear rule must not be used for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) * 2


class Gated(nn.Module):
    """A raw parameter plus a child Linear called as a module (covered by the child's own rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(d))
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * torch.sigmoid(self.gate)) * self.gate


class Attention(nn.Module):
    def __init__(self, d: int = 4, heads: int = 2, need_weights: bool = False, kv_dim: int | None = None, **kw):
        super().__init__()
        self.kv_dim, self.need_weights = kv_dim, need_weights
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kv_dim, vdim=kv_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x if self.kv_dim is None else torch.tanh(x[..., : self.kv_dim])
        out, weights = self.mha(x, kv, kv, need_weights=self.need_weights)
        if self.need_weights:
            return torch.cat([out, weights], -1)
        return out


class Recurrent(nn.Module):
    """An RNN with batch_first=True; uses the output sequence (``use_hidden=False``) or the final hidden state."""

    def __init__(self, cls, use_hidden: bool = False, **kw) -> None:
        super().__init__()
        self.rnn = cls(4, 5, batch_first=True, **kw)
        self.use_hidden = use_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, hidden = self.rnn(x)
        if self.use_hidden:
            h = hidden[0] if isinstance(hidden, tuple) else hidden
            return h[-1]
        return out


class PosTable(nn.Module):
    """Returns (a function of) its own parameter only: an output [1, T, d] that the engine must broadcast."""

    def __init__(self, kind: str, tokens: int = 8, d: int = 4) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, d))
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "parameter":
            return self.pos
        if self.kind == "slice":
            return self.pos[:, : x.shape[1]]
        if self.kind == "expand":
            return self.pos[:, : x.shape[1]].expand(x.shape[0], -1, -1)
        return self.pos[:, : x.shape[1]] * 2  # a new tensor, not a view of the parameter


class AddPos(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.table = PosTable(kind)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + self.table(x)[:, : x.shape[1]])


class LearnedQueries(nn.Module):
    """Perceiver-style learned queries [1, Q, d] through registered layers (broadcast inputs to their rules)."""

    def __init__(self, d: int = 4, queries: int = 3) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, d))
        self.ln, self.lin, self.emb = nn.LayerNorm(d), nn.Linear(d, d), nn.Embedding(queries, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.lin(self.ln(self.queries)) + self.emb(torch.arange(self.queries.shape[1]).unsqueeze(0))
        return torch.softmax(q @ x.transpose(1, 2), -1) @ x


GENERIC_CASES: dict[str, LayerCase] = {
    "position-table-broadcast-output": LayerCase(lambda: AddPos("product"), (5, 4)),
    "learned-queries-broadcast-rule-inputs": LayerCase(LearnedQueries, (5, 4)),
    "cls-token-pos-embedding": LayerCase(lambda: nn.Sequential(nn.Linear(4, 4), ClsPos(4, 5)), (5, 4)),
    "linear-subclass-own-forward": LayerCase(lambda: ScaledLinear(5, 4), (6, 5)),
    "raw-param-with-child-linear": LayerCase(lambda: Gated(4), (3, 4)),
    "conv-transpose2d-stride-outpad": LayerCase(
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 3, 3)
    ),
    "conv-transpose2d-groups-dil-nobias": LayerCase(
        lambda: nn.ConvTranspose2d(4, 4, 2, groups=2, dilation=2, bias=False), (4, 3, 3)
    ),
    "conv-transpose1d": LayerCase(lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (3, 4)),
    "mha": LayerCase(lambda: Attention(), (5, 4)),
    "mha-bias-kv-zero-attn": LayerCase(lambda: Attention(add_bias_kv=True, add_zero_attn=True), (5, 4)),
    "mha-kv-dim-no-bias-weights": LayerCase(lambda: Attention(kv_dim=3, bias=False, need_weights=True), (5, 4)),
    "lstm-sequence-output": LayerCase(lambda: Recurrent(nn.LSTM), (6, 4)),
    "gru-sequence-output": LayerCase(lambda: Recurrent(nn.GRU), (6, 4)),
}


def _check_path(model: nn.Module, generic: bool) -> None:
    """The case exercises what it claims: a rule for every owning module, or the fallback for some."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m._parameters.values() if p is not None)]
    assert owners
    rules = [find_rule(m) is not None for m in owners]
    assert (not all(rules)) if generic else all(rules)


def _run_case(case: LayerCase, norm_mode: str, dtype: torch.dtype, generic: bool) -> None:
    for i, config in enumerate(CONFIGS):
        model = make_model(case, dtype, seed=i)
        _check_path(model, generic)
        batch = make_batch(case, config.batch, dtype)
        try:
            run_and_compare(
                model,
                batch,
                norm_mode=norm_mode,
                reduction=config.reduction,
                clip_fn=config.clip_fn,
                grouping=config.grouping,
                dtype=dtype,
            )
        except AssertionError as exc:
            raise AssertionError(f"[{config}] {exc}") from exc


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_mode", NORM_MODES)
@pytest.mark.parametrize("case_id", list(RULE_CASES))
def test_registered_layer_exact(case_id: str, norm_mode: str, dtype: torch.dtype) -> None:
    _run_case(RULE_CASES[case_id], norm_mode, dtype, generic=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_mode", NORM_MODES)
@pytest.mark.parametrize("case_id", list(GENERIC_CASES))
def test_generic_fallback_exact(case_id: str, norm_mode: str, dtype: torch.dtype) -> None:
    _run_case(GENERIC_CASES[case_id], norm_mode, dtype, generic=True)


@pytest.mark.parametrize("norm_mode", NORM_MODES)
def test_lstm_float32_without_onednn(norm_mode: str) -> None:
    """float32 LSTM is exact whether or not the user disables oneDNN (the fallback's recompute always does)."""
    with torch.backends.mkldnn.flags(enabled=False):
        _run_case(GENERIC_CASES["lstm-sequence-output"], norm_mode, torch.float32, generic=True)


def test_every_registered_layer_type_has_a_case() -> None:
    register_transformers_layers()
    covered = set()
    for case in RULE_CASES.values():
        model = make_model(case, torch.float64)
        covered |= {type(m) for m in model.modules() if find_rule(m) is not None}
    missing = [t.__name__ for t in registered_types() if t not in covered]
    assert not missing, f"registered layer types without an exactness case: {missing}"


# ---------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("norm_mode", NORM_MODES)
@pytest.mark.parametrize("case_id", ["linear-2d", "linear-seq", "linear-seq-no-bias", "layernorm-seq", "layernorm-2d"])
def test_bfloat16_against_float64(case_id: str, norm_mode: str) -> None:
    """Model and inputs in bfloat16; the reference differentiates the same bf16 values in float64.

    Forward and backward run in bfloat16 (unit roundoff 2^-8), so the output gradients the rules receive carry
    relative errors of a few 1e-3; the clipped sum of a bias (a sum of output gradients over positions, then a
    clip-weighted sum over samples) cancels and amplifies them. Measured: the engine's worst relative error is
    9e-3 on these seeds (3.1e-2 on an unlucky seed, where per-sample bf16 autograd gradients clipped by the
    definition in float64 are off by 2.1e-2 too), hence 3e-2: a wrong rule gives errors of order 1.
    """
    case = RULE_CASES[case_id]
    for i, config in enumerate(CONFIGS):
        model = make_model(case, torch.bfloat16, seed=i)
        run_and_compare(
            model,
            make_batch(case, config.batch, torch.bfloat16),
            norm_mode=norm_mode,
            reduction=config.reduction,
            clip_fn=config.clip_fn,
            grouping=config.grouping,
            dtype=torch.bfloat16,
        )


# ---------------------------------------------------------------------- several uses of one parameter
class LinearTwice(nn.Module):
    """One nn.Linear applied to two inputs of different sequence lengths, summed: cross terms between the uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.lin(torch.tanh(x[:, :2])).sum(1, keepdim=True)


class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.conv(x)))


class EmbeddingTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4, padding_idx=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) * self.emb((ids + 1) % 5).flip(1)


class GenericTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = ClsPos(4, 3)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.lin(self.cls(x))[:, 1:])


class TiedLM(nn.Module):
    """GPT-2 style: lm_head.weight is wte.weight (Embedding use and Linear use of one tensor)."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.ln(self.wte(ids))))


class TiedLinears(nn.Module):
    """Two Linears sharing one weight (own biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


MULTI_USE_CASES: dict[str, LayerCase] = {
    "linear-called-twice": LayerCase(LinearTwice, (5, 4)),
    "conv2d-called-twice": LayerCase(ConvTwice, (2, 4, 4)),
    "embedding-called-twice": LayerCase(EmbeddingTwice, (6,), vocab=5, force_id=1),
    "generic-called-twice": LayerCase(GenericTwice, (3, 4)),
    "tied-embedding-lm-head": LayerCase(TiedLM, (6,), vocab=4),
    "tied-embedding-lm-head-2d-ids": LayerCase(TiedLM, (2, 3), vocab=7),
    "tied-linears": LayerCase(TiedLinears, (3, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_mode", NORM_MODES)
@pytest.mark.parametrize("case_id", list(MULTI_USE_CASES))
def test_parameter_used_several_times(case_id: str, norm_mode: str, dtype: torch.dtype) -> None:
    case = MULTI_USE_CASES[case_id]
    for grouping in ("all-layer", "layer-wise", "param-wise"):
        model = make_model(case, dtype, seed=1)
        for reduction, size in (("mean", 3), ("sum", 1)):
            run_and_compare(
                model,
                make_batch(case, size, dtype),
                norm_mode=norm_mode,
                reduction=reduction,
                clip_fn="abadi",
                grouping=grouping,
                dtype=dtype,
            )


class SharedInput(nn.Module):
    """Attention-like: q, k, v and a residual Linear all read the same tensor (Gram sharing of ``a a^T``)."""

    def __init__(self, freeze_k_weight: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 4)
        if freeze_k_weight:
            self.k.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        return self.o(att @ self.v(x)) + self.q(x) + self.k(x[:, :1])


@pytest.mark.parametrize("freeze", [False, True], ids=["all-trainable", "k-weight-frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_mode", NORM_MODES)
def test_linears_sharing_one_input(norm_mode: str, dtype: torch.dtype, freeze: bool) -> None:
    case = LayerCase(lambda: SharedInput(freeze), (5, 4))
    for i, config in enumerate(CONFIGS):
        model = make_model(case, dtype, seed=i)
        run_and_compare(
            model,
            make_batch(case, config.batch, dtype),
            norm_mode=norm_mode,
            reduction=config.reduction,
            clip_fn=config.clip_fn,
            grouping="layer-wise",
            dtype=dtype,
        )


class _AtenOps(TorchDispatchMode):
    """Records the aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouping", ["layer-wise", "all-layer", "param-wise"])
@pytest.mark.parametrize(
    "layer", [lambda i, o: nn.Linear(i, o), lambda i, o: Conv1D(o, i)], ids=["linear", "hf-conv1d"]
)
def test_small_layer_instantiated_side_by_side_is_exact_without_a_copy(layer, grouping: str) -> None:
    """Auto instantiates a small layer over many positions (T(p+d) >= pd). Its weight and bias, when in one group,
    are written side by side into one tensor and gathered without a ``cat``; in separate groups they are formed
    apart. Exact either way."""
    case = LayerCase(lambda: nn.Sequential(layer(5, 4), nn.Tanh(), layer(4, 4)), (6, 5))
    model = make_model(case, torch.float64)
    batch = make_batch(case, 3, torch.float64)
    run_and_compare(model, batch, norm_mode="auto", reduction="sum", clip_fn="abadi", grouping=grouping)

    ops = _AtenOps()
    with ClippingEngine(model, grouping=grouping, loss_reduction="sum"):
        losses = ce_loss(model, batch)
        with ops:
            losses.sum().backward()
    # all-layer gathers both layers' gradients into one tensor, param-wise the two bias groups (clipped together at
    # the end of the pass): one cat each, none per layer
    assert ops.names.count("aten::cat") == (0 if grouping == "layer-wise" else 1)
    assert ("aten::bmm.out" in ops.names) == (grouping != "param-wise"), ops.names


def _norm_stack(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh()]
    return nn.Sequential(nn.Linear(5, 4), *layers)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vector_groups_are_clipped_together_at_the_end_whatever_their_number(reduction: str) -> None:
    """Param-wise, every bias and norm scale is a group of its own. Those groups wait for the end of the pass and
    are clipped together: one segmented reduction for all their norms, one factor computation -- so the ops they
    cost do not grow with their number. Exact with unequal thresholds (run_and_compare sets them per group)."""
    counts = {}
    for depth in (2, 4):
        case = LayerCase(lambda depth=depth: _norm_stack(depth), (6, 5))
        model = make_model(case, torch.float64)
        batch = make_batch(case, 3, torch.float64)
        run_and_compare(model, batch, norm_mode="auto", reduction=reduction, clip_fn="abadi", grouping="param-wise")

        ops = _AtenOps()
        with ClippingEngine(model, grouping="param-wise", loss_reduction=reduction):
            losses = ce_loss(model, batch)
            with ops:
                (losses.mean() if reduction == "mean" else losses.sum()).backward()
        assert ops.names.count("aten::segment_reduce") == 1, ops.names
        counts[depth] = ops.names
    # one clipped sum (addmv) per weight group -- the small weights are instantiated -- and none per vector group:
    # all vectors share one product and one sum
    assert {depth: names.count("aten::addmv") for depth, names in counts.items()} == {2: 3, 4: 5}


# ---------------------------------------------------------------------- dropout inside the generic fallback
class DropBlock(nn.Module):
    """Generic-fallback module (raw parameter) with a Dropout inside, between two uses of the raw parameter.

    ``mask`` replaces the dropout by a fixed per-sample mask (the reference's view of the same function).
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(d))
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x * self.gate
        h = self.drop(h) if mask is None else h * mask / 0.5
        return torch.tanh(self.lin(h)) * self.gate


class DropModel(nn.Module):
    def __init__(self, d: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.drop0 = nn.Dropout(0.5)  # consumes random numbers before the block
        self.block = DropBlock(d)
        self.register_buffer("proj", torch.randn(tokens * d, 3))

    def forward(self, x, mask0=None, mask1=None):
        h = self.inp(x)
        h = self.drop0(h) if mask0 is None else h * mask0 / 0.5
        return self.block(h, mask1).flatten(1) @ self.proj


def _record_masks(model: DropModel, seed: int, batch: tuple, engine: ClippingEngine | None, reduction: str):
    """Forward and backward with ``seed``; returns (dropout masks drawn in the forward, random numbers after)."""
    masks, recording = [], [True]
    hooks = [
        m.register_forward_hook(lambda mod, args, out: masks.append((out != 0).to(out.dtype)) if recording[0] else None)
        for m in (model.drop0, model.block.drop)
    ]
    try:
        torch.manual_seed(seed)
        ctx = engine if engine is not None else torch.enable_grad()
        with ctx:
            losses = ce_loss(model, batch)
            recording[0] = False
            (losses.mean() if reduction == "mean" else losses.sum()).backward()
        after = torch.rand(4)
    finally:
        for h in hooks:
            h.remove()
    return masks, after


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("norm_mode", NORM_MODES)
def test_dropout_masks_replayed_by_generic_fallback(norm_mode: str, reduction: str, dtype: torch.dtype) -> None:
    """Dropout (p=0.5, train mode) inside a module handled by the generic fallback.

    Honest reference: a plain forward with seed s records both dropout masks; the float64 reference then
    differentiates the model with those masks fixed and given per sample as inputs. The engine, run with the same
    seed, must draw the same masks in its forward (checked), and its recompute of the block must replay them: a
    recompute with fresh masks would give ``gate`` a different gradient. The recompute must also leave the global
    random stream where the plain run leaves it.
    """
    torch.manual_seed(0)
    model = DropModel().to(dtype).train()
    size = 3
    x, y = torch.randn(size, 6, 4, dtype=dtype), torch.randint(0, 3, (size,))
    plain_masks, plain_after = _record_masks(model, 1234, (x, y), None, reduction)
    assert len(plain_masks) == 2
    frac = float(torch.cat([m.flatten() for m in plain_masks]).mean())
    assert 0.25 < frac < 0.75, "dropout is not active"

    def ref_loss(m, batch):
        xb, yb, m0, m1 = batch
        return F.cross_entropy(m(xb, m0, m1), yb, reduction="none")

    engine_masks: list = []

    def seeded_loss(m, batch):
        """The engine's forward: seed, and record the masks it draws (hooks live only during this forward)."""
        hooks = [
            mod.register_forward_hook(lambda mod, args, out: engine_masks.append((out != 0).to(out.dtype)))
            for mod in (m.drop0, m.block.drop)
        ]
        try:
            torch.manual_seed(1234)
            return ce_loss(m, batch)
        finally:
            for h in hooks:
                h.remove()

    run_and_compare(
        model,
        (x, y),
        norm_mode=norm_mode,
        reduction=reduction,
        clip_fn="abadi",
        grouping="param-wise",
        dtype=dtype,
        loss=seeded_loss,
        ref_loss=ref_loss,
        ref_batch=(x, y, *plain_masks),
    )
    assert len(engine_masks) == 2
    for got, want in zip(engine_masks, plain_masks, strict=True):
        assert torch.equal(got, want), "the engine's forward drew different dropout masks"
    # the recompute ran inside a forked RNG: the global stream continues exactly as without the engine
    engine = ClippingEngine(model, grouping="param-wise", norm_mode=norm_mode, loss_reduction=reduction)
    model.zero_grad(set_to_none=True)
    masks, after = _record_masks(model, 1234, (x, y), engine, reduction)
    assert all(torch.equal(a, b) for a, b in zip(masks, plain_masks, strict=True))
    assert torch.equal(after, plain_after)


# ---------------------------------------------------------------------- regressions (bugs found and fixed)
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_rnn_final_hidden_state(cls) -> None:
    case = LayerCase(lambda: Recurrent(cls, use_hidden=True), (6, 4))
    model = make_model(case, torch.float64)
    run_and_compare(model, make_batch(case, 3, torch.float64), norm_mode="auto", reduction="mean", clip_fn="abadi")


@pytest.mark.parametrize("kwargs", [{"num_layers": 2}, {"bidirectional": True}], ids=["stacked", "bidirectional"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_rnn_stacked_or_bidirectional(cls, kwargs) -> None:
    case = LayerCase(lambda: Recurrent(cls, **kwargs), (6, 4))
    model = make_model(case, torch.float64)
    run_and_compare(model, make_batch(case, 3, torch.float64), norm_mode="auto", reduction="mean", clip_fn="abadi")


class DirectAndModuleUse(nn.Module):
    """A generic-fallback module that calls its child Linear AND uses the child's weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) + F.linear(torch.tanh(x), self.lin.weight)) * self.scale


@pytest.mark.parametrize("norm_mode", ["ghost", "instantiate"])
def test_generic_parent_using_child_parameter_directly(norm_mode: str) -> None:
    """A fallback parent that calls its child Linear AND uses the child's weight directly (a raw use): the raw
    use's per-sample gradient is recovered where it meets per-sample data, and summed with the module use's."""
    case = LayerCase(DirectAndModuleUse, (3, 4))
    model = make_model(case, torch.float64)
    run_and_compare(model, make_batch(case, 3, torch.float64), norm_mode=norm_mode, reduction="sum", clip_fn="abadi")


@pytest.mark.parametrize(("kind", "size"), [("slice", 1), ("expand", 1), ("expand", 3)])
def test_generic_output_is_view_of_own_parameter(kind: str, size: int) -> None:
    case = LayerCase(lambda: AddPos(kind), (5, 4))
    model = make_model(case, torch.float64)
    run_and_compare(model, make_batch(case, size, torch.float64), norm_mode="auto", reduction="mean", clip_fn="abadi")


@pytest.mark.parametrize("size", [1, 3])
def test_generic_output_is_own_parameter(size: int) -> None:
    case = LayerCase(lambda: AddPos("parameter"), (5, 4))
    model = make_model(case, torch.float64)
    run_and_compare(model, make_batch(case, size, torch.float64), norm_mode="auto", reduction="mean", clip_fn="abadi")


# ---------------------------------------------------------------------- randomized shapes
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["same", "valid", "int", "tuple"]))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims)) if padding != "same" else 1
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    size = tuple(draw(st.integers(max(s, 3), max(s, 3) + (3 if dims < 3 else 1))) for s in span)
    bias = draw(st.booleans())
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    build = lambda: _CONVS[dims](c_in, c_out, kernel, **conv)  # noqa: E731
    return LayerCase(build, (c_in, *size)), draw(st.sampled_from(NORM_MODES)), draw(st.sampled_from(CONFIGS))


@settings(max_examples=30, deadline=None)
@given(conv_cases())
def test_conv_random_configurations(drawn) -> None:
    case, norm_mode, config = drawn
    model = make_model(case, torch.float64)
    run_and_compare(
        model,
        make_batch(case, config.batch, torch.float64),
        norm_mode=norm_mode,
        reduction=config.reduction,
        clip_fn=config.clip_fn,
        grouping=config.grouping,
    )


@st.composite
def linear_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    d_in, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bias = draw(st.booleans())
    hf = draw(st.booleans())
    build = (lambda: Conv1D(d_out, d_in)) if hf else (lambda: nn.Linear(d_in, d_out, bias=bias))
    dtype = draw(st.sampled_from(DTYPES))
    return LayerCase(build, (*lead, d_in)), draw(st.sampled_from(NORM_MODES)), draw(st.sampled_from(CONFIGS)), dtype


@settings(max_examples=30, deadline=None)
@given(linear_cases())
def test_linear_random_shapes(drawn) -> None:
    case, norm_mode, config, dtype = drawn
    model = make_model(case, dtype)
    run_and_compare(
        model,
        make_batch(case, config.batch, dtype),
        norm_mode=norm_mode,
        reduction=config.reduction,
        clip_fn=config.clip_fn,
        grouping=config.grouping,
        dtype=dtype,
    )
