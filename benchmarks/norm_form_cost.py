"""Predicted FLOP cost of layer-wise clipping by norm form, at the CPU and GPU suites' shapes (no timing).

The engine gets each layer's per-sample norms in one of two exact forms: the ghost norm (two ``T x T`` Grams,
``2 B T^2 (r + c)`` FLOPs for a linear layer with ``c`` inputs and ``r`` outputs, on top of the weight-gradient
product) or instantiated per-sample gradients (a batched product that replaces the weight-gradient product, then
``~4 B r c`` for the norms and the weighted sum). ``norm_mode="auto"`` picks the form that holds less memory, which
at long sequences is the ghost norm even where its Grams cost about as much as the weight gradient itself.

This script asks the analytic cost model (:mod:`groupclip.planning.costmodel`: FLOPs of the parameter layers, and
the bytes the engine keeps, traced from one forward pass at batch 2 and scaled) what layer-wise clipping costs per
form. Under ``instantiate`` every layer is instantiated, the embeddings included, so its kept bytes are an upper
bound for instantiating the transformer blocks only (``norm_mode={"transformer.h.*": "instantiate"}``, the GPU
suite's extra style); its time ratio is close to the blocks-only one (the embeddings' share of FLOPs is small).

Run: ``python benchmarks/norm_form_cost.py --out benchmarks/results/predicted_norm_form_cost`` (a few minutes on a
CPU: it traces one forward pass per shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.presets import build_workload
from groupclip.planning.costmodel import trace_model

# (preset, batch, sequence length or None for images, where these shapes come from)
SHAPES = [
    ("roberta-base", 8, 128, "CPU suite"),
    ("vit-base", 4, None, "CPU suite"),
    ("gpt2-small", 4, 128, "CPU suite"),
    ("gpt2-small", 32, 256, "GPU suite"),
    ("gpt2-small", 16, 512, "GPU suite"),
    ("gpt2-medium", 32, 256, "GPU suite"),
    ("gpt2-medium", 16, 512, "GPU suite"),
]
MODES = ("auto", "ghost", "instantiate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/predicted_norm_form_cost", help="path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, batch, seq, source in SHAPES:
        cost = trace_model(build_workload(name, batch_size=2, seq_len=seq), trace_batch=2)
        for mode in MODES:
            p = cost.predict("layer-wise", batch, mode)
            rows.append({"model": name, "batch": batch, "seq": seq, "suite": source, "mode": mode,
                         "time_ratio": p.time_ratio, "kept_mb": p.kept_bytes / 2**20})  # fmt: skip
    lines = [
        "# Predicted cost of layer-wise clipping by norm form (cost model, FLOPs of parameter layers)",
        "",
        f"Command: `python benchmarks/norm_form_cost.py --out {args.out}` (analytic: no timing; torch "
        f"{torch.__version__}).",
        "",
        "*time x*: FLOPs of the parameter layers' forward and backward with layer-wise clipping over non-private "
        "(the cost model's `time_ratio`). *kept MB*: the engine's predicted peak kept bytes. `instantiate` "
        "instantiates every layer, embeddings included: its kept bytes are an upper bound for instantiating the "
        "transformer blocks only.",
        "",
        "| model | batch x seq | suite | auto: time x | ghost: time x | instantiate: time x | auto: kept MB | "
        "instantiate: kept MB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for i in range(0, len(rows), len(MODES)):
        by_mode = {r["mode"]: r for r in rows[i : i + len(MODES)]}
        first = rows[i]
        shape = f"{first['batch']} x {first['seq'] if first['seq'] else '197 (image)'}"
        lines.append(
            f"| {first['model']} | {shape} | {first['suite']} | {by_mode['auto']['time_ratio']:.3f} | "
            f"{by_mode['ghost']['time_ratio']:.3f} | {by_mode['instantiate']['time_ratio']:.3f} | "
            f"{by_mode['auto']['kept_mb']:.0f} | {by_mode['instantiate']['kept_mb']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
