"""Tiny Hugging Face models built from configs (no downloads) and token data sets with padding, for the
integration tests."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

VOCAB = 32
HIDDEN = 16


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer GPT-2 (tied embeddings), no dropout, eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
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
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype)


def bert_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 3) -> torch.nn.Module:
    """A 2-layer BERT sequence classifier, no dropout, eager attention."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).to(dtype)


class TokenData(Dataset):
    """``n`` token sequences of lengths 3..8 (ids 1..VOCAB-1; 0 pads), with a class label each."""

    def __init__(self, n: int, seed: int = 1, num_labels: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 9, (n,), generator=g).tolist()
        self.ids = [torch.randint(1, VOCAB, (length,), generator=g) for length in lengths]
        self.labels = torch.randint(0, num_labels, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "label": self.labels[index]}


def _pad(items: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return ids, mask


def lm_collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask``; ``labels`` are the ids with padding at -100."""
    ids, mask = _pad(items)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def cls_collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and the class ``labels``."""
    ids, mask = _pad(items)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["label"] for item in items])}


def training_args(out: str, **overrides: Any):
    """CPU, quiet, no reports, no saving, constant learning rate; ``overrides`` win."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=out,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        lr_scheduler_type="constant",
        per_device_train_batch_size=3,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def seed_kwargs(seed: int) -> dict[str, Any]:
    """make_private's seed argument (the noise and the sampler): ``noise_seed``, or ``seed`` before it existed."""
    from groupclip import make_private

    return {"noise_seed" if "noise_seed" in inspect.signature(make_private).parameters else "seed": seed}


def trainable(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
