"""A dependency-free progress line: step, loss, headline metric, epsilon and ETA.

On a terminal it redraws one line; otherwise (a log file, a sweep's captured output) it prints a line every
``1/lines`` of the run so background logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressBar:
    """``update(step, **fields)`` after each step; ``close()`` at the end (prints the final line).

    ``initial``: the step a resumed run starts from (the ETA counts only the steps taken by this process)."""

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, lines: int = 20, initial: int = 0
    ) -> None:
        self.total = max(1, total)
        self.initial = initial  # steps done before this process started (a resumed run)
        self.label = label
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.every = max(1, self.total // lines)
        self.start = time.perf_counter()
        self.fields: dict[str, str] = {}
        self._last_draw = 0.0
        self._step = initial

    def update(self, step: int, **fields: float | str | None) -> None:
        self._step = step
        for key, value in fields.items():
            if value is not None:
                self.fields[key] = f"{value:.4g}" if isinstance(value, float) else str(value)
        now = time.perf_counter()
        if self.interactive and (now - self._last_draw > 0.2 or step == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.render(step, now) + "\033[K")
            self.stream.flush()
        elif not self.interactive and (step % self.every == 0 or step == self.total):
            self.stream.write(self.render(step, now) + "\n")
            self.stream.flush()

    def render(self, step: int, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        done = min(step / self.total, 1.0)
        bar = "#" * int(done * 20) + "." * (20 - int(done * 20))
        done_here = step - self.initial
        eta = elapsed / done_here * (self.total - step) if done_here > 0 else 0.0
        extras = " ".join(f"{k} {v}" for k, v in self.fields.items())
        timing = f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"
        return f"{self.label} [{bar}] {step}/{self.total} {extras} ({timing})".strip()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\r" + self.render(self._step) + "\033[K\n")
            self.stream.flush()
