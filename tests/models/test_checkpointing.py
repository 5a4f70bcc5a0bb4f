"""Activation checkpointing: exact with ``use_reentrant`` True and False, torch's and Hugging Face's.

Non-reentrant checkpointing recomputes the region from saved copies of its inputs and checks that the same tensors
are saved again; the engine replays its switches and taps there. Reentrant checkpointing runs the region under
``no_grad`` first; the engine records each call's layouts then and makes its recomputation the use.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from groupclip import ClippingEngine
from reference import per_sample_gradients, reference_clip

pytestmark = pytest.mark.hf


def _lm_loss(model, batch):
    (ids,) = batch
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=3, n_embd=16, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=39, eos_token_id=39,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=40, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _run(model, loss, batch, grouping, **engine_kwargs):
    """The engine's clipped sums and the reference's, on the same (already checkpointing) model."""
    with ClippingEngine(model, grouping=grouping, max_grad_norm=0.05, **engine_kwargs) as engine:
        loss(model, batch).mean().backward()
    return engine, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise", "param-wise"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hugging_face_gradient_checkpointing_is_exact(build, reentrant: bool, grouping: str) -> None:
    torch.manual_seed(0)
    model = build().double().train()
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    per_sample = per_sample_gradients(model, _lm_loss, (ids,))  # before checkpointing (torch.func cannot trace it)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    engine, got = _run(model, _lm_loss, (ids,), grouping)
    want, _ = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
    total = sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
    for n, w in want.items():  # 1e-6: Llama's RMS norm computes in float32
        assert float((got[n] - w).norm()) <= 1e-6 * max(float(w.norm()), 1e-3 * total), n


class Blocks(nn.Module):
    """Plain torch checkpointing of a function that runs two modules and an op between them."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.a, self.norm, self.b = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.reentrant = reentrant

    def region(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.b(torch.tanh(self.norm(self.a(h))) * 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(2):  # the same modules twice: two uses each
            h = self.region(h) if self.reentrant is None else checkpoint(self.region, h, use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_of_a_function_is_exact(reentrant: bool, grouping: str) -> None:
    torch.manual_seed(0)
    model = Blocks(reentrant).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    plain = Blocks(None).double()  # the same function without checkpointing
    plain.load_state_dict(model.state_dict())
    per_sample = per_sample_gradients(plain, loss, (x, y))
    engine, got = _run(model, loss, (x, y), grouping)
    want, _ = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
    for n, w in want.items():
        assert float((got[n] - w).norm()) <= 1e-10 * max(float(w.norm()), 1e-12), n
