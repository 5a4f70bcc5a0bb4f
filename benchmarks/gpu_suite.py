"""The GPU suite of issue #13 as ONE script that fits a short device loan (about 8 minutes on an H100/H200).

    python benchmarks/gpu_suite.py --out "$OUT/gpu_suite"            # on the GPU machine
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/x   # the same logic on tiny models, on a CPU

Workloads (random init, next-token loss): GPT-2 small and medium at B 16 x T 512 and B 32 x T 256, fp32 and bf16
autocast; a Llama-style ~1B model in bf16 (parameters and autocast) at B 8 x T 1024. Styles: non-private, then
``make_private`` (noise multiplier 1, the DP step as users run it) with all-layer, 4 groups, layer-wise and
param-wise, and layer-wise with the transformer blocks' per-sample gradients instantiated (``norm_mode`` per module
path): at T 512 the ghost norm's Grams cost GPT-2's block linears 83-89% of their weight gradients (``2 T^2 (r +
c)`` against ``2 T r c`` FLOPs), while instantiating replaces the weight-gradient product by a batched one and keeps
one layer's ``B r c`` per-sample gradients until its group is clipped, right after. Per workload one process
(``--one``) runs every style in interleaved rounds, so the ratios to non-private come from the same process; peak
memory is ``torch.cuda.max_memory_allocated`` per style. Then the largest batch (doubling, then bisection) of
non-private and layer-wise on GPT-2 small at T 256. A deadline (``--budget-s``) stops starting new work; what did
not run is listed as skipped, never left out silently.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The transformer blocks of GPT-2 and of the Llama model (a pattern that matches nothing is inert).
BLOCKS_INSTANTIATED = {"transformer.h.*": "instantiate", "model.layers.*": "instantiate"}
# style -> (grouping, norm_mode); grouping None: non-private
STYLES = {"non-private": (None, "auto"), "all-layer": ("all-layer", "auto"), "4 groups": (4, "auto"),
          "layer-wise": ("layer-wise", "auto"), "param-wise": ("param-wise", "auto"),
          "layer-wise, blocks instantiated": ("layer-wise", BLOCKS_INSTANTIATED)}  # fmt: skip
WORKLOADS = [
    # name, architecture, batch, seq, precision
    ("gpt2-small B16xT512 fp32", "gpt2-small", 16, 512, "fp32"),
    ("gpt2-small B16xT512 bf16", "gpt2-small", 16, 512, "bf16-autocast"),
    ("gpt2-small B32xT256 fp32", "gpt2-small", 32, 256, "fp32"),
    ("gpt2-small B32xT256 bf16", "gpt2-small", 32, 256, "bf16-autocast"),
    ("gpt2-medium B16xT512 fp32", "gpt2-medium", 16, 512, "fp32"),
    ("gpt2-medium B16xT512 bf16", "gpt2-medium", 16, 512, "bf16-autocast"),
    ("gpt2-medium B32xT256 fp32", "gpt2-medium", 32, 256, "fp32"),
    ("gpt2-medium B32xT256 bf16", "gpt2-medium", 32, 256, "bf16-autocast"),
    ("llama-1b B8xT1024 bf16", "llama-1b", 8, 1024, "bf16"),
]
TINY = {"gpt2-small": (2, 64, 4), "gpt2-medium": (3, 64, 4), "llama-1b": (2, 64, 4)}  # layers, width, heads


def build(arch: str, tiny: bool, device: str, precision: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch.startswith("gpt2"):
        layers, width, heads = (
            TINY[arch] if tiny else {"gpt2-small": (12, 768, 12), "gpt2-medium": (24, 1024, 16)}[arch]
        )
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=1000 if tiny else 50257,
                            n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        layers, width, heads = TINY[arch] if tiny else (16, 2048, 16)
        config = LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads, intermediate_size=4 * width if tiny else 5632,
                             vocab_size=1000 if tiny else 32000, max_position_embeddings=1024)  # fmt: skip
        model = LlamaForCausalLM(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device), config.vocab_size


class Step:
    """One training step of one style; ``attach``/``detach`` switch styles on the same model."""

    def __init__(self, model, vocab: int, batch: int, seq: int, device: str, precision: str) -> None:
        import torch

        self.model, self.device, self.precision = model, device, precision
        self.ids = torch.randint(0, vocab, (batch, seq), device=device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.private = None

    def attach(self, grouping, norm_mode="auto") -> None:
        import warnings

        from groupclip import make_private

        self.detach()
        if grouping is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.private = make_private(
                    self.model, self.optimizer, grouping=grouping, max_grad_norm=1.0, noise_multiplier=1.0,
                    batch_size=len(self.ids), data_size=100 * len(self.ids), norm_mode=norm_mode,
                )  # fmt: skip

    def detach(self) -> None:
        if self.private is not None:
            self.private.detach()
            self.private = None

    def __call__(self) -> None:
        import torch

        autocast = self.precision == "bf16-autocast"
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            loss = self.model(self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def run_one(arch: str, batch: int, seq: int, precision: str, device: str, tiny: bool, rounds: int, steps: int) -> dict:
    """Every style on one workload in this process, interleaved rounds; times in ms per step."""
    model, vocab = build(arch, tiny, device, precision)
    step = Step(model, vocab, batch, seq, device, precision)
    out: dict = {name: {"ms": [], "peak_bytes": None, "error": None} for name in STYLES}
    for r in range(rounds):
        for name, (grouping, norm_mode) in STYLES.items():
            if out[name]["error"]:
                continue
            try:
                step.attach(grouping, norm_mode)
                step()  # warm-up (and the plan)
                _peak_reset(device)
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                out[name]["ms"].append(1000 * (time.perf_counter() - start) / steps)
                if r == 0:
                    out[name]["peak_bytes"] = _peak(device)
            except Exception as exc:  # an out-of-memory style is a result, not the end of the suite
                out[name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            finally:
                step.detach()
                step.optimizer.zero_grad(set_to_none=True)
    base = statistics.median(out["non-private"]["ms"]) if out["non-private"]["ms"] else None
    for row in out.values():
        row["median_ms"] = statistics.median(row["ms"]) if row["ms"] else None
        row["throughput_ratio"] = base / row["median_ms"] if base and row["median_ms"] else None
    return out


def fits(arch: str, batch: int, seq: int, precision: str, device: str, tiny: bool, grouping) -> bool:
    import torch

    try:
        model, vocab = build(arch, tiny, device, precision)
        step = Step(model, vocab, batch, seq, device, precision)
        step.attach(grouping)
        step()
        step()
        step.detach()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def largest_batch(arch, seq, precision, device, tiny, grouping, start: int, limit: int) -> int:
    low, high = 0, start
    while high <= limit and fits(arch, high, seq, precision, device, tiny, grouping):
        low, high = high, high * 2
    if high > limit:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(arch, mid, seq, precision, device, tiny, grouping) else (low, mid)
    return low


def _child(args: argparse.Namespace, payload: dict, timeout: float) -> dict:
    argv = [sys.executable, __file__, "--one", json.dumps(payload), "--device", args.device]
    if args.tiny:
        argv.append("--tiny")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, 1), check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


def _report(results: dict, meta: dict) -> str:
    lines = ["# GPU suite (issue #13): DP step (make_private, noise 1) vs non-private", "",
             f"Command: `{meta['command']}`. Device: {meta['device_name']}. torch {meta['torch']}. "
             f"{meta['rounds']} interleaved rounds x {meta['steps']} steps, medians. Wall time {meta['wall_s']:.0f} s.",
             "", "| workload | style | ms / step | throughput x non-private | peak memory GiB | error |",
             "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for workload, rows in results["workloads"].items():
        if "error" in rows and not isinstance(rows["error"], dict | type(None)):
            lines.append(f"| {workload} | - | - | - | - | {rows['error']} |")
            continue
        for style, row in rows.items():
            ms = f"{row['median_ms']:.1f}" if row.get("median_ms") else "-"
            ratio = f"{row['throughput_ratio']:.3f}" if row.get("throughput_ratio") else "-"
            peak = f"{row['peak_bytes'] / 2**30:.2f}" if row.get("peak_bytes") else "-"
            lines.append(f"| {workload} | {style} | {ms} | {ratio} | {peak} | {row.get('error') or ''} |")
    lines += ["", "## Largest batch (GPT-2 small, T 256)", "", "| style | largest batch |", "|---|---:|"]
    for style, value in results["max_batch"].items():
        lines.append(f"| {style} | {value} |")
    if results["skipped"]:
        lines += ["", "Skipped (the deadline): " + ", ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_suite"), help="path stem")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a logic check)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (a quick check on a CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per workload (default: 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per style and round (default: 3)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no new work after this (default: 420)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        if spec["kind"] == "workload":
            result = run_one(spec["arch"], spec["batch"], spec["seq"], spec["precision"], args.device, args.tiny,
                             spec["rounds"], spec["steps"])  # fmt: skip
        else:
            found = largest_batch(spec["arch"], spec["seq"], spec["precision"], args.device, args.tiny,
                                  spec["grouping"], spec["start"], spec["limit"])  # fmt: skip
            result = {"max_batch": found}
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    start = time.monotonic()
    deadline = start + args.budget_s
    results: dict = {"workloads": {}, "max_batch": {}, "skipped": []}
    for name, arch, batch, seq, precision in WORKLOADS:
        if args.tiny:
            batch, seq = max(2, batch // 8), max(8, seq // 32)
        if time.monotonic() > deadline:
            results["skipped"].append(name)
            continue
        payload = {"kind": "workload", "arch": arch, "batch": batch, "seq": seq, "precision": precision,
                   "rounds": args.rounds, "steps": args.steps}  # fmt: skip
        results["workloads"][name] = _child(args, payload, deadline + 60 - time.monotonic())
        print(name, json.dumps({s: r.get("throughput_ratio") for s, r in results["workloads"][name].items()
                                if isinstance(r, dict)}), flush=True)  # fmt: skip
    for style, grouping in (("non-private", None), ("layer-wise", "layer-wise")):
        if time.monotonic() > deadline:
            results["skipped"].append(f"largest batch {style}")
            continue
        payload = {"kind": "max_batch", "arch": "gpt2-small", "seq": 8 if args.tiny else 256, "precision": "fp32",
                   "grouping": grouping, "start": 32, "limit": 64 if args.tiny else 4096}  # fmt: skip
        results["max_batch"][style] = _child(args, payload, deadline + 60 - time.monotonic()).get("max_batch")
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    meta = {
        "command": "python " + " ".join(sys.argv),
        "device_name": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU",
        "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps,
        "wall_s": time.monotonic() - start,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    args.out.with_suffix(".md").write_text(_report(results, meta))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
