"""Sentence classification: fine-tune the pretrained all-MiniLM-L6-v2 on Rotten Tomatoes review snippets.

Data:
    ``rotten-tomatoes``: 12,808 snippets (fresh = 1, rotten = 0) split by a fixed permutation (seed 0, so the test
        set is the same in every run); texts are tokenized once up front (truncated to ``max_length``, no padding).
Model:
    ``minilm``: the all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384, 22.7 M parameters) with a new 2-way linear
        head, initialised under ``torch.manual_seed(seed)``. ``pooling = "cls"``: ``BertForSequenceClassification``
        (the head reads ``[CLS]`` through the BERT pooler, whose weights the checkpoint carries); ``"mean"``: the head
        reads the mean of the last hidden states over the attended tokens -- the pooling the sentence-transformers
        model was trained with. ``train = "all"`` fine-tunes every weight (``freeze_embeddings`` keeps the embedding
        tables fixed); ``"bitfit"`` fine-tunes the biases, the LayerNorms and the head only (Ben Zaken et al. 2022;
        in DP, Bu et al. 2022: far fewer noisy coordinates); ``"head"`` only the linear head (a linear probe);
        ``"lora"`` rank-``lora_rank`` adapters (PEFT, Hu et al. 2022) on every attention query and value projection,
        plus the head (the pretrained weights stay frozen).

Batches are ``(input_ids [B, T], attention_mask [B, T], labels [B])``. ``collate`` orders a batch's examples by
length (longest first), so the physical chunks that the runner cuts from a logical batch hold similar lengths,
and ``loss`` drops the padding columns that no example of its chunk uses. Neither changes the loss's value: the
sum of per-example losses does not depend on the order, and trailing padding is masked out of attention.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..datasets import TextSplit, load_rotten_tomatoes, minilm_path
from ..recipe import RecipeError
from . import TaskSetup, model_device, register_task, take_options, to_device

Batch = tuple[Tensor, Tensor, Tensor]
DATA_DEFAULTS: dict[str, Any] = {
    "name": "rotten-tomatoes",
    "test_fraction": 0.2,
    "max_length": 64,
    "limit": 0,
    "test_limit": 0,
    "holdout": 0,
}
MODEL_DEFAULTS: dict[str, Any] = {
    "name": "minilm",
    "freeze_embeddings": False,
    "pooling": "cls",
    "train": "all",
    "lora_rank": 8,
}
POOLINGS = ("cls", "mean")
TRAINED = ("all", "bitfit", "head", "lora")
EVAL_BATCH = 256
_EMBEDDING_WEIGHTS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


class TokenizedText(Dataset):
    """Token-id sequences (1-D long tensors of varying length) and their labels; items are ``(ids, label)``."""

    def __init__(self, ids: list[Tensor], labels: Tensor) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} sequences but {len(labels)} labels.")
        self.ids = ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.ids[index], self.labels[index]


class PadCollate:
    """Pads a list of ``(ids, label)`` items into ``(input_ids, attention_mask, labels)``, longest example first.

    An empty list (a Poisson batch can be empty) gives tensors with batch size 0: ``[0, 1]``, ``[0, 1]``, ``[0]``.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> Batch:
        if not items:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return empty, empty.clone(), torch.zeros(0, dtype=torch.long)
        items = sorted(items, key=lambda item: -len(item[0]))  # stable: ties keep their order
        width = len(items[0][0])
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        labels = torch.stack([torch.as_tensor(label, dtype=torch.long) for _, label in items])
        return input_ids, attention_mask, labels


def trim_padding(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing columns that no row attends to (keeps at least one column)."""
    used = int(attention_mask.sum(1).max()) if attention_mask.shape[0] else 1
    width = max(used, 1)
    return input_ids[:, :width], attention_mask[:, :width]


def sequence_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The SUM over the batch of the per-example cross-entropies (padding columns unused by the batch dropped)."""
    input_ids, attention_mask, labels = batch
    input_ids, attention_mask = trim_padding(input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits, labels, reduction="sum")


def _eval_batches(data: TokenizedText, collate: PadCollate, size: int = EVAL_BATCH) -> Iterator[Batch]:
    """``data`` in padded batches of ``size``, in order of length (so each batch pads little)."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), size):
        yield collate([data[i] for i in order[start : start + size]])


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, data: TokenizedText, collate: PadCollate) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode; the previous mode restored)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        device = model_device(model)
        for batch in _eval_batches(data, collate):
            input_ids, attention_mask, labels = to_device(batch, device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / max(len(data), 1), loss / max(len(data), 1)


def load_splits(data: dict[str, Any]) -> tuple[TextSplit, TextSplit]:
    """The train and evaluation splits (split seed 0: the same test set in every run), cut to the limits. With
    ``holdout = N`` the evaluation split is the last N training examples (a validation set for tuning: the test set
    is not read) and training uses the rest."""
    train, test = load_rotten_tomatoes(data["test_fraction"], seed=0)
    if data["holdout"]:
        if data["holdout"] >= len(train.texts):
            raise RecipeError(
                f"[data] holdout = {data['holdout']}: must be below the {len(train.texts)} training examples."
            )
        cut = len(train.texts) - data["holdout"]
        train, test = (
            TextSplit(train.texts[:cut], train.labels[:cut]),
            TextSplit(train.texts[cut:], train.labels[cut:]),
        )
    if data["limit"]:
        train = TextSplit(train.texts[: data["limit"]], train.labels[: data["limit"]])
    if data["test_limit"]:
        test = TextSplit(test.texts[: data["test_limit"]], test.labels[: data["test_limit"]])
    return train, test


def split_name(data: dict[str, Any]) -> str:
    """``"val"`` when evaluating on a held-out part of the training set, else ``"test"``."""
    return "val" if data["holdout"] else "test"


def tokenize(tokenizer: Any, split: TextSplit, max_length: int) -> TokenizedText:
    """Tokenize every text once (truncated to ``max_length``, no padding)."""
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    ids = [torch.tensor(seq, dtype=torch.long) for seq in encoded]
    return TokenizedText(ids, torch.tensor(split.labels, dtype=torch.long))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading report and progress bar (the new classifier head is expected to be missing)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_minilm(options: dict[str, Any], seed: int) -> tuple[Any, nn.Module, set[str]]:
    """The tokenizer, the classifier (train mode, float32) and the names of the weights it initialised afresh."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    with _quiet_transformers():
        net, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, dtype=torch.float32, output_loading_info=True
        )
    missing = set(loading["missing_keys"])
    if options["pooling"] == "mean":
        torch.manual_seed(seed)
        net = MeanPooledClassifier(net.base_model, num_labels=2)
        missing = {"head.weight", "head.bias"}
    net.train()  # from_pretrained returns eval mode
    if options["freeze_embeddings"]:
        freeze_embeddings(net)
    if options["train"] == "bitfit":
        keep_biases_norms_and_head(net)
    elif options["train"] == "head":
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith(("head.", "classifier.")))
    elif options["train"] == "lora":
        missing |= add_lora(net, options["lora_rank"], seed)
    return tokenizer, net, missing


def add_lora(net: nn.Module, rank: int, seed: int) -> set[str]:
    """Rank-``rank`` LoRA adapters on the attention query and value projections (PEFT); train only them and the
    head. Returns the adapters' parameter names (new weights)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"])
    inject_adapter_in_model(config, net.base_model)
    adapters = set()
    for name, param in net.named_parameters():
        adapter = "lora_" in name
        param.requires_grad_(adapter or name.startswith(("head.", "classifier.")))
        if adapter:
            adapters.add(name)
    return adapters


@dataclass
class ClassifierOutput:
    """What the loss reads from a classifier's output (as Hugging Face's ``SequenceClassifierOutput.logits``)."""

    logits: Tensor


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of ``hidden`` ``[B, T, d]`` over each row's attended tokens, ``[B, d]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class MeanPooledClassifier(nn.Module):
    """A linear head on the mean of the encoder's last hidden states over the attended tokens."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.pooler = None  # unused: its weights would get no gradient
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> ClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return ClassifierOutput(logits=self.head(mean_pool(hidden, attention_mask)))


def keep_biases_norms_and_head(net: nn.Module) -> None:
    """BitFit: train only bias vectors, LayerNorm weights and the classification head."""
    for name, param in net.named_parameters():
        head = name.startswith(("head.", "classifier."))
        param.requires_grad_(head or name.endswith(".bias") or "LayerNorm" in name)


def freeze_embeddings(net: nn.Module) -> None:
    """Stop training the word, position and token-type embedding tables (their LayerNorm still trains)."""
    embeddings = net.base_model.embeddings
    for name in _EMBEDDING_WEIGHTS:
        getattr(embeddings, name).weight.requires_grad_(False)


def check_options(data: dict[str, Any], model: dict[str, Any]) -> None:
    """Reject unsupported names and out-of-range values before anything is loaded."""
    if data["name"] != "rotten-tomatoes":
        raise RecipeError(f"[data] name = {data['name']!r}: the sentence-classification task reads 'rotten-tomatoes'.")
    if model["name"] != "minilm":
        raise RecipeError(f"[model] name = {model['name']!r}: the sentence-classification task builds 'minilm'.")
    if not isinstance(data["test_fraction"], int | float) or not 0 < data["test_fraction"] < 1:
        raise RecipeError(f"[data] test_fraction = {data['test_fraction']!r}: expected a number in (0, 1).")
    for key in ("max_length", "limit", "test_limit", "holdout"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
            raise RecipeError(f"[data] {key} = {data[key]!r}: expected a non-negative integer.")
    if data["max_length"] < 2:
        raise RecipeError(f"[data] max_length = {data['max_length']!r}: expected an integer >= 2 ([CLS] and [SEP]).")
    if model["pooling"] not in POOLINGS or model["train"] not in TRAINED:
        raise RecipeError(
            f"[model] pooling = {model['pooling']!r}, train = {model['train']!r}: expected pooling in {POOLINGS} "
            f"and train in {TRAINED}."
        )
    rank = model["lora_rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise RecipeError(f"[model] lora_rank = {rank!r}: expected an integer >= 1.")
    if not isinstance(model["freeze_embeddings"], bool):
        raise RecipeError(f"[model] freeze_embeddings = {model['freeze_embeddings']!r}: expected true or false.")


@register_task("sentence-classification")
def build_sentence_classification(data: dict[str, Any], model: dict[str, Any], seed: int) -> TaskSetup:
    """Sentence classification; ``[data]``: name, test_fraction, max_length, limit, test_limit, holdout;
    ``[model]``: name, freeze_embeddings, pooling, train, lora_rank."""
    data = take_options("data", data, DATA_DEFAULTS)
    model = take_options("model", model, MODEL_DEFAULTS)
    check_options(data, model)
    train_text, test_text = load_splits(data)
    tokenizer, net, fresh = load_minilm(model, seed)
    train = tokenize(tokenizer, train_text, data["max_length"])
    test = tokenize(tokenizer, test_text, data["max_length"])
    collate = PadCollate(tokenizer.pad_token_id)
    split = split_name(data)

    def evaluate(net: nn.Module) -> dict[str, float]:
        acc, mean_loss = accuracy_and_loss(net, test, collate)
        return {f"{split}_accuracy": acc, f"{split}_loss": mean_loss}

    return TaskSetup(
        model=net,
        train=train,
        loss=sequence_loss,
        evaluate=evaluate,
        headline=f"{split}_accuracy",
        higher_is_better=True,
        example_batch=collate([train[i] for i in range(min(4, len(train)))]),
        collate=collate,
        info={
            "data": data["name"],
            "train_size": len(train),
            f"{split}_size": len(test),
            "max_length": data["max_length"],
            "model": "all-MiniLM-L6-v2",
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "pooling": model["pooling"],
            "trained": model["train"],
            "pooler": "random init" if any("pooler" in k for k in fresh) else "pretrained",
            "new_weights": sorted(fresh),
        },
    )
