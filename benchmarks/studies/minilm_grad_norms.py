"""Per-sample gradient norms of the Rotten Tomatoes MiniLM classifier at initialisation, by part.

Why: with a threshold R below (nearly) every per-sample norm, DP-SGD normalises every example's gradient and a new
head drifts to the majority class (docs/RESULTS.md, section 5b). This prints, for each way of training the model
(``bitfit``, ``lora``, ``all``), the median per-sample L2 norm of the head's gradient, of the rest's, and of the
total, over the first N training examples (one example at a time: exact, no engine involved).

    python benchmarks/studies/minilm_grad_norms.py --examples 48
"""

from __future__ import annotations

import argparse
import statistics

import torch

from groupclip.training.tasks import text


def norms(train: str, examples: int, seed: int) -> dict[str, float]:
    options = {"pooling": "mean", "freeze_embeddings": False, "train": train, "lora_rank": 8}
    tokenizer, net, _ = text.load_minilm(options, seed)
    split, _ = text.load_splits({"name": "rotten-tomatoes", "test_fraction": 0.2, "holdout": None, "limit": None,
                                 "test_limit": None})  # fmt: skip
    data = text.tokenize(tokenizer, split, 64)
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    head, rest, total = [], [], []
    for i in range(examples):
        ids = data.ids[i].unsqueeze(0)
        net.zero_grad(set_to_none=True)
        logits = net(ids, torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits, data.labels[i : i + 1]).backward()
        sq_head = sum(p.grad.square().sum() for name, p in params if name.startswith("head."))
        sq_rest = sum(
            p.grad.square().sum() for name, p in params if not name.startswith("head.") and p.grad is not None
        )
        head.append(float(sq_head) ** 0.5)
        rest.append(float(sq_rest) ** 0.5)
        total.append(float(sq_head + sq_rest) ** 0.5)
    trainable = sum(p.numel() for _, p in params)
    return {"trainable": trainable, "head": statistics.median(head), "rest": statistics.median(rest),
            "total": statistics.median(total), "min_total": min(total)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"median per-sample gradient norm at initialisation, first {args.examples} training examples, seed {args.seed}"
    )
    print("| trained | parameters | head | rest | total | smallest total |")
    print("|---|---:|---:|---:|---:|---:|")
    for train in ("bitfit", "lora", "all"):
        n = norms(train, args.examples, args.seed)
        cells = [f"{n[k]:.3f}" for k in ("head", "rest", "total", "min_total")]
        print(f"| {train} | {n['trainable']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
