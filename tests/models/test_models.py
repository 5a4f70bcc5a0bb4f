"""Whole-model exactness: the engine's clipped sums and per-sample norms equal the float64 torch.func reference.

Every model is run in float64 (``.double()``) against :mod:`reference` for every kind of grouping spec and both
built-in clip functions, with a threshold small enough that clipping changes the result.

Error metric: some parameters have a true gradient of (numerically) zero -- e.g. attention key biases, to which the
softmax is invariant -- so a plain per-tensor relative error would divide rounding noise by ~0. Each tensor's error is
therefore measured relative to ``max(||want_n||, 1e-3 * ||want_all||)``, and the global relative error is checked too.
With a tolerance of 1e-6 this still catches any absolute error above 1e-9 of the whole clipped gradient -- a dropped or
wrongly clipped tensor fails unless its entire gradient is below that -- while ignoring float64 rounding noise in
gradients that are mathematically zero (ViT's key biases: ~1e-13 of the total, amplified by automatic clipping).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from groupclip import ClippingEngine
from reference import check_engine, per_sample_gradients, reference_clip

B, T, VOCAB, HIDDEN = 3, 6, 40, 16


GROUPINGS = ["all-layer", "layer-wise", "param-wise", 3, "patterns", "callable"]


# ---------------------------------------------------------------------- error metrics
def tensor_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """name -> ||got_n - want_n|| / max(||want_n||, 1e-3 ||want_all||)."""
    total = math.sqrt(sum(float(w.double().pow(2).sum()) for w in want.values()))
    floor = max(1e-3 * total, 1e-300)
    return {
        n: float((got[n].double() - w.double()).norm()) / max(float(w.double().norm()), floor) for n, w in want.items()
    }


def global_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[n].double() - w.double()).pow(2).sum()) for n, w in want.items())
    den = sum(float(w.double().pow(2).sum()) for w in want.values())
    return math.sqrt(num / den)


def norm_errors(norms: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """group -> max_i |norm_ik - ref_ik| / max(max_i ref_ik, 1e-3 max_i ||g_i||) (same floor as for tensors)."""
    assert set(norms) == set(ref)
    total = torch.stack([r.double() for r in ref.values()]).pow(2).sum(0).sqrt().max()
    floor = max(1e-3 * float(total), 1e-300)
    return {
        g: float((norms[g].double() - ref[g].double()).abs().max()) / max(float(ref[g].double().abs().max()), floor)
        for g in ref
    }


def assert_exact(got, want, norms, ref_norms, tol):
    errs = tensor_errors(got, want)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"worst tensor {worst}: rel err {errs[worst]:.3e} > {tol}"
    assert global_error(got, want) <= tol
    nerrs = norm_errors(norms, ref_norms)
    worst_g = max(nerrs, key=nerrs.get)
    assert nerrs[worst_g] <= tol, f"per-sample norms of group {worst_g}: rel err {nerrs[worst_g]:.3e} > {tol}"


# ---------------------------------------------------------------------- models
@dataclass
class Case:
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]  # per-sample losses [B]
    patterns: dict[str, list[str]]  # non-overlapping explicit groups covering every parameter
    max_grad_norm: float
    hf: bool = False


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (ids,) = batch
    logits = model(input_ids=ids).logits
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.view(ids.shape[0], -1).mean(1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    )


def _gpt2_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
        **kw,
    )


def _gpt2() -> nn.Module:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(_gpt2_config())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, the default
    return model


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def _bert_batch() -> tuple:
    ids = torch.randint(1, VOCAB, (B, T))
    token_types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    return ids, token_types, torch.randint(0, 3, (B,))


def _bert_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    ids, token_types, labels = batch
    return _ce(model(input_ids=ids, token_type_ids=token_types).logits, labels)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation="eager",
    )
    model = ViTForImageClassification(config)
    # The cls token and position embeddings are raw parameters (no nn.Linear/Embedding owns them); start them
    # away from zero so that their gradients are not trivially small.
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_(std=0.5)
    return model


def _vit_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    pixels, labels = batch
    return _ce(model(pixel_values=pixels).logits, labels)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


CASES: dict[str, Case] = {
    "mlp": Case(
        _mlp,
        lambda: (torch.randn(B, 8), torch.randint(0, 4, (B,))),
        lambda m, b: _ce(m(b[0]), b[1]),
        {"first": ["0.*"], "rest": ["re:[24]\\.(weight|bias)"]},
        max_grad_norm=0.3,
    ),
    "cnn": Case(
        _cnn,
        lambda: (torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))),
        lambda m, b: _ce(m(b[0]), b[1]),
        {"convs": ["0.*", "4.*"], "norm": ["1.*"], "head": ["re:8\\..*"]},
        max_grad_norm=0.3,
    ),
    "gpt2": Case(
        _gpt2,
        lambda: (torch.randint(0, VOCAB, (B, T)),),
        _lm_loss,
        # lm_head.weight is an alias of transformer.wte.weight: a pattern on the alias selects the tied tensor.
        {"emb": ["lm_head.weight", "*wpe*"], "blocks": ["transformer.h.*"], "final": ["transformer.ln_f.*"]},
        max_grad_norm=0.5,
        hf=True,
    ),
    "bert": Case(
        _bert,
        _bert_batch,
        _bert_loss,
        {"emb": ["bert.embeddings.*"], "enc": ["re:bert\\.encoder\\..*"], "head": ["bert.pooler.*", "classifier.*"]},
        max_grad_norm=0.3,
        hf=True,
    ),
    "vit": Case(
        _vit,
        lambda: (torch.randn(B, 3, 8, 8), torch.randint(0, 3, (B,))),
        _vit_loss,
        {
            "raw": ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"],
            "patch": ["vit.embeddings.patch_embeddings.*"],
            "rest": ["re:vit\\.(layers|layernorm)\\..*", "classifier.*"],
        },
        max_grad_norm=0.3,
        hf=True,
    ),
    "llama": Case(
        _llama,
        lambda: (torch.randint(0, VOCAB, (B, T)),),
        _lm_loss,
        {"emb": ["model.embed_tokens.*"], "layers": ["model.layers.*"], "out": ["model.norm.*", "lm_head.*"]},
        max_grad_norm=0.5,
        hf=True,
    ),
}


def _by_rank(name: str, p: torch.Tensor) -> str:
    """A callable grouping: matrices apart from vectors (and from the raw >2-d tensors)."""
    return {1: "vectors", 2: "matrices"}.get(p.dim(), "tensors")


def _spec(case: Case, grouping):
    if grouping == "patterns":
        return case.patterns
    if grouping == "callable":
        return _by_rank
    return grouping


def _cases():
    """Every model x every grouping x both clip functions (72 cases, ~0.1 s each once transformers is imported)."""
    out = []
    for name, case in CASES.items():
        marks = [pytest.mark.hf] if case.hf else []
        for grouping in GROUPINGS:
            for clip in ("abadi", "automatic"):
                out.append(pytest.param(name, grouping, clip, marks=marks, id=f"{name}-{grouping}-{clip}"))
    return out


@pytest.mark.parametrize(("model_name", "grouping", "clip_fn"), _cases())
def test_exact_float64(model_name, grouping, clip_fn):
    if CASES[model_name].hf:
        pytest.importorskip("transformers")
    case = CASES[model_name]
    torch.manual_seed(list(CASES).index(model_name))
    model = case.build().double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in case.batch())
    reduction = "sum" if grouping in ("param-wise", 3) else "mean"
    engine, got, want, norms, ref_norms = check_engine(
        model,
        case.loss,
        batch,
        reduction=reduction,
        grouping=_spec(case, grouping),
        clip_fn=clip_fn,
        max_grad_norm=case.max_grad_norm,
    )
    assert_exact(got, want, norms, ref_norms, tol=1e-6)
    # Every trainable parameter got a gradient, and the clipped sums are not all zero.
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert sum(float(w.norm()) for w in want.values()) > 0
    # Clipping is active: some factor actually scales a sample's gradient down.
    factors = torch.cat(list(engine.last_report.clip_factors.values()))
    assert bool((factors < 1 - 1e-3).any()), "threshold too large: no sample was clipped"
    if clip_fn == "abadi":
        # ... and the clipped per-sample norms respect their thresholds.
        for g, f in engine.last_report.clip_factors.items():
            assert bool((f * engine.last_report.per_sample_norms[g] <= engine.thresholds[g] * (1 + 1e-9)).all())
    # Thresholds R/sqrt(M) -> total sensitivity R whatever the grouping.
    assert engine.sensitivity == pytest.approx(case.max_grad_norm)
    M = len(engine.grouping.groups)
    expected_m = {"all-layer": 1, 3: 3, "param-wise": sum(1 for p in model.parameters() if p.requires_grad)}
    if grouping in expected_m:
        assert expected_m[grouping] == M


@pytest.mark.hf
def test_gpt2_groups_follow_tied_weights():
    """Layer-wise on tied GPT-2: the tied weight is ONE tensor, in its first owner's group (lm_head use included)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _gpt2().double()
    (ids,) = CASES["gpt2"].batch()
    engine, got, want, norms, ref_norms = check_engine(
        model, _lm_loss, (ids,), grouping="layer-wise", max_grad_norm=0.5
    )
    assert engine.grouping.groups["transformer.wte"] == ("transformer.wte.weight",)
    assert all("lm_head" not in n for names in engine.grouping.groups.values() for n in names)
    assert_exact(got, want, norms, ref_norms, tol=1e-6)


# ---------------------------------------------------------------------- other precisions (GPT-2)
@pytest.mark.hf
@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
def test_gpt2_float32(grouping):
    """float32 GPT-2 against the float64 reference of the same (float32-valued) weights: rel err <= 1e-4."""
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    model = _gpt2()
    (ids,) = CASES["gpt2"].batch()
    engine, got, want, norms, ref_norms = check_engine(model, _lm_loss, (ids,), grouping=grouping, max_grad_norm=0.5)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert bool((torch.cat(list(engine.last_report.clip_factors.values())) < 0.999).any())
    assert_exact(got, want, norms, ref_norms, tol=1e-4)


@pytest.mark.hf
def test_gpt2_bfloat16_runs_and_is_close():
    """bfloat16 GPT-2 completes and lands near the float64 reference.

    bfloat16 has an 8-bit significand (unit roundoff 2^-8 ~ 4e-3); every activation, gradient and norm is rounded
    to it through two blocks of matmuls, softmax and LayerNorm, so relative errors of ~5e-3 come from the forward and
    backward alone: plain (non-private) bf16 autograd differs from the float64 gradient sum by the same amount,
    measured below on the same weights. The clipped result must stay within a few times that noise floor and under
    5% -- any real mistake (a dropped use of the tied weight, a missed clip, a wrong broadcast position gradient)
    gives errors of order 1.
    """
    pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = _gpt2().to(torch.bfloat16)
    (ids,) = CASES["gpt2"].batch()
    plain = copy.deepcopy(model)
    engine, got, want, norms, ref_norms = check_engine(
        model, _lm_loss, (ids,), grouping="layer-wise", max_grad_norm=0.5
    )
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert bool((torch.cat(list(engine.last_report.clip_factors.values())) < 0.999).any())

    # The noise floor: plain bf16 autograd's sum of gradients vs the float64 sum of per-sample gradients.
    _lm_loss(plain, (ids,)).sum().backward()
    per_sample = per_sample_gradients(plain, _lm_loss, (ids,))
    floor = global_error({n: p.grad for n, p in plain.named_parameters()}, {n: g.sum(0) for n, g in per_sample.items()})
    assert 0 < floor < 0.02

    error = global_error(got, want)
    assert error <= max(4 * floor, 1e-2), (error, floor)
    assert error <= 0.05
    nerrs = norm_errors(norms, ref_norms)
    assert max(nerrs.values()) <= 0.05, nerrs


@pytest.mark.hf
def test_gpt2_cpu_autocast_bfloat16():
    """float32 GPT-2 run under CPU bf16 autocast (fastDP fails here): completes, writes float32 gradients, and is as
    close to the float64 reference as plain autocast autograd is to the float64 gradient sum (same reasoning as the
    bf16 test above)."""
    pytest.importorskip("transformers")
    torch.manual_seed(4)
    model = _gpt2()
    (ids,) = CASES["gpt2"].batch()
    plain = copy.deepcopy(model)

    def autocast_loss(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _lm_loss(m, batch).float()

    with ClippingEngine(model, grouping="layer-wise", max_grad_norm=0.5) as engine:
        autocast_loss(model, (ids,)).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    per_sample = per_sample_gradients(model, _lm_loss, (ids,))  # float64, no autocast
    want, ref_norms = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)

    autocast_loss(plain, (ids,)).sum().backward()
    floor = global_error({n: p.grad for n, p in plain.named_parameters()}, {n: g.sum(0) for n, g in per_sample.items()})
    assert 0 < floor < 0.02
    error = global_error({n: p.grad for n, p in model.named_parameters()}, want)
    assert error <= max(4 * floor, 1e-2), (error, floor)
    assert max(norm_errors(engine.last_report.per_sample_norms, ref_norms).values()) <= 0.05


# ---------------------------------------------------------------------- common HF variations
PAD_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def _masked_lm_loss(model, batch):
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return (per_token.view(ids.shape[0], -1) * mask[:, 1:]).sum(1)


@pytest.mark.hf
@pytest.mark.parametrize("norm_mode", ["ghost", "instantiate", "auto"])
def test_gpt2_padded_batch_norm_modes(norm_mode):
    """Right-padded batch with an attention mask; ghost norms and instantiation agree with the reference."""
    pytest.importorskip("transformers")
    torch.manual_seed(5)
    model = _gpt2().double()
    ids = torch.randint(0, VOCAB, (B, T))
    _, got, want, norms, ref_norms = check_engine(
        model, _masked_lm_loss, (ids, PAD_MASK), grouping=2, max_grad_norm=0.5, norm_mode=norm_mode
    )
    assert_exact(got, want, norms, ref_norms, tol=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_explicit_per_sample_position_ids(attn):
    """position_ids given per sample ([B, T], different offsets): wpe's per-sample gradients differ by sample."""
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    torch.manual_seed(6)
    config = _gpt2_config()
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config).double()
    ids = torch.randint(0, VOCAB, (B, T))
    positions = torch.stack([torch.arange(T), torch.arange(T) + 2, torch.arange(T) + 5])

    def loss(m, batch):
        ids, pos = batch
        logits = m(input_ids=ids, position_ids=pos).logits
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        return per_token.view(ids.shape[0], -1).mean(1)

    _, got, want, norms, ref_norms = check_engine(
        model, loss, (ids, positions), grouping="layer-wise", max_grad_norm=0.3
    )
    assert_exact(got, want, norms, ref_norms, tol=1e-6)


@pytest.mark.hf
def test_bert_padded_attention_mask():
    pytest.importorskip("transformers")
    torch.manual_seed(7)
    model = _bert().double()
    ids = torch.randint(1, VOCAB, (B, T))

    def loss(m, batch):
        ids, mask, labels = batch
        return _ce(m(input_ids=ids, attention_mask=mask).logits, labels)

    _, got, want, norms, ref_norms = check_engine(
        model, loss, (ids, PAD_MASK, torch.randint(0, 3, (B,))), grouping="param-wise", max_grad_norm=0.3
    )
    assert_exact(got, want, norms, ref_norms, tol=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize("grouping", ["layer-wise", "all-layer"])
def test_llama_tied_embeddings(grouping):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    torch.manual_seed(8)
    config = _llama().config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (ids,) = CASES["llama"].batch()
    _, got, want, norms, ref_norms = check_engine(model, _lm_loss, (ids,), grouping=grouping, max_grad_norm=0.5)
    assert_exact(got, want, norms, ref_norms, tol=1e-6)
