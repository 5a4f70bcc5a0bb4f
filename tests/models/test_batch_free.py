"""Batch-ness by data flow, never by shape: batch-free parameter uses, folded batches, several forward calls.

The first test is the 12-line model of issue #12: an Embedding indexed by a [T, T] bucket tensor (batch-free),
``bias[None]`` added to [B, T, T] scores. Deciding the batch axis by comparing a leading size with B (what
groupclip did before) took the bucket axis for the batch when T == B and gave per-sample norms of 0.057 where the
truth is 0.073 (a clipped sum 35% off) -- silently. By data flow the bias is batch-free; its per-sample gradient
exists only where it is broadcast onto per-sample scores, and is recovered there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from groupclip import ClippingEngine, PassError
from reference import check_engine

GROUPINGS = ["all-layer", "layer-wise", "param-wise", 2, "callable"]
CLIP_FNS = ["abadi", "automatic"]


def _grouping(spec):
    return (lambda name, p: name.split(".")[0]) if spec == "callable" else spec


def _assert_exact(got, want, norms, ref_norms, tol=1e-6):
    total = sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
    for n, w in want.items():
        err = float((got[n] - w).norm()) / max(float(w.norm()), 1e-3 * total, 1e-30)
        assert err <= tol, (n, err)
    for g, r in ref_norms.items():
        assert float((norms[g] - r).abs().max()) <= tol * max(float(r.abs().max()), 1e-12), g


class BucketBias(nn.Module):
    """The 12-line model: relative-position buckets [T, T] -> Embedding -> bias broadcast onto [B, T, T] scores."""

    def __init__(self, vocab: int = 11, width: int = 6, buckets: int = 7) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.rel = nn.Embedding(buckets, 1)
        self.out = nn.Linear(width, 3)
        self.buckets = buckets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)  # [B, T, d]
        steps = ids.shape[1]
        pos = torch.arange(steps)
        bucket = (pos[None, :] - pos[:, None]).clamp(0, self.buckets - 1)  # [T, T], batch-free
        scores = h @ h.transpose(1, 2) + self.rel(bucket).squeeze(-1)[None]  # [B, T, T]
        return self.out(torch.softmax(scores, -1) @ h).mean(1)


def _bucket_loss(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y, reduction="none")


@pytest.mark.parametrize("clip_fn", CLIP_FNS)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize(("batch", "steps"), [(4, 4), (3, 5)], ids=["T==B", "T!=B"])
def test_batch_free_bias_from_buckets_is_exact(batch: int, steps: int, grouping, clip_fn: str) -> None:
    torch.manual_seed(0)
    model = BucketBias().double()
    gen = torch.Generator().manual_seed(1)
    data = (torch.randint(0, 11, (batch, steps), generator=gen), torch.randint(0, 3, (batch,), generator=gen))
    _, got, want, norms, ref_norms = check_engine(
        model, _bucket_loss, data, grouping=_grouping(grouping), max_grad_norm=0.2, clip_fn=clip_fn
    )
    _assert_exact(got, want, norms, ref_norms)


class LearnedBias(nn.Module):
    """A module returning a function of its own parameter only (no input): a learned attention bias."""

    def __init__(self, heads: int, steps: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, steps, steps))

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.table)[None]  # [1, H, T, T]


class BiasedAttention(nn.Module):
    def __init__(self, width: int = 8, heads: int = 2, steps: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.bias = LearnedBias(heads, steps)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + self.bias()
        h = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(h).pow(2).sum((1, 2))


@pytest.mark.parametrize("clip_fn", CLIP_FNS)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_learned_batch_free_attention_bias_is_exact(grouping, clip_fn: str) -> None:
    torch.manual_seed(0)
    model = BiasedAttention().double()
    x = torch.randn(4, 4, 8, dtype=torch.float64)  # B == T
    _, got, want, norms, ref_norms = check_engine(
        model, lambda m, b: m(b[0]), (x,), grouping=_grouping(grouping), max_grad_norm=0.5, clip_fn=clip_fn
    )
    _assert_exact(got, want, norms, ref_norms)


# ---------------------------------------------------------------------- T5 and DeBERTa-v2
def _t5(batch: int, steps: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).double()
    gen = torch.Generator().manual_seed(2)
    data = (torch.randint(1, 40, (batch, steps), generator=gen), torch.randint(1, 40, (batch, steps), generator=gen))
    return model, data


def _t5_loss(model, batch):
    ids, labels = batch
    logits = model(input_ids=ids, labels=labels).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


@pytest.mark.hf
@pytest.mark.parametrize("clip_fn", CLIP_FNS)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize(("batch", "steps"), [(4, 4), (3, 5)], ids=["T==B", "T!=B"])
def test_t5_relative_attention_bias_encoder_and_decoder_exact(batch, steps, grouping, clip_fn) -> None:
    model, data = _t5(batch, steps)
    _engine, got, want, norms, ref_norms = check_engine(
        model, _t5_loss, data, grouping=_grouping(grouping), max_grad_norm=0.05, clip_fn=clip_fn
    )
    _assert_exact(got, want, norms, ref_norms)  # 1e-6: T5's layer norm computes its variance in float32
    biases = [n for n in want if "relative_attention_bias" in n]
    assert any(n.startswith("encoder") for n in biases) and any(n.startswith("decoder") for n in biases)
    assert all(float(want[n].norm()) > 0 for n in biases)


@pytest.mark.hf
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_deberta_v2_relative_embeddings_exact(grouping) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3, type_vocab_size=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(config).double()
    gen = torch.Generator().manual_seed(3)
    data = (torch.randint(1, 40, (4, 4), generator=gen), torch.randint(0, 3, (4,), generator=gen))

    def loss(m, b):
        return F.cross_entropy(m(input_ids=b[0]).logits, b[1], reduction="none")

    _, got, want, norms, ref_norms = check_engine(model, loss, data, grouping=_grouping(grouping), max_grad_norm=0.05)
    _assert_exact(got, want, norms, ref_norms, tol=1e-9)
    assert float(want["deberta.encoder.rel_embeddings.weight"].norm()) > 0  # a raw parameter use, attributed


# ---------------------------------------------------------------------- shapes that happen to equal B
class Shapes(nn.Module):
    """A sequence model whose T, d and vocabulary sizes may all equal B, with a batch-free positional table."""

    def __init__(self, vocab: int, width: int, steps: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(steps, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])[None]  # [1, T]: broadcast over the batch
        h = torch.tanh(self.mix(self.tok(ids) + self.pos(positions)))
        h = h + h.transpose(0, 1).transpose(0, 1)  # moving the batch away and back
        return self.head(h.reshape(-1, h.shape[-1])).view(*ids.shape, -1)  # rows folded as [B*T, d]


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 4),
    same=st.sampled_from(["steps", "width", "vocab", "all"]),
    grouping=st.sampled_from(["all-layer", "layer-wise"]),
)
def test_sizes_equal_to_the_batch_do_not_fool_the_engine(batch: int, same: str, grouping: str) -> None:
    steps = batch if same in ("steps", "all") else 5
    width = batch if same in ("width", "all") else 3
    vocab = max(batch, 2) if same in ("vocab", "all") else 7  # one class would make every gradient zero
    torch.manual_seed(batch)
    model = Shapes(vocab, width, steps).double()
    ids = torch.randint(0, vocab, (batch, steps), generator=torch.Generator().manual_seed(0))

    def loss(m, b):
        return F.cross_entropy(m(b[0]).transpose(1, 2), b[0], reduction="none").mean(1)

    _, got, want, norms, ref_norms = check_engine(model, loss, (ids,), grouping=grouping, max_grad_norm=0.1)
    _assert_exact(got, want, norms, ref_norms, tol=1e-9)


# ---------------------------------------------------------------------- several forward calls, one loss
def _two_view(model, batch):
    z1 = F.normalize(model(batch[0]), dim=-1)
    z2 = F.normalize(model(batch[1]), dim=-1)
    return 1 - (z1 * z2).sum(-1)  # sample i's loss: the agreement of its own two views


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_two_view_contrastive_loss_is_exact_with_aligned_calls(grouping) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    views = (x, x + 0.3 * torch.randn_like(x))
    _, got, want, norms, ref_norms = check_engine(
        model, _two_view, views, grouping=_grouping(grouping), max_grad_norm=0.01, aligned_calls=True
    )
    _assert_exact(got, want, norms, ref_norms, tol=1e-9)


def test_two_forward_calls_without_aligned_calls_are_refused() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(5, 6)
    with ClippingEngine(model), pytest.raises(PassError, match="aligned_calls=True"):
        _two_view(model, (x, x)).mean().backward()
    assert model[0].weight.grad is None
