"""Run a function on N gloo processes (CPU) and collect each rank's result or error, with a hang timeout.

    results = run_ranks(worker, world_size=2, args=(...,))   # worker(rank, world_size, *args) at module level

Each rank joins a fresh ``gloo`` process group on a free local port. A rank's return value comes back through
``torch.save`` bytes (tensors keep their dtype and values exactly). If any rank raises, :class:`RankFailures`
lists every rank's outcome; if the ranks do not all finish within ``timeout`` seconds the survivors are killed and
:class:`RankHang` is raised -- a test never waits forever.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch


class RankFailures(RuntimeError):
    def __init__(self, outcomes: dict[int, tuple[str, Any]]) -> None:
        self.outcomes = outcomes
        lines = [f"rank {r}: {kind}: {value}" for r, (kind, value) in sorted(outcomes.items())]
        super().__init__("\n".join(lines))

    def errors(self) -> dict[int, str]:
        """``{rank: "ErrorType: message"}`` of the ranks that raised."""
        return {r: v for r, (k, v) in self.outcomes.items() if k == "error"}


class RankHang(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, out: Any) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, "ok", buffer.getvalue()))
    except BaseException as err:  # reported to the parent, which fails the test
        out.put((rank, "error", f"{type(err).__name__}: {err}", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 180.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process in one gloo group."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, out)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    tracebacks: dict[int, str] = {}
    try:
        while len(outcomes) < world_size:
            try:
                item = out.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankHang(
                    f"ranks {missing} did not finish within {timeout:.0f} s; outcomes so far: {outcomes}"
                ) from None
            rank, kind, value = item[0], item[1], item[2]
            outcomes[rank] = (kind, value)
            if kind == "error":
                tracebacks[rank] = item[3]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if any(kind == "error" for kind, _ in outcomes.values()):
        failures = RankFailures(outcomes)
        failures.tracebacks = tracebacks
        raise failures
    return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(world_size)]
