"""The sentence-probe task: a linear head on frozen, cached all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import pytest
import torch

from groupclip.training.recipe import load_recipe
from groupclip.training.tasks import build_task
from groupclip.training.tasks.text import PadCollate, load_minilm, tokenize
from groupclip.training.tasks.text_probe import sentence_embeddings

pytest.importorskip("transformers")
slow = pytest.mark.slow


@slow
def test_probe_setup_caches_normalised_embeddings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    recipe = load_recipe("rotten-tomatoes-probe")
    data = {**recipe.data, "limit": 24, "test_limit": 16, "max_length": 24}
    setup = build_task(recipe.task, data, recipe.model, seed=0)
    x, y = setup.train[:]
    assert x.shape == (24, 384) and y.shape == (24,)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(24))
    assert [p.shape for p in setup.model.parameters()] == [(2, 384), (2,)]
    assert len(list(tmp_path.iterdir())) == 2  # train and test embeddings
    again = build_task(recipe.task, data, recipe.model, seed=1)  # from the cache: the same features
    torch.testing.assert_close(again.train[:][0], x, rtol=0, atol=0)
    metrics = setup.evaluate(setup.model)
    assert set(metrics) == {"test_accuracy", "test_loss"} and 0 <= metrics["test_accuracy"] <= 1


@slow
def test_embedding_is_per_example() -> None:
    """An example's embedding does not depend on the others in its chunk (padding is masked, order restored): the
    features are a per-example map and cost no privacy."""
    from groupclip.training.tasks.text import load_splits

    options = {"name": "minilm", "freeze_embeddings": False, "pooling": "mean", "train": "head", "lora_rank": 8}
    tokenizer, classifier, _ = load_minilm(options, 0)
    train, _ = load_splits({"test_fraction": 0.2, "limit": 6, "test_limit": 1, "holdout": 0})
    data = tokenize(tokenizer, train, 24)
    collate = PadCollate(tokenizer.pad_token_id)
    together = sentence_embeddings(classifier.encoder, data, collate)
    for i in range(6):
        alone = sentence_embeddings(classifier.encoder, type(data)([data.ids[i]], data.labels[i : i + 1]), collate)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
