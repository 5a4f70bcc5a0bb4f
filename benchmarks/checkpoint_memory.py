"""Peak memory with activation checkpointing: groupclip must not keep what checkpointing frees.

Each configuration runs in its own process: a 12-layer GPT-2-shaped model (Hugging Face GPT2LMHeadModel, random
init) is built, the kernel's high-water mark of the process (VmHWM) is reset, and two training steps (forward,
loss, backward, zero_grad) run. Reported: the peak RSS over those steps, and the same minus the RSS just before
them -- the training steps' own memory (activations, gradients, and whatever the engine keeps), without the ~0.5 GB
that the interpreter, torch and transformers take in every process.

    python benchmarks/checkpoint_memory.py                       # all configurations, writes the results below
    python benchmarks/checkpoint_memory.py --layers 2 --steps 1  # a quick run

Writes ``benchmarks/results/cpu_checkpoint_memory.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    ("non-private", False),
    ("non-private", True),
    ("layer-wise", True),
    ("all-layer", True),
    ("layer-wise", False),
]


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from groupclip import ClippingEngine

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=args.vocab,
        n_positions=args.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    engine = None
    if args.style != "non-private":
        engine = ClippingEngine(model, grouping=args.style, max_grad_norm=1.0).attach()

    def step() -> None:
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), ids[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    before = _status("VmRSS")
    _hwm_reset()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = _status("VmHWM")
    held = engine.peak_held_bytes if engine is not None else 0
    if engine is not None:
        engine.detach()
    return {"peak_rss": peak, "step_bytes": peak - before, "seconds": seconds, "engine_held_bytes": held}


def _child(args: argparse.Namespace, style: str, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--style", style, *(["--checkpointing"] if checkpointing else [])]
    for name in ("layers", "width", "vocab", "batch", "seq_len", "steps", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{style} checkpointing={checkpointing} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    base = {r["checkpointing"]: r for r in rows if r["style"] == "non-private"}
    lines = [
        f"# Peak memory with activation checkpointing (CPU, {platform.processor() or platform.machine()})",
        "",
        f"GPT2LMHeadModel {args.layers} layers x {args.width} (vocab {args.vocab}), batch {args.batch} x seq "
        f"{args.seq_len}, float32, {args.threads} thread(s); one process per row, peak RSS (VmHWM) over "
        f"{args.steps} training step(s); *step MB* is that peak minus the RSS before the first step (the "
        "model built). Command: `python benchmarks/checkpoint_memory.py`.",
        "",
        "| style | checkpointing | peak RSS MB | x non-private (same checkpointing) | step MB | x | engine held MB | "
        "s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base[r["checkpointing"]]
        lines.append(
            f"| {r['style']} | {'yes' if r['checkpointing'] else 'no'} | {r['peak_rss'] / 2**20:.0f} | "
            f"{r['peak_rss'] / b['peak_rss']:.3f} | {r['step_bytes'] / 2**20:.0f} | "
            f"{r['step_bytes'] / b['step_bytes']:.3f} | {r['engine_held_bytes'] / 2**20:.1f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--style", default="layer-wise", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (12)")
    parser.add_argument("--width", type=int, default=256, help="hidden size, a multiple of 64 (256)")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size (1000)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (8)")
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length (512)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per configuration (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--out", default="benchmarks/results/cpu_checkpoint_memory", help="output path stem")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    rows = []
    for style, checkpointing in CONFIGS:
        result = _child(args, style, checkpointing)
        rows.append({"style": style, "checkpointing": checkpointing, **result})
        print(f"{style:12s} checkpointing={checkpointing!s:5s} peak {result['peak_rss'] / 2**20:8.0f} MB", flush=True)
    table = _table(rows, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
