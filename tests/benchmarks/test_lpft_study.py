"""The DP LP-FT study (benchmarks/studies/rotten_tomatoes_lpft.py): one budget over both phases, and a fine-tuning
that starts from exactly the probe's model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("dp_accounting")

from benchmarks.studies import rotten_tomatoes_lpft as lpft
from groupclip.accounting import PrivacyAccountant, calibrate_noise_multiplier
from groupclip.training.tasks import text, text_probe


def test_calibration_composes_with_the_probe() -> None:
    probe_sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.111, 271)  # the probe's share: epsilon 1
    prior = PrivacyAccountant("rdp")
    prior.step(probe_sigma, 0.111, 271)
    sigma = lpft.calibrate_after(prior, 3.0, 1e-5, 0.111, 55)
    composed = PrivacyAccountant("rdp")
    composed.step(probe_sigma, 0.111, 271)
    composed.step(sigma, 0.111, 55)
    assert 0.99 * 3.0 <= composed.epsilon(1e-5) <= 3.0
    assert sigma > calibrate_noise_multiplier(3.0, 1e-5, 0.111, 55) * 1.02  # the probe's share is taken off
    louder = PrivacyAccountant("rdp")
    louder.step(probe_sigma, 0.111, 271)
    louder.step(sigma / 1.01, 0.111, 55)
    assert louder.epsilon(1e-5) > 3.0  # the smallest such noise, not just some noise
    with pytest.raises(SystemExit, match="spends"):
        lpft.calibrate_after(prior, 0.5, 1e-5, 0.111, 55)


@pytest.mark.slow
def test_finetuning_starts_from_the_probe(tmp_path, monkeypatch) -> None:
    """With the probe's head and zero LoRA adapters the model's logits are the probe's on the cached features."""
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path))
    train_split, _ = lpft.data_splits(0, limit=6, eval_limit=1)
    options = {**text.MODEL_DEFAULTS, "pooling": "mean", "train": "lora"}
    tokenizer, classifier, _ = text.load_minilm(options, 0)
    model = lpft.NormalizedMeanPooled(classifier)
    features = text_probe.cached_embeddings(train_split, tokenizer, model.encoder, 64)
    torch.manual_seed(1)
    head = torch.nn.Linear(384, 2)
    model.head.load_state_dict(head.state_dict())
    data = text.tokenize(tokenizer, train_split, 64)
    input_ids, mask, _ = text.PadCollate(tokenizer.pad_token_id)([data[i] for i in range(6)])
    order = sorted(range(6), key=lambda i: -len(data.ids[i]))  # PadCollate's order
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, mask).logits, head(features[order]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_run_charges_both_phases(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUPCLIP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["--out", str(out), "--limit", "48", "--eval-limit", "8", "--probe-epochs", "1", "--epochs", "1",
            "--max-steps", "1", "--batch-size", "16", "--physical-batch-size", "8", "--threads", "1"]  # fmt: skip
    assert lpft.main(argv) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["private"] and 0 < final["probe_epsilon"] <= 1.0 < final["epsilon"] <= 3.0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in steps] == ["probe"] * final["probe_steps"] + ["finetune"]
    assert steps[-1]["epsilon"] == final["epsilon"]  # the fine-tuning's accountant holds the probe's steps
