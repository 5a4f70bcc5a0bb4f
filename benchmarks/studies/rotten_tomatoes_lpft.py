"""DP LP-FT on Rotten Tomatoes: a DP linear probe first, then DP LoRA fine-tuning from the probe's head, one budget.

Why: DP fine-tuning from a new, random head trails the DP linear probe (docs/RESULTS.md, section 5b): the head's
gradient dominates every per-sample norm (2.63 of LoRA's 2.66 at initialisation), so clipping spends the budget on
the head, and 55 steps at a learning rate the noise allows do not take it far. LP-FT (Kumar et al. 2022; in DP, Ke
et al. 2024) trains the head first as a linear probe on the frozen features -- cheap: the features are computed
once -- and fine-tunes from there, so the fine-tuning starts where the probe ended.

The model is the LoRA recipe's (rank-8 adapters on every attention query and value projection, a linear head on the
mean of the last hidden states) with the probe's features: the mean is L2-normalised before the head, as the probe
reads it, so at the start (LoRA adapters are zero) the model computes exactly the probe's logits.

Privacy: two DP-SGD phases on the same training examples, both with Poisson sampling, composed by the accountant
(RDP, dp-accounting): the probe's steps (noise sigma_1, rate q_1, T_1 steps) are charged to the fine-tuning's
accountant before its first step, and the fine-tuning's noise multiplier is the smallest that keeps the
composition within the target epsilon. The reported epsilon is that accountant's, over both phases. With
``--non-private`` both phases run without clipping or noise: the baseline of the same model and schedule.

    python benchmarks/studies/rotten_tomatoes_lpft.py --holdout 1024 --lr 1e-3 --clip 2 \
        --out benchmarks/results/studies/rotten_tomatoes_lpft/val-lr1e-3-R2-eps3-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from groupclip import make_private
from groupclip.accounting import PrivacyAccountant, calibrate_noise_multiplier
from groupclip.sampling import expected_steps, physical_batches
from groupclip.training.tasks import text, text_probe

HIDDEN = 384


class NormalizedMeanPooled(nn.Module):
    """The LoRA classifier with the probe's features: a linear head on the L2-normalised mean of the last hidden
    states over the attended tokens."""

    def __init__(self, classifier: text.MeanPooledClassifier) -> None:
        super().__init__()
        self.encoder = classifier.encoder
        self.head = classifier.head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> text.ClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = text.mean_pool(hidden, attention_mask)
        return text.ClassifierOutput(logits=self.head(pooled / pooled.norm(dim=1, keepdim=True)))


def data_splits(holdout: int, limit: int = 0, eval_limit: int = 0):
    """(train texts, evaluation texts) as the sentence-classification task cuts them."""
    options = {**text.DATA_DEFAULTS, "holdout": holdout, "limit": limit, "test_limit": eval_limit}
    return text.load_splits(options)


def probe_features(train_split, eval_split, tokenizer, encoder: nn.Module, holdout: int) -> tuple[Tensor, Tensor]:
    """The probe's features of both splits. With a holdout both are rows of the whole training split's embeddings
    (cached by the probe recipe: an example's embedding does not depend on its batch)."""
    if holdout:
        whole, _ = data_splits(0, 0)
        embeddings = text_probe.cached_embeddings(whole, tokenizer, encoder, text.DATA_DEFAULTS["max_length"])
        cut = len(whole.texts) - holdout
        if whole.texts[: len(train_split.texts)] != train_split.texts or whole.texts[cut:][: len(eval_split.texts)] != (
            eval_split.texts
        ):
            raise AssertionError("the holdout split is not a cut of the training split")
        return embeddings[: len(train_split.texts)], embeddings[cut:][: len(eval_split.texts)]
    return (
        text_probe.cached_embeddings(train_split, tokenizer, encoder, text.DATA_DEFAULTS["max_length"]),
        text_probe.cached_embeddings(eval_split, tokenizer, encoder, text.DATA_DEFAULTS["max_length"]),
    )


def run_steps(private, model, optimizer, loader, steps: int, step_fn, log, evaluate, eval_every: int) -> None:
    """``steps`` optimizer steps over Poisson (or shuffled) batches; ``step_fn(batch)`` runs the backward passes."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1 - t / steps))
    taken = 0
    while taken < steps:
        for batch in loader:
            start = time.perf_counter()
            loss_sum, size = step_fn(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            taken += 1
            record = {"step": taken, "loss": loss_sum / size if size else None, "batch_size": size,
                      "step_time_s": time.perf_counter() - start}  # fmt: skip
            if private is not None:
                clipped = private.last_metrics.get("fraction_clipped") or {}
                record["fraction_clipped"] = sum(clipped.values()) / len(clipped) if clipped else None
                record["epsilon"] = private.epsilon()
            if taken % eval_every == 0 or taken == steps:
                record.update(evaluate(model))
            log(record)
            if taken >= steps:
                break


def calibrate_after(prior: PrivacyAccountant, target: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier whose steps, composed after ``prior``'s, spend the rest of ``target``."""
    if prior.epsilon(delta) >= target:
        raise SystemExit(f"the probe alone spends epsilon {prior.epsilon(delta):.3f} >= the target {target}")
    return calibrate_noise_multiplier(target, delta, rate, steps, prior.kind, prior=prior.ledger)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (metrics.jsonl, final.json, log.txt)")
    parser.add_argument("--epsilon", type=float, default=3.0, help="total epsilon, both phases")
    parser.add_argument("--probe-epsilon", type=float, default=1.0, help="the probe's share, spent first")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--non-private", action="store_true", help="both phases without clipping or noise")
    parser.add_argument("--holdout", type=int, default=0, help="score on the last N training examples (no test)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N examples only (smoke tests)")
    parser.add_argument("--eval-limit", type=int, default=0, help="score the first N evaluation examples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    # the probe: the rotten-tomatoes-probe recipe's settings
    parser.add_argument("--probe-epochs", type=float, default=30)
    parser.add_argument("--probe-lr", type=float, default=2.0)
    parser.add_argument("--probe-clip", type=float, default=1.0)
    # the fine-tuning: the LoRA recipe's settings
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--physical-batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=0, help="stop the fine-tuning early (smoke tests)")
    parser.add_argument("--probe-only", action="store_true", help="the probe alone, at --probe-epsilon (a baseline)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    log_file = open(out / "log.txt", "w")
    metrics_file = open(out / "metrics.jsonl", "w")
    (out / "config.json").write_text(json.dumps({**vars(args), "command": command}, indent=1) + "\n")

    def say(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    say(command)
    split = "val" if args.holdout else "test"
    train_split, eval_split = data_splits(args.holdout, args.limit, args.eval_limit)
    options = {**text.MODEL_DEFAULTS, "pooling": "mean", "train": "lora"}
    tokenizer, classifier, _ = text.load_minilm(options, args.seed)
    model = NormalizedMeanPooled(classifier)
    train_x, eval_x = probe_features(train_split, eval_split, tokenizer, model.encoder, args.holdout)
    model.train()  # the embedding pass left the encoder in eval mode
    train_y = torch.tensor(train_split.labels, dtype=torch.long)
    eval_y = torch.tensor(eval_split.labels, dtype=torch.long)
    n = len(train_y)
    say(f"train {n}, {split} {len(eval_y)}, probe features {tuple(train_x.shape)}")

    # -------------------------------------------------------------- phase 1: the linear probe (the head only)
    torch.manual_seed(args.seed)
    head = nn.Linear(HIDDEN, 2)
    probe_opt = torch.optim.SGD(head.parameters(), lr=args.probe_lr, momentum=0.9)
    probe_steps = expected_steps(args.batch_size / n, args.probe_epochs)
    probe_private = None
    if args.non_private:
        generator = torch.Generator().manual_seed(args.seed)
        probe_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True,
                                  generator=generator)  # fmt: skip
    else:
        probe_private = make_private(
            head, probe_opt, grouping="all-layer", max_grad_norm=args.probe_clip, loss_reduction="sum",
            target_epsilon=args.probe_epsilon, target_delta=args.delta, epochs=args.probe_epochs,
            batch_size=args.batch_size, data_size=n,
        )  # fmt: skip
        probe_loader = probe_private.poisson_loader(TensorDataset(train_x, train_y))

    def probe_step(batch) -> tuple[float, int]:
        x, y = batch
        loss = F.cross_entropy(head(x), y, reduction="sum")
        # DP: the sum (make_private divides by the expected batch size); without DP the mean, as in the recipes
        (loss if probe_private is not None else loss / max(len(y), 1)).backward()
        return float(loss.detach()), len(y)

    @torch.no_grad()
    def probe_eval(net: nn.Module) -> dict:
        logits = net(eval_x)
        return {f"{split}_accuracy": float((logits.argmax(1) == eval_y).float().mean())}

    noise = "" if probe_private is None else f", noise multiplier {probe_private.noise_multiplier:.4f}"
    say(f"phase 1: linear probe, {probe_steps} steps{noise}")
    steps_per_epoch = max(1, round(n / args.batch_size))
    try:
        run_steps(probe_private, head, probe_opt, probe_loader, probe_steps, probe_step,
                  lambda r: log({"phase": "probe", **r}), probe_eval, steps_per_epoch * 10)  # fmt: skip
    finally:
        if probe_private is not None:
            probe_private.detach()
    probe_result = probe_eval(head)
    prior = probe_private.accountant if probe_private is not None else None
    say(f"probe: {split} accuracy {probe_result[f'{split}_accuracy']:.4f}"
        + ("" if prior is None else f", epsilon {prior.epsilon(args.delta):.3f}"))  # fmt: skip

    if args.probe_only:
        final = {
            "private": prior is not None,
            "epsilon": prior.epsilon(args.delta) if prior is not None else None,
            "delta": args.delta,
            "probe_noise_multiplier": probe_private.noise_multiplier if probe_private is not None else None,
            "probe_steps": probe_steps,
            **probe_result,
            "device": "cpu",
            "threads": args.threads,
        }
        (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
        say(json.dumps(final))
        return 0

    # -------------------------------------------------------------- phase 2: LoRA fine-tuning from the probe's head
    model.head.load_state_dict(head.state_dict())
    train = text.tokenize(tokenizer, train_split, text.DATA_DEFAULTS["max_length"])
    evaluation = text.tokenize(tokenizer, eval_split, text.DATA_DEFAULTS["max_length"])
    collate = text.PadCollate(tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    ft_steps = expected_steps(args.batch_size / n, args.epochs)
    if args.max_steps:
        ft_steps = min(ft_steps, args.max_steps)
    private = None
    if args.non_private:
        generator = torch.Generator().manual_seed(args.seed + 1)
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    else:
        sigma = calibrate_after(prior, args.epsilon, args.delta, args.batch_size / n,
                                expected_steps(args.batch_size / n, args.epochs))  # fmt: skip
        private = make_private(
            model, optimizer, grouping="all-layer", max_grad_norm=args.clip, loss_reduction="sum",
            noise_multiplier=sigma, target_delta=args.delta, batch_size=args.batch_size, data_size=n,
        )  # fmt: skip
        for entry in prior.ledger:  # the probe's steps, charged first
            private.accountant.step(entry.noise_multiplier, entry.sample_rate, entry.steps)
        loader = private.poisson_loader(train, collate_fn=collate)

    def ft_step(batch) -> tuple[float, int]:
        total, size = 0.0, len(batch[2])
        for chunk in physical_batches(batch, args.physical_batch_size):
            loss = text.sequence_loss(model, chunk)
            (loss if private is not None else loss / max(size, 1)).backward()
            total += float(loss.detach())
        return total, size

    def ft_eval(net: nn.Module) -> dict:
        accuracy, mean_loss = text.accuracy_and_loss(net, evaluation, collate)
        return {f"{split}_accuracy": accuracy, f"{split}_loss": mean_loss}

    start = ft_eval(model)[f"{split}_accuracy"]
    noise = "" if private is None else f", noise multiplier {private.noise_multiplier:.4f}"
    say(f"phase 2: LoRA fine-tuning, {ft_steps} steps{noise}; {split} accuracy at the start {start:.4f} (the probe's)")
    try:
        run_steps(private, model, optimizer, loader, ft_steps, ft_step, lambda r: log({"phase": "finetune", **r}),
                  ft_eval, steps_per_epoch)  # fmt: skip
        final = {
            "private": private is not None,
            "epsilon": private.epsilon() if private is not None else None,
            "delta": args.delta,
            "probe_epsilon": prior.epsilon(args.delta) if prior is not None else None,
            "probe_noise_multiplier": probe_private.noise_multiplier if probe_private is not None else None,
            "probe_steps": probe_steps,
            "noise_multiplier": private.noise_multiplier if private is not None else None,
            "steps": ft_steps,
            f"probe_{split}_accuracy": probe_result[f"{split}_accuracy"],
            **ft_eval(model),
            "device": "cpu",
            "threads": args.threads,
        }
    finally:
        if private is not None:
            private.detach()
    (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    say(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
