"""A DP linear probe: a linear classifier on frozen all-MiniLM-L6-v2 sentence embeddings (Rotten Tomatoes).

The encoder is not trained, so each text's embedding -- the mean of the last hidden states over its tokens,
L2-normalised, as sentence-transformers computes it -- is a fixed per-example map, computed once (and cached on
disk) and costing no privacy; DP-SGD then trains only the 384 x 2 linear head. It is the baseline every DP
fine-tuning recipe must beat.

Data and split are the ``sentence-classification`` task's (same fixed test set); batches are
``(embeddings [B, 384], labels [B])``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..tensor_cache import cached_tensor, digest
from . import TaskSetup, model_device, register_task, take_options
from .text import (
    DATA_DEFAULTS,
    MODEL_DEFAULTS,
    PadCollate,
    TokenizedText,
    check_options,
    load_minilm,
    load_splits,
    mean_pool,
    split_name,
    tokenize,
)

EMBED_BATCH = 128


@torch.no_grad()
def sentence_embeddings(encoder: nn.Module, data: TokenizedText, collate: PadCollate) -> Tensor:
    """Mean-pooled, L2-normalised last hidden states of ``data`` (in its order), ``[N, hidden]`` float32."""
    encoder.eval()
    out = torch.empty(len(data), encoder.config.hidden_size)
    for start in range(0, len(data), EMBED_BATCH):
        rows = range(start, min(start + EMBED_BATCH, len(data)))
        # PadCollate sorts by length; embed one length-sorted chunk, then put the rows back in place
        order = sorted(rows, key=lambda i: -len(data.ids[i]))
        input_ids, attention_mask, _ = collate([data[i] for i in order])
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out[torch.tensor(order)] = F.normalize(mean_pool(hidden, attention_mask), dim=1)
    return out


def cached_embeddings(split: Any, tokenizer: Any, encoder: nn.Module, max_length: int) -> Tensor:
    """:func:`sentence_embeddings` of ``split``'s texts, computed once and cached on disk (keyed by the texts)."""
    name = f"minilm-embeddings-{digest(repr((max_length, split.texts)).encode())}"
    collate = PadCollate(tokenizer.pad_token_id)
    compute = lambda: sentence_embeddings(encoder, tokenize(tokenizer, split, max_length), collate)  # noqa: E731
    return cached_tensor(name, compute, rows=len(split.texts))


@register_task("sentence-probe")
def build_sentence_probe(data: dict[str, Any], model: dict[str, Any], seed: int) -> TaskSetup:
    """A linear probe on frozen MiniLM embeddings; ``[data]`` as ``sentence-classification``; ``[model]``: name."""
    data = take_options("data", data, DATA_DEFAULTS)
    model = take_options("model", model, {"name": "minilm"})
    frozen = {**MODEL_DEFAULTS, "name": model["name"], "pooling": "mean", "train": "head"}
    check_options(data, frozen)
    train_text, test_text = load_splits(data)
    tokenizer, classifier, _ = load_minilm(frozen, seed)
    encoder = classifier.encoder
    train_x = cached_embeddings(train_text, tokenizer, encoder, data["max_length"])
    test_x = cached_embeddings(test_text, tokenizer, encoder, data["max_length"])
    train_y = torch.tensor(train_text.labels, dtype=torch.long)
    test_y = torch.tensor(test_text.labels, dtype=torch.long)
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], 2)

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="sum")

    split = split_name(data)

    @torch.no_grad()
    def evaluate(net: nn.Module) -> dict[str, float]:
        logits = net(test_x.to(model_device(net)))
        labels = test_y.to(logits.device)
        return {
            f"{split}_accuracy": float((logits.argmax(1) == labels).float().mean()),
            f"{split}_loss": float(F.cross_entropy(logits, labels)),
        }

    return TaskSetup(
        model=head,
        train=TensorDataset(train_x, train_y),
        loss=loss,
        evaluate=evaluate,
        headline=f"{split}_accuracy",
        higher_is_better=True,
        example_batch=(train_x[:4], train_y[:4]),
        info={
            "data": data["name"],
            "train_size": len(train_y),
            f"{split}_size": len(test_y),
            "max_length": data["max_length"],
            "model": "linear head on frozen all-MiniLM-L6-v2 (mean-pooled, normalised)",
            "trainable_parameters": sum(p.numel() for p in head.parameters()),
        },
    )
