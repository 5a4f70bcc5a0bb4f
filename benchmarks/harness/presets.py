"""Benchmark workloads: a model built from a random-init config, one fixed batch, and its loss.

A :class:`~groupclip.planning.Workload` is everything one training step needs. Presets build the models the
benchmark and the planner talk about (GPT-2 small/medium/large with tied embeddings, RoBERTa-base, BERT-base,
ViT-base at 224 with patch 16, the pretrained-size MiniLM, a small GroupNorm CNN, and tiny versions for smoke
runs). Any other model comes in through an importable factory ``"package.module:function"`` called as
``function(batch_size, seq_len)`` that returns a :class:`~groupclip.planning.Workload`.

Example (from the repository root)::

    from benchmarks.harness.presets import build_workload
    work = build_workload("roberta-base", batch_size=8, seq_len=128)
    loss = work.loss()          # mean over samples of the per-sample loss
    loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from groupclip.planning.workload import Workload, load_factory


@dataclass(frozen=True)
class Preset:
    """A named workload: ``build(batch_size, seq_len, seed)``; ``seq_len`` is None for image models."""

    name: str
    summary: str
    build: Callable[[int, int | None, int], Workload]
    default_batch_size: int
    default_seq_len: int | None


def _token_batch(batch_size: int, seq_len: int, vocab: int, seed: int, low: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(low, vocab, (batch_size, seq_len), generator=gen)


def _labels(batch_size: int, classes: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, classes, (batch_size,), generator=gen)


def _gpt2(layers: int, width: int, heads: int, vocab: int = 50257) -> Callable[[int, int | None, int], Workload]:
    def build(batch_size: int, seq_len: int | None, seed: int) -> Workload:
        from transformers import GPT2Config, GPT2LMHeadModel

        seq_len = seq_len or 128
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=max(1024, seq_len),
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        model = GPT2LMHeadModel(config).train()
        ids = _token_batch(batch_size, seq_len, vocab, seed)
        desc = f"GPT2LMHeadModel {layers}x{width}, vocab {vocab}, tied lm_head; batch {batch_size} x seq {seq_len}"
        return Workload(model, {"input_ids": ids}, ids, "lm", desc)

    return build


def _bert_like(
    family: Literal["bert", "roberta"], layers: int, width: int, heads: int, intermediate: int, vocab: int
) -> Callable[[int, int | None, int], Workload]:
    def build(batch_size: int, seq_len: int | None, seed: int) -> Workload:
        import transformers

        seq_len = seq_len or 128
        torch.manual_seed(seed)
        common = dict(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            num_labels=2,
        )
        if family == "roberta":
            config = transformers.RobertaConfig(
                **common, max_position_embeddings=max(514, seq_len + 2), type_vocab_size=1, pad_token_id=1
            )
            model = transformers.RobertaForSequenceClassification(config)
            ids = _token_batch(batch_size, seq_len, vocab, seed, low=3)  # no padding tokens
        else:
            config = transformers.BertConfig(**common, max_position_embeddings=max(512, seq_len))
            model = transformers.BertForSequenceClassification(config)
            ids = _token_batch(batch_size, seq_len, vocab, seed)
        name = type(model).__name__
        desc = f"{name} {layers}x{width}, vocab {vocab}; batch {batch_size} x seq {seq_len}"
        return Workload(model.train(), {"input_ids": ids}, _labels(batch_size, 2, seed), "classify", desc)

    return build


def _vit(layers: int, width: int, heads: int, intermediate: int, image: int = 224, patch: int = 16):
    def build(batch_size: int, seq_len: int | None, seed: int) -> Workload:
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(seed)
        config = ViTConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            image_size=image,
            patch_size=patch,
            num_labels=10,
        )
        model = ViTForImageClassification(config).train()
        gen = torch.Generator().manual_seed(seed + 1)
        pixels = torch.randn(batch_size, 3, image, image, generator=gen)
        desc = f"ViTForImageClassification {layers}x{width}, {image}px patch {patch}; batch {batch_size}"
        return Workload(model, {"pixel_values": pixels}, _labels(batch_size, 10, seed), "classify", desc)

    return build


class SmallCNN(nn.Sequential):
    """Four 3x3 conv blocks with GroupNorm (no BatchNorm: it mixes samples) and a linear head, for 32x32 RGB."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, 2 * width, 4 * width, 4 * width)):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(min(8, out), out), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
        super().__init__(*layers)


def _cnn(width: int) -> Callable[[int, int | None, int], Workload]:
    def build(batch_size: int, seq_len: int | None, seed: int) -> Workload:
        torch.manual_seed(seed)
        model = SmallCNN(width).train()
        gen = torch.Generator().manual_seed(seed + 1)
        images = torch.randn(batch_size, 3, 32, 32, generator=gen)
        desc = f"SmallCNN width {width} (4 conv+GroupNorm blocks), 32x32x3; batch {batch_size}"
        return Workload(model, {"input": images}, _labels(batch_size, 10, seed), "classify", desc)

    return build


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gpt2-small", "GPT-2 small (12x768, vocab 50257, tied)", _gpt2(12, 768, 12), 4, 128),
        Preset("gpt2-medium", "GPT-2 medium (24x1024, tied)", _gpt2(24, 1024, 16), 4, 128),
        Preset("gpt2-large", "GPT-2 large (36x1280, tied)", _gpt2(36, 1280, 20), 4, 128),
        Preset("roberta-base", "RoBERTa-base (12x768)", _bert_like("roberta", 12, 768, 12, 3072, 50265), 8, 128),
        Preset("bert-base", "BERT-base (12x768)", _bert_like("bert", 12, 768, 12, 3072, 30522), 8, 128),
        Preset("vit-base", "ViT-base (12x768, 224px, patch 16)", _vit(12, 768, 12, 3072), 4, None),
        Preset(
            "minilm", "MiniLM-L6 size (6x384, as all-MiniLM-L6-v2)", _bert_like("bert", 6, 384, 12, 1536, 30522), 8, 128
        ),
        Preset("cnn", "small GroupNorm CNN (32x32x3)", _cnn(32), 64, None),
        Preset("gpt2-tiny", "tiny GPT-2 for smoke runs (2x64)", _gpt2(2, 64, 4, vocab=1000), 4, 16),
        Preset("bert-tiny", "tiny BERT for smoke runs (2x64)", _bert_like("bert", 2, 64, 4, 128, 1000), 4, 16),
        Preset("cnn-tiny", "tiny CNN for smoke runs", _cnn(4), 8, None),
    )
}


def build_workload(name: str, batch_size: int | None = None, seq_len: int | None = None, seed: int = 0) -> Workload:
    """The preset ``name`` or the factory ``"module:function"`` at this batch shape.

    Raises:
        ValueError: an unknown preset or a factory that cannot be imported or returns something else.
    """
    if name in PRESETS:
        preset = PRESETS[name]
        batch = batch_size or preset.default_batch_size
        seq = seq_len or preset.default_seq_len
        return preset.build(batch, seq, seed)
    if ":" not in name:
        raise ValueError(
            f"Unknown model {name!r}: expected a preset ({', '.join(PRESETS)}) or a factory 'module:function'."
        )
    return load_factory(name, batch_size, seq_len, seed)
