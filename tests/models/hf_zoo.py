"""Tiny Hugging Face models built from configs (random weights, offline), called as users call them.

Each entry builds a model and gives a per-sample loss ``(model, batch) -> [B]`` and a batch ``(B, T) -> tuple``:
token-level cross-entropy averaged per sample for language models (encoder-decoders: on the decoder tokens), and
per-sample cross-entropy for sequence classifiers. Dropout is 0 so the float64 per-sample reference (one sample at
a time) sees the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, FFN, LAYERS, CLASSES = 48, 16, 2, 32, 2, 3


@dataclass(frozen=True)
class ZooCase:
    build: Callable[[], nn.Module]
    kind: str  # "lm" (causal LM), "cls" (sequence classification), "mlm" (masked LM), "s2s" (encoder-decoder)


def _lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (ids,) = batch
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _mlm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (ids,) = batch
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)


def _cls_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    ids, labels = batch
    return F.cross_entropy(model(input_ids=ids).logits, labels, reduction="none")


def _s2s_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    ids, targets = batch
    logits = model(input_ids=ids, labels=targets).logits
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


LOSSES = {"lm": _lm_loss, "mlm": _mlm_loss, "cls": _cls_loss, "s2s": _s2s_loss}


def make_batch(kind: str, batch: int, steps: int, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, steps), generator=gen)  # ids 0-3 are kept for special tokens
    if kind == "cls":
        return ids, torch.randint(0, CLASSES, (batch,), generator=gen)
    if kind == "s2s":
        return ids, torch.randint(4, VOCAB, (batch, steps), generator=gen)
    return (ids,)


def _t():
    import transformers

    return transformers


def _special() -> dict:
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def zoo() -> dict[str, ZooCase]:
    """name -> case (transformers imported lazily)."""
    t = _t()
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": FFN}
    layers = {"num_hidden_layers": LAYERS}
    nodrop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    decoder = {**common, **layers, "num_key_value_heads": 1, "max_position_embeddings": 32, **_special()}
    cases = {
        "bert": ZooCase(
            lambda: t.BertForSequenceClassification(
                t.BertConfig(**common, **layers, **nodrop, num_labels=CLASSES, max_position_embeddings=32)
            ),
            "cls",
        ),
        "roberta": ZooCase(
            lambda: t.RobertaForMaskedLM(
                t.RobertaConfig(**common, **layers, **nodrop, max_position_embeddings=40, pad_token_id=1)
            ),
            "mlm",
        ),
        "distilbert": ZooCase(
            lambda: t.DistilBertForSequenceClassification(
                t.DistilBertConfig(
                    vocab_size=VOCAB,
                    dim=HIDDEN,
                    n_heads=HEADS,
                    hidden_dim=FFN,
                    n_layers=LAYERS,
                    dropout=0.0,
                    attention_dropout=0.0,
                    seq_classif_dropout=0.0,
                    num_labels=CLASSES,
                    max_position_embeddings=32,
                )
            ),
            "cls",
        ),
        "electra": ZooCase(
            lambda: t.ElectraForSequenceClassification(
                t.ElectraConfig(
                    **common, **layers, **nodrop, embedding_size=8, num_labels=CLASSES, max_position_embeddings=32
                )
            ),
            "cls",
        ),
        "albert": ZooCase(
            lambda: t.AlbertForMaskedLM(
                t.AlbertConfig(
                    **common,
                    **layers,
                    embedding_size=8,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                    classifier_dropout_prob=0.0,
                    max_position_embeddings=32,
                )
            ),
            "mlm",
        ),
        "gpt2": ZooCase(
            lambda: t.GPT2LMHeadModel(
                t.GPT2Config(
                    vocab_size=VOCAB,
                    n_embd=HIDDEN,
                    n_head=HEADS,
                    n_layer=LAYERS,
                    n_positions=32,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                    bos_token_id=1,
                    eos_token_id=2,
                )
            ),
            "lm",
        ),
        "gpt-neo": ZooCase(
            lambda: t.GPTNeoForCausalLM(
                t.GPTNeoConfig(
                    vocab_size=VOCAB,
                    hidden_size=HIDDEN,
                    num_heads=HEADS,
                    num_layers=LAYERS,
                    attention_types=[[["global", "local"], 1]],
                    window_size=4,
                    max_position_embeddings=32,
                    intermediate_size=FFN,
                    resid_dropout=0.0,
                    embed_dropout=0.0,
                    attention_dropout=0.0,
                    bos_token_id=1,
                    eos_token_id=2,
                )
            ),
            "lm",
        ),
        "llama": ZooCase(lambda: t.LlamaForCausalLM(t.LlamaConfig(**decoder)), "lm"),
        "mistral": ZooCase(lambda: t.MistralForCausalLM(t.MistralConfig(**decoder, sliding_window=4)), "lm"),
        "qwen2": ZooCase(lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**decoder)), "lm"),
        "gemma": ZooCase(lambda: t.GemmaForCausalLM(t.GemmaConfig(**decoder, head_dim=8)), "lm"),
        "phi": ZooCase(
            lambda: t.PhiForCausalLM(
                t.PhiConfig(
                    **common,
                    **layers,
                    max_position_embeddings=32,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attention_dropout=0.0,
                    **_special(),
                )
            ),
            "lm",
        ),
        "bloom": ZooCase(
            lambda: t.BloomForCausalLM(
                t.BloomConfig(
                    vocab_size=VOCAB,
                    hidden_size=HIDDEN,
                    n_head=HEADS,
                    n_layer=LAYERS,
                    hidden_dropout=0.0,
                    attention_dropout=0.0,
                    **_special(),
                )
            ),
            "lm",
        ),
        "opt": ZooCase(
            lambda: t.OPTForCausalLM(
                t.OPTConfig(
                    vocab_size=VOCAB,
                    hidden_size=HIDDEN,
                    num_attention_heads=HEADS,
                    num_hidden_layers=LAYERS,
                    ffn_dim=FFN,
                    max_position_embeddings=32,
                    word_embed_proj_dim=HIDDEN,
                    dropout=0.0,
                    attention_dropout=0.0,
                    pad_token_id=0,
                    bos_token_id=1,
                    eos_token_id=2,
                )
            ),
            "lm",
        ),
        "deberta-v2": ZooCase(
            lambda: t.DebertaV2ForSequenceClassification(
                t.DebertaV2Config(
                    **common,
                    **layers,
                    **nodrop,
                    max_position_embeddings=32,
                    relative_attention=True,
                    position_buckets=4,
                    max_relative_positions=8,
                    pos_att_type=["p2c", "c2p"],
                    norm_rel_ebd="layer_norm",
                    num_labels=CLASSES,
                    type_vocab_size=0,
                )
            ),
            "cls",
        ),
        "bart": ZooCase(
            lambda: t.BartForConditionalGeneration(
                t.BartConfig(
                    vocab_size=VOCAB,
                    d_model=HIDDEN,
                    encoder_layers=LAYERS,
                    decoder_layers=LAYERS,
                    encoder_attention_heads=HEADS,
                    decoder_attention_heads=HEADS,
                    encoder_ffn_dim=FFN,
                    decoder_ffn_dim=FFN,
                    max_position_embeddings=32,
                    dropout=0.0,
                    attention_dropout=0.0,
                    activation_dropout=0.0,
                    decoder_start_token_id=2,
                    **_special(),
                )
            ),
            "s2s",
        ),
        "t5": ZooCase(
            lambda: t.T5ForConditionalGeneration(
                t.T5Config(
                    vocab_size=VOCAB,
                    d_model=HIDDEN,
                    d_kv=8,
                    d_ff=FFN,
                    num_layers=LAYERS,
                    num_decoder_layers=LAYERS,
                    num_heads=HEADS,
                    relative_attention_num_buckets=8,
                    dropout_rate=0.0,
                    decoder_start_token_id=0,
                    pad_token_id=0,
                    eos_token_id=2,
                )
            ),
            "s2s",
        ),
    }
    return cases
