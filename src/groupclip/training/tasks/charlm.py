"""Character-level language modelling from scratch: a small GPT-2 on Shakespeare's plays; headline: val perplexity.

A training sample -- the unit of DP privacy -- is one non-overlapping chunk of ``block_size + 1`` characters of the
training text, as ``(inputs, targets) = (chunk[:-1], chunk[1:])``. A sample's loss is the mean token cross-entropy
over its block, so it is O(1) like a classification loss and clipping thresholds are comparable across tasks.

``[data]`` (defaults in :data:`DATA_DEFAULTS`):
    ``name``: ``"shakespeare"`` (the only corpus).
    ``block_size``: context length T (each sample is T + 1 characters).
    ``val_fraction``: the held-out tail of the text (see :func:`groupclip.training.datasets.load_shakespeare`).
    ``plays``: 0 = all 38 plays; n > 0 = only the first n (quick runs, tests).
    ``train_chars``: 0 = the whole training split; n > 0 = only its first n characters.
    ``val_chars``: 0 = the whole validation split (~530k characters for all plays); n > 0 = only its first n
        characters (evaluation cost is linear in it).

``[model]`` (defaults in :data:`MODEL_DEFAULTS`): ``n_layer``, ``n_embd``, ``n_head``, ``dropout`` of a randomly
initialised ``transformers.GPT2LMHeadModel`` (tied input/output embeddings, ``n_positions = block_size``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..datasets import CharCorpus, load_shakespeare
from ..recipe import RecipeError
from . import TaskSetup, model_device, register_task, take_options, to_device

DATA_DEFAULTS: dict[str, Any] = {
    "name": "shakespeare",
    "block_size": 128,
    "val_fraction": 0.1,
    "plays": 0,
    "train_chars": 0,
    "val_chars": 0,
}
MODEL_DEFAULTS: dict[str, Any] = {"n_layer": 4, "n_embd": 128, "n_head": 4, "dropout": 0.0}
EVAL_BATCH = 64


def chunk_dataset(ids: Tensor, block_size: int) -> TensorDataset:
    """Non-overlapping chunks of ``block_size + 1`` ids as items ``(chunk[:-1], chunk[1:])``; drops a short tail."""
    count = len(ids) // (block_size + 1)
    chunks = ids[: count * (block_size + 1)].view(count, block_size + 1)
    return TensorDataset(chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous())


def collate_chunks(items: list[tuple[Tensor, Tensor]], block_size: int = 0) -> tuple[Tensor, Tensor]:
    """Stack ``(inputs, targets)`` items; an empty list (an empty Poisson batch) gives two empty ``[0, block_size]``
    long tensors (``torch``'s default collate fails on an empty list)."""
    if not items:
        return torch.empty(0, block_size, dtype=torch.long), torch.empty(0, block_size, dtype=torch.long)
    inputs, targets = zip(*items, strict=True)
    return torch.stack(inputs), torch.stack(targets)


def per_sample_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Each sample's mean token cross-entropy over its block, shape ``[B]``."""
    inputs, targets = batch
    logits = model(input_ids=inputs).logits
    token_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return token_losses.view(targets.shape).mean(1)


def summed_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The SUM over the batch of the per-sample (mean-token) losses.

    An empty batch (GPT-2 cannot run on one) gives a zero that touches no parameter: its backward adds nothing."""
    if batch[0].shape[0] == 0:
        return torch.zeros((), requires_grad=True)
    return per_sample_loss(model, batch).sum()


@torch.no_grad()
def mean_token_loss(model: nn.Module, data: TensorDataset, batch: int = EVAL_BATCH) -> float:
    """Mean token cross-entropy of ``model`` over ``data`` (eval mode; the previous mode is restored)."""
    was_training = model.training
    model.eval()
    inputs, targets = data.tensors
    device = model_device(model)
    total = 0.0
    try:
        for start in range(0, len(inputs), batch):
            chunk = to_device((inputs[start : start + batch], targets[start : start + batch]), device)
            total += float(per_sample_loss(model, chunk).sum())
    finally:
        model.train(was_training)
    return total / max(1, len(inputs))


def language_metrics(mean_loss: float) -> dict[str, float]:
    """Loss (nats per character), perplexity and bits per character."""
    return {"val_loss": mean_loss, "val_perplexity": math.exp(mean_loss), "val_bits_per_char": mean_loss / math.log(2)}


def gpt2(vocab_size: int, block_size: int, options: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (tied embeddings) of the given size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if options["n_embd"] % options["n_head"]:
        raise RecipeError(f"[model] n_embd = {options['n_embd']} must be a multiple of n_head = {options['n_head']}.")
    dropout = float(options["dropout"])
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=options["n_embd"],
        n_layer=options["n_layer"],
        n_head=options["n_head"],
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def _corpus(data: dict[str, Any]) -> CharCorpus:
    if data["name"] != "shakespeare":
        raise RecipeError(f"[data] name = {data['name']!r}: the char-lm task reads only 'shakespeare'.")
    for key, least in (("block_size", 1), ("plays", 0), ("train_chars", 0), ("val_chars", 0)):
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise RecipeError(f"[data] {key} = {value!r}: expected an integer >= {least}.")
    if not 0 < data["val_fraction"] < 1:
        raise RecipeError(f"[data] val_fraction = {data['val_fraction']!r}: expected a number in (0, 1).")
    corpus = load_shakespeare(data["val_fraction"], data["plays"] or None)
    train = corpus.train[: data["train_chars"]] if data["train_chars"] else corpus.train
    val = corpus.val[: data["val_chars"]] if data["val_chars"] else corpus.val
    return CharCorpus(corpus.vocab, train, val)


@register_task("char-lm")
def build_char_lm(data: dict[str, Any], model: dict[str, Any], seed: int) -> TaskSetup:
    """Character-level GPT-2 on Shakespeare; ``[data]`` and ``[model]`` keys: see the module docstring."""
    data = take_options("data", data, DATA_DEFAULTS)
    model = take_options("model", model, MODEL_DEFAULTS)
    corpus = _corpus(data)
    block = data["block_size"]
    train, val = chunk_dataset(corpus.train, block), chunk_dataset(corpus.val, block)
    if len(val) == 0:
        raise RecipeError(f"[data] the validation text ({len(corpus.val)} characters) is shorter than one block.")
    collate = partial(collate_chunks, block_size=block)
    torch.manual_seed(seed)
    net = gpt2(len(corpus.vocab), block, model)

    def evaluate(net: nn.Module) -> dict[str, float]:
        return language_metrics(mean_token_loss(net, val))

    return TaskSetup(
        model=net,
        train=train,
        loss=summed_loss,
        evaluate=evaluate,
        headline="val_perplexity",
        higher_is_better=False,
        example_batch=collate([train[i] for i in range(min(2, len(train)))]),
        collate=collate,
        info={
            "data": data["name"],
            "vocab_size": len(corpus.vocab),
            "train_chars": len(corpus.train),
            "val_chars": len(corpus.val),
            "train_chunks": len(train),
            "val_chunks": len(val),
            "block_size": block,
            "parameters": sum(p.numel() for p in net.parameters()),
        },
    )
