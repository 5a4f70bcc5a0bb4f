"""The char-lm task: Shakespeare chunks as DP samples, the summed mean-token loss, evaluation, option checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import groupclip

pytest.importorskip("transformers")

from groupclip.training.datasets import load_shakespeare
from groupclip.training.recipe import RecipeError, load_recipe
from groupclip.training.tasks import TaskSetup, take_options
from groupclip.training.tasks.charlm import DATA_DEFAULTS, MODEL_DEFAULTS, build_char_lm

pytestmark = pytest.mark.hf

BLOCK = 32
DATA = {"plays": 1, "block_size": BLOCK, "train_chars": 5000, "val_chars": 2000}
MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="module")
def setup() -> TaskSetup:
    return build_char_lm(dict(DATA), dict(MODEL), seed=0)


def test_items_are_non_overlapping_chunks_shifted_by_one(setup):
    assert len(setup.train) == 5000 // (BLOCK + 1) == setup.info["train_chunks"]
    assert setup.info["val_chunks"] == 2000 // (BLOCK + 1)
    assert setup.info["block_size"] == BLOCK and setup.info["vocab_size"] > 30
    text = load_shakespeare(0.1, plays=1).train
    for i in range(3):
        x, y = setup.train[i]
        assert x.shape == y.shape == (BLOCK,) and x.dtype == y.dtype == torch.long
        chunk = text[i * (BLOCK + 1) : (i + 1) * (BLOCK + 1)]  # sample i: characters [i (T + 1), (i + 1) (T + 1))
        assert torch.equal(x, chunk[:-1]) and torch.equal(y, chunk[1:])


def test_collate_stacks_and_handles_an_empty_batch(setup):
    x, y = setup.collate([setup.train[i] for i in range(3)])
    assert x.shape == y.shape == (3, BLOCK)
    ex, ey = setup.collate([])
    assert ex.shape == ey.shape == (0, BLOCK) and ex.dtype == ey.dtype == torch.long
    assert setup.example_batch[0].shape == (2, BLOCK)
    assert float(setup.loss(setup.model, (ex, ey)).detach()) == 0.0


def test_loss_is_the_sum_of_per_sample_mean_token_losses(setup):
    x, y = setup.collate([setup.train[i] for i in range(4)])
    expected = sum(F.cross_entropy(setup.model(input_ids=x[i : i + 1]).logits[0], y[i]) for i in range(len(x)))
    torch.testing.assert_close(setup.loss(setup.model, (x, y)), expected, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_perplexity_and_restores_train_mode(setup):
    setup.model.train()
    metrics = setup.evaluate(setup.model)
    assert set(metrics) == {"val_loss", "val_perplexity", "val_bits_per_char"}
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bits_per_char"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert math.log(setup.info["vocab_size"]) - 1 < metrics["val_loss"] < math.log(setup.info["vocab_size"]) + 1
    assert setup.model.training
    assert setup.headline in metrics and setup.higher_is_better is False


def test_tied_embeddings_and_seeded_init(setup):
    model = setup.model
    assert model.lm_head.weight is model.transformer.wte.weight
    again = build_char_lm(dict(DATA), dict(MODEL), seed=0).model
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    assert setup.info["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("data", "model", "match"),
    [
        ({"blocksize": 16}, {}, r"\['blocksize'\] in \[data\]"),
        ({}, {"n_layers": 2}, r"\['n_layers'\] in \[model\]"),
        ({"name": "tiny-shakespeare"}, {}, "reads only 'shakespeare'"),
        ({"block_size": 0}, {}, "block_size = 0"),
        ({}, {"n_embd": 30, "n_head": 4}, "multiple of n_head"),
    ],
)
def test_bad_options_name_the_key(data, model, match):
    with pytest.raises(RecipeError, match=match):
        build_char_lm({**DATA, **data}, {**MODEL, **model}, seed=0)


def test_recipe_keys_are_ones_the_task_reads():
    recipe = load_recipe("shakespeare-gpt")
    assert recipe.task == "char-lm"
    take_options("data", recipe.data, DATA_DEFAULTS)
    take_options("model", recipe.model, MODEL_DEFAULTS)
    assert recipe.privacy.epsilon == 8.0 and recipe.privacy.delta == 1e-5 and recipe.optimizer.name == "adamw"


def test_dp_backward_gives_the_sum_of_clipped_per_sample_gradients():
    """The task's loss through make_private (tied embeddings, GPT-2 Conv1D): ``.grad`` = sum_i clip(g_i)."""
    setup = build_char_lm(dict(DATA), dict(MODEL), seed=1)
    model, batch, threshold = setup.model, setup.collate([setup.train[i] for i in range(3)]), 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(3):
        grads = torch.autograd.grad(setup.loss(model, (batch[0][i : i + 1], batch[1][i : i + 1])), params)
        scale = min(1.0, threshold / float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
        expected = [e + scale * g for e, g in zip(expected, grads, strict=True)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    private = groupclip.make_private(
        model, optimizer, max_grad_norm=threshold, loss_reduction="sum", noise_multiplier=0.0, batch_size=3, data_size=3
    )
    try:
        setup.loss(model, batch).backward()
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    finally:
        private.detach()
