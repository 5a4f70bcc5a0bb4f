"""The sentence-classification task: Rotten Tomatoes + pretrained all-MiniLM-L6-v2 (a small slice of the data)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groupclip.training.recipe import RecipeError, load_recipe
from groupclip.training.tasks import TaskSetup, known_tasks
from groupclip.training.tasks.text import (
    DATA_DEFAULTS,
    PadCollate,
    build_sentence_classification,
    freeze_embeddings,
    load_splits,
    trim_padding,
)

pytest.importorskip("transformers")

LIMIT, TEST_LIMIT = 64, 64
slow = pytest.mark.slow  # loading MiniLM (once per module) takes several seconds


@pytest.fixture(scope="module")
def setup() -> TaskSetup:
    return build_sentence_classification({"limit": LIMIT, "test_limit": TEST_LIMIT, "max_length": 32}, {}, 0)


@pytest.fixture
def eval_mode(setup: TaskSetup) -> Iterator[nn.Module]:
    """The model without dropout (so two forward passes agree); train mode restored afterwards."""
    setup.model.eval()
    yield setup.model
    setup.model.train()


def test_registered() -> None:
    assert "sentence-classification" in known_tasks()


@slow
def test_setup_types_and_info(setup: TaskSetup) -> None:
    assert isinstance(setup.collate, PadCollate) and setup.collate.pad_id == 0  # BERT's [PAD]
    assert len(setup.train) == LIMIT
    ids, label = setup.train[0]
    assert ids.dtype == torch.long and ids.dim() == 1 and 2 <= len(ids) <= 32
    assert label.dtype == torch.long and label.dim() == 0 and int(label) in (0, 1)
    assert setup.model.training
    assert all(p.dtype == torch.float32 for p in setup.model.parameters())
    assert setup.headline == "test_accuracy" and setup.higher_is_better
    info = setup.info or {}
    assert info["train_size"] == LIMIT and info["test_size"] == TEST_LIMIT and info["max_length"] == 32
    assert info["model"] == "all-MiniLM-L6-v2"
    assert info["trainable_parameters"] == sum(p.numel() for p in setup.model.parameters())
    assert info["pooler"] == "pretrained"  # the checkpoint carries the BERT pooler; only the head is new
    input_ids, attention_mask, labels = setup.example_batch
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 4 and labels.shape == (4,)


def test_collate_pads_masks_and_sorts() -> None:
    collate = PadCollate(pad_id=0)
    items = [(torch.tensor([101, 7, 102]), torch.tensor(0)), (torch.tensor([101, 5, 6, 8, 102]), torch.tensor(1))]
    input_ids, attention_mask, labels = collate(items)
    assert input_ids.shape == attention_mask.shape == (2, 5)
    assert input_ids[0].tolist() == [101, 5, 6, 8, 102]  # longest first, its label with it
    assert input_ids[1].tolist() == [101, 7, 102, collate.pad_id, collate.pad_id]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert labels.tolist() == [1, 0]


def test_collate_empty_batch() -> None:
    input_ids, attention_mask, labels = PadCollate(pad_id=0)([])
    assert input_ids.shape == attention_mask.shape == (0, 1) and labels.shape == (0,)
    assert input_ids.dtype == attention_mask.dtype == labels.dtype == torch.long


def test_trim_padding_keeps_used_columns() -> None:
    ids = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    mask = (ids != 0).long()
    trimmed_ids, trimmed_mask = trim_padding(ids, mask)
    assert trimmed_ids.tolist() == [[1, 2], [3, 0]] and trimmed_mask.tolist() == [[1, 1], [1, 0]]
    empty_ids, empty_mask = trim_padding(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long))
    assert empty_ids.shape == empty_mask.shape == (0, 1)


@slow
def test_loss_is_sum_of_per_sample_losses(setup: TaskSetup, eval_mode: nn.Module) -> None:
    items = [setup.train[i] for i in range(6)]
    batch = setup.collate(items)
    with torch.no_grad():
        total = setup.loss(eval_mode, batch)
        singles = [
            F.cross_entropy(eval_mode(input_ids=ids[None]).logits, label[None], reduction="sum") for ids, label in items
        ]
    assert total.dim() == 0
    torch.testing.assert_close(total, torch.stack(singles).sum(), rtol=1e-4, atol=1e-4)


@slow
def test_loss_backward_reaches_parameters(setup: TaskSetup) -> None:
    setup.model.zero_grad(set_to_none=True)
    setup.loss(setup.model, setup.example_batch).backward()
    assert setup.model.classifier.weight.grad is not None
    assert setup.model.base_model.encoder.layer[0].attention.self.query.weight.grad is not None
    setup.model.zero_grad(set_to_none=True)


@slow
def test_evaluate(setup: TaskSetup) -> None:
    metrics = setup.evaluate(setup.model)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert setup.model.training  # train mode restored


@slow
def test_freeze_embeddings(setup: TaskSetup) -> None:
    net = copy.deepcopy(setup.model)
    freeze_embeddings(net)
    embeddings = net.base_model.embeddings
    frozen = [embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings]
    assert not any(module.weight.requires_grad for module in frozen)
    assert embeddings.LayerNorm.weight.requires_grad and net.classifier.weight.requires_grad


@pytest.mark.parametrize(("data", "model", "key"), [({"bogus": 1}, {}, "bogus"), ({}, {"poolng": "mean"}, "poolng")])
def test_unknown_keys_are_errors(data: dict, model: dict, key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        build_sentence_classification(data, model, 0)


@pytest.mark.parametrize(
    ("data", "model", "match"),
    [
        ({"name": "imdb"}, {}, "imdb"),
        ({}, {"name": "bert"}, "bert"),
        ({"max_length": 1}, {}, "max_length"),
        ({"test_fraction": 1.5}, {}, "test_fraction"),
        ({}, {"freeze_embeddings": "yes"}, "freeze_embeddings"),
        ({}, {"pooling": "max"}, "pooling = 'max'"),
        ({}, {"train": "adapters"}, "train = 'adapters'"),
        ({}, {"train": "lora", "lora_rank": 0}, "lora_rank = 0"),
        ({"holdout": -1}, {}, "holdout = -1"),
        ({"holdout": 10**6}, {}, "holdout = 1000000: must be below"),
    ],
)
def test_bad_values_are_errors_before_loading(data: dict, model: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        build_sentence_classification(data, model, 0)


def test_holdout_evaluates_on_the_last_training_examples_and_never_reads_the_test_set() -> None:
    train, test = load_splits(DATA_DEFAULTS)
    held_train, val = load_splits({**DATA_DEFAULTS, "holdout": 500})
    assert val.texts == train.texts[-500:] and val.labels == train.labels[-500:]
    assert held_train.texts == train.texts[:-500] and test.texts != val.texts[: len(test.texts)]


def test_recipe_loads() -> None:
    recipe = load_recipe("rotten-tomatoes-minilm")
    assert recipe.task == "sentence-classification"
    assert recipe.privacy.epsilon == 3.0 and recipe.privacy.delta < 1 / 10_246


@slow
def test_mean_pooling_bitfit_trains_biases_norms_and_head_and_sums_per_sample_losses() -> None:
    setup = build_sentence_classification(
        {"limit": 8, "test_limit": 8, "max_length": 24}, {"pooling": "mean", "train": "bitfit"}, 0
    )
    trained = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trained
    assert all(n.startswith("head.") or n.endswith(".bias") or "LayerNorm" in n for n in trained)
    assert "encoder.encoder.layer.0.attention.self.query.weight" not in trained
    assert setup.info["pooling"] == "mean" and setup.info["trainable_parameters"] == 31_490
    setup.model.eval()
    batch = setup.collate([setup.train[i] for i in range(4)])
    total = setup.loss(setup.model, batch)
    singles = sum(setup.loss(setup.model, setup.collate([setup.train[i]])) for i in range(4))
    assert float(total) == pytest.approx(float(singles), rel=1e-5)  # padding does not leak into the mean
    setup.model.train()


@slow
def test_lora_trains_adapters_and_head_only_and_clips_exactly() -> None:
    """LoRA through PEFT: only the query/value adapters and the head train, and DP clipping of them matches the
    float64 per-sample reference."""
    from tests.reference import check_engine, max_relative_error

    setup = build_sentence_classification(
        {"limit": 8, "test_limit": 8, "max_length": 16}, {"pooling": "mean", "train": "lora", "lora_rank": 2}, 0
    )
    trained = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trained
    assert all(n.startswith("head.") or "lora_" in n for n in trained)
    assert sum("lora_" in n for n in trained) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert set(setup.info["new_weights"]) >= trained - {"head.weight", "head.bias"}
    assert setup.info["trainable_parameters"] == 6 * 2 * 2 * 2 * 384 + 2 * 384 + 2
    model = setup.model.eval()  # no dropout: the reference must see the same function
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapters' gradients are not degenerate
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    batch = setup.collate([setup.train[i] for i in range(3)])

    def losses(net: nn.Module, b: tuple) -> torch.Tensor:
        input_ids, attention_mask, labels = b
        return F.cross_entropy(net(input_ids=input_ids, attention_mask=attention_mask).logits, labels, reduction="none")

    _, got, want, norms, want_norms = check_engine(model, losses, batch, grouping="layer-wise", max_grad_norm=0.05)
    assert max_relative_error(got, want) < 1e-4
    for group, norm in want_norms.items():
        torch.testing.assert_close(norms[group].double(), norm, rtol=1e-4, atol=1e-7)
