"""Peak bytes the engine keeps for clipping (its memory ledger) on the CPU suite's models, per grouping.

Two passes (forward, loss, backward) of GPT-2 small, RoBERTa-base and ViT-base (Hugging Face, from configs, random
init) at batch 2 (T = 128; ViT: 197 tokens) under each grouping; reported: each pass' ``peak_held_bytes`` (its
``ClipReport``). The ledger is deterministic; the passes differ because the first one teaches the engine the peak
that later passes keep the per-sample vectors of vector-only groups under (``groupclip.engine.backward``).
``--baseline`` adds the numbers of an earlier run (e.g. of the engine at an
older commit, run with that commit's ``src`` on ``PYTHONPATH``) as a "before" column.

    python benchmarks/kept_bytes.py --out benchmarks/results/cpu_kept_bytes
    PYTHONPATH=<old checkout>/src python benchmarks/kept_bytes.py --out /tmp/kept_before
    python benchmarks/kept_bytes.py --baseline /tmp/kept_before.json --out benchmarks/results/cpu_kept_bytes
"""

from __future__ import annotations

import argparse
import json

import torch

GROUPINGS = ("all-layer", "layer-wise", "param-wise")
BATCH = 2


def _models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    ids = lambda high: torch.randint(5, high, (BATCH, 128))  # noqa: E731
    yield "GPT-2 small", GPT2LMHeadModel(GPT2Config()), lambda: {"input_ids": ids(50257), "labels": ids(50257)}
    yield (
        "RoBERTa-base",
        RobertaForSequenceClassification(RobertaConfig()),
        lambda: {"input_ids": ids(50000), "labels": torch.randint(0, 2, (BATCH,))},
    )
    yield (
        "ViT-base",
        ViTForImageClassification(ViTConfig()),
        lambda: {"pixel_values": torch.randn(BATCH, 3, 224, 224), "labels": torch.randint(0, 2, (BATCH,))},
    )


def measure() -> dict[str, dict[str, int]]:
    from groupclip import ClippingEngine

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out: dict[str, dict[str, int]] = {}
    for name, model, batch in _models():
        out[name] = {}
        for grouping in GROUPINGS:
            engine = ClippingEngine(model, grouping=grouping, max_grad_norm=1.0)
            peaks = []
            with engine:
                for _ in range(2):
                    model(**batch()).loss.backward()
                    peaks.append(engine.last_report.peak_held_bytes)
                    model.zero_grad(set_to_none=True)
            out[name][grouping] = peaks
    return out


def _passes(value) -> list[int]:
    """A run's peaks per pass (runs before the two-pass format recorded one number: its one pass)."""
    return value if isinstance(value, list) else [value]


def report(now: dict, before: dict | None) -> str:
    lines = [
        f"# Peak kept bytes (engine ledger), batch {BATCH}, T = 128 (ViT: 197), passes 1 and 2",
        "",
        "Command: `python benchmarks/kept_bytes.py --baseline <before>.json --out benchmarks/results/cpu_kept_bytes`",
        "",
        "| model | grouping | "
        + ("before (MB) | " if before else "")
        + "pass 1 (MB) | pass 2 (MB) |"
        + (" change, pass 2 |" if before else ""),
        "|---|---|" + ("---:|" if before else "") + "---:|---:|" + ("---:|" if before else ""),
    ]
    for name, rows in now.items():
        for grouping, held in rows.items():
            first, second = _passes(held)[0], _passes(held)[-1]
            cells = [name, grouping]
            if before:
                old = _passes(before[name][grouping])[-1]
                cells.append(f"{old / 1e6:.2f}")
            cells += [f"{first / 1e6:.2f}", f"{second / 1e6:.2f}"]
            if before:
                cells.append(f"{100 * (second / old - 1):+.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cpu_kept_bytes", help="output path without suffix")
    parser.add_argument("--baseline", help="a JSON written by an earlier run: shown as the 'before' column")
    args = parser.parse_args(argv)
    now = measure()
    before = json.load(open(args.baseline))["now"] if args.baseline else None
    with open(f"{args.out}.json", "w") as handle:
        json.dump({"now": now, "before": before}, handle, indent=1)
    with open(f"{args.out}.md", "w") as handle:
        handle.write(report(now, before))
    print(report(now, before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
