"""Pipeline clipping cost on CPU (gloo, 2 stages): non-private vs per-device vs all-layer clipping.

    .venv/bin/python benchmarks/pipeline_clipping.py            # ~2-4 minutes on 2 cores; spawns 2 processes itself

Each process runs one stage of a token MLP (``[B, T, d]``, Linear+Tanh blocks split 2 ways) with torch's
``ScheduleGPipe`` / ``Schedule1F1B``. For every (schedule, microbatches) configuration the three modes are
interleaved step by step (round-robin, a barrier before each timed step), so machine load hits them alike. A step is
``schedule.step`` + ``optimizer.step()`` + ``zero_grad``; in the DP modes the step adds noise of ``--noise`` sigma
(default 0, to isolate the cost of clipping as the other groupclip benchmarks do) and divides by the expected batch
size. A step's time is the slowest stage's. Reported: the median step time over the timed steps and its ratio to
the non-private pipeline; bytes communicated per step -- the schedule's P2P activations and activation gradients at
the stage boundary (computed from the boundary shape) and groupclip's own collectives (measured: per-device only a
2-value flag all-reduce at ``optimizer.step``; all-layer also a 4-value header and one all-reduce of the step's
per-sample squared norms); the time spent in groupclip's collectives (which includes waiting for the slower stage);
and the engine's peak held bytes (what clipping keeps beyond autograd).

Writes ``benchmarks/results/cpu_pipeline_clipping.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from groupclip.distributed.pipeline import make_private_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MODES = ("non-private", "per-device", "all-layer")


def _stage_module(rank: int, width: int, blocks: int, classes: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2 * blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    full = OrderedDict((str(i), m) for i, m in enumerate(layers))
    cut = 2 * blocks  # stage 0: the first `blocks` Linear+Tanh pairs
    keys = list(full)[:cut] if rank == 0 else list(full)[cut:]
    return nn.Sequential(OrderedDict((k, full[k]) for k in keys))


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="sum")


def _build(mode: str, rank: int, args, schedule_name: str, microbatches: int):
    module = _stage_module(rank, args.width, args.blocks, args.classes)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    schedule_class = SCHEDULES[schedule_name]
    if mode == "non-private":
        stage = PipelineStage(module, rank, 2, torch.device("cpu"))
        schedule = schedule_class(stage, microbatches, loss_fn=_loss, scale_grads=False)
        return module, optimizer, schedule, None
    private = make_private_pipeline(
        module,
        optimizer,
        stage_index=rank,
        num_stages=2,
        grouping=mode,
        max_grad_norm=1.0,
        noise_multiplier=args.noise,
        batch_size=args.batch,
        data_size=100 * args.batch,
        seed=0,
    )
    schedule = private.schedule(schedule_class, n_microbatches=microbatches, loss_fn=_loss)
    return module, optimizer, schedule, private


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, args.seq, args.width, generator=gen)
        y = torch.randint(0, args.classes, (args.batch, args.seq), generator=gen)
        results = []
        for schedule_name in args.schedules:
            for microbatches in args.microbatches:
                runs = {mode: _build(mode, rank, args, schedule_name, microbatches) for mode in MODES}
                times: dict[str, list[float]] = {m: [] for m in MODES}
                comm_s: dict[str, list[float]] = {m: [] for m in MODES}
                for step in range(args.warmup + args.steps):
                    for mode in MODES:
                        _, optimizer, schedule, private = runs[mode]
                        before = dict(private.communication) if private else None
                        dist.barrier()
                        start = time.perf_counter()
                        schedule.step(x) if rank == 0 else schedule.step(target=y)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        elapsed = time.perf_counter() - start
                        if step >= args.warmup:
                            times[mode].append(elapsed)
                            if private:
                                comm_s[mode].append(private.communication["seconds"] - before["seconds"])
                row_stage = {}
                for mode in MODES:
                    _, _, _, private = runs[mode]
                    row_stage[mode] = {
                        "times": times[mode],
                        "comm_seconds": comm_s[mode],
                        "comm_bytes_per_step": private.communication["bytes"] / (args.warmup + args.steps)
                        if private
                        else 0,
                        "peak_held_bytes": private.engine.peak_held_bytes if private else 0,
                    }
                    if private:
                        private.detach()
                gathered: list = [None, None]
                dist.all_gather_object(gathered, row_stage)
                results.append({"schedule": schedule_name, "microbatches": microbatches, "stages": gathered})
                if rank == 0:
                    print(f"  done: {schedule_name}, {microbatches} microbatches", flush=True)
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _summarise(results: list[dict], args) -> list[dict]:
    boundary = args.batch * args.seq * args.width * 4  # float32 activations at the cut, all microbatches
    rows = []
    for result in results:
        stages = result["stages"]
        base = None
        for mode in MODES:
            per_step = [max(a, b) for a, b in zip(stages[0][mode]["times"], stages[1][mode]["times"], strict=True)]
            median = statistics.median(per_step)
            base = median if mode == "non-private" else base
            comm_s = zip(stages[0][mode]["comm_seconds"], stages[1][mode]["comm_seconds"], strict=True)
            comm = [max(a, b) for a, b in comm_s]
            rows.append(
                {
                    "schedule": result["schedule"],
                    "microbatches": result["microbatches"],
                    "mode": mode,
                    "median_step_s": median,
                    "time_ratio": median / base,
                    "p2p_bytes_per_step": 2 * boundary,
                    "groupclip_bytes_per_step": stages[0][mode]["comm_bytes_per_step"],
                    "groupclip_comm_s_per_step": statistics.median(comm) if comm else 0.0,
                    "peak_held_bytes": [s[mode]["peak_held_bytes"] for s in stages],
                }
            )
    return rows


def _markdown(rows: list[dict], meta: dict) -> str:
    m, c = meta["machine"], meta["config"]
    lines = [
        "# Pipeline clipping on CPU: per-device vs all-layer (2 stages, gloo)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {m['cpu_model']}; {m['usable_cores']} usable cores; torch {m['torch_version']}, Python "
        f"{m['python_version']}. Two processes (one stage each, 1 thread each), gloo on localhost. "
        f"Started {meta['started']}, finished {meta['finished']}.",
        "",
        f"Model: token MLP, {2 * c['blocks']} Linear({c['width']}, {c['width']})+Tanh blocks and a "
        f"Linear({c['width']}, {c['classes']}) head, split {c['blocks']} blocks | {c['blocks']} blocks + head; "
        f"batch {c['batch']} x seq {c['seq']} (float32), per-token cross-entropy summed. Step = schedule.step + "
        f"optimizer.step (SGD; DP modes: noise sigma = {c['noise']:g}, then / expected batch) + zero_grad; "
        "the slowest stage's time; median of "
        f"{c['steps']} timed steps after {c['warmup']} warm-up steps, the three modes interleaved step by step.",
        "",
        "*P2P* is the schedule's own traffic at the cut (activations forward + their gradients backward), the same "
        "in every mode. *groupclip* is what the DP modes add: per-device a 2-value flag all-reduce at "
        "optimizer.step (16 B), all-layer also a 4-value header (32 B) and the all-reduce of the step's per-sample "
        "squared norms (batch x 4 B). *comm time* is the median time per step inside groupclip's collectives "
        "(includes waiting for the other stage). *held* is the engine's peak of bytes kept for clipping beyond "
        "autograd, per stage: all-layer keeps every microbatch's tensors until the step's norm all-reduce.",
        "",
        "*time x* is the ratio to the non-private pipeline of the same configuration, *vs per-device* the ratio of "
        "all-layer to per-device. The DP modes' overhead over non-private is the engine's clipping work on the slower "
        "stage (the same as in one process at these microbatch sizes); all-layer adds the norm all-reduce and keeps "
        "every microbatch's tensors until it.",
        "",
        "| schedule | microbatches | mode | step (ms) | time x | vs per-device | P2P (KiB/step) | groupclip (B/step) "
        "| comm time (ms/step) | held stage 0 / 1 (KiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    per_device = {(r["schedule"], r["microbatches"]): r["median_step_s"] for r in rows if r["mode"] == "per-device"}
    for r in rows:
        held = " / ".join(f"{b / 1024:,.0f}" for b in r["peak_held_bytes"])
        versus = "-"
        if r["mode"] == "all-layer":
            versus = f"{r['median_step_s'] / per_device[r['schedule'], r['microbatches']]:.2f}x"
        lines.append(
            f"| {r['schedule']} | {r['microbatches']} | {r['mode']} | {r['median_step_s'] * 1e3:.1f} | "
            f"{r['time_ratio']:.2f}x | {versus} | {r['p2p_bytes_per_step'] / 1024:,.0f} | "
            f"{r['groupclip_bytes_per_step']:,.0f} | "
            f"{r['groupclip_comm_s_per_step'] * 1e3:.2f} | {held if r['mode'] != 'non-private' else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=2, help="Linear+Tanh blocks per stage")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"], choices=list(SCHEDULES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--noise", type=float, default=0.0, help="noise multiplier of the DP modes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="cpu_pipeline_clipping")
    args = parser.parse_args()

    if str(REPO_ROOT) not in sys.path:  # run as a script: the harness is imported from the repository root
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.harness.suite import machine_info

    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(args, port, out), nprocs=2, join=True)
        results = json.loads(Path(out).read_text())
    rows = _summarise(results, args)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info("cpu"),
        "config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "name")},
        "started": started,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    markdown = _markdown(rows, meta)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.md").write_text(markdown)
    (out_dir / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows, "raw": results}, indent=1))
    print(markdown)


if __name__ == "__main__":
    main()
