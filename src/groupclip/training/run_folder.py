"""The run folder: ``config.toml``, ``metrics.jsonl`` (one record per step or evaluation) and ``final.json``."""

from __future__ import annotations

import json
import os
from typing import Any

from .checkpoint import remove_stale_temporaries, write_text_atomically
from .recipe import Recipe, recipe_to_toml


class RunWriter:
    """The run folder (or nothing, when ``run_dir`` is None): config, per-step JSONL, final JSON.

    ``resume_offset``: continue a run's ``metrics.jsonl``, cut back to that length (its length at the checkpoint).
    """

    def __init__(self, run_dir: str | None, recipe: Recipe, resume_offset: int | None = None) -> None:
        self.run_dir = run_dir
        self._metrics = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            write_text_atomically(os.path.join(run_dir, "config.toml"), recipe_to_toml(recipe))
            path = os.path.join(run_dir, "metrics.jsonl")
            if resume_offset is None:
                self._metrics = open(path, "w", encoding="utf-8")
            else:
                remove_stale_temporaries(run_dir)
                with open(path, "ab") as handle:  # creates it if it went missing
                    if handle.tell() > resume_offset:
                        handle.truncate(resume_offset)  # the records of steps after the checkpoint are redone
                self._metrics = open(path, "a", encoding="utf-8")

    def record(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def offset(self) -> int:
        """Bytes written to ``metrics.jsonl`` so far (0 without a run folder)."""
        return self._metrics.tell() if self._metrics is not None else 0

    def finish(self, final: dict[str, Any], headline: str) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.run_dir:
            from .plots import plot_run

            final["plots"] = [os.path.basename(p) for p in plot_run(self.run_dir, headline)]
            write_text_atomically(os.path.join(self.run_dir, "final.json"), json.dumps(final, indent=2))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def records_after(run_dir: str | None, offset: int) -> int:
    """Step records in ``run_dir/metrics.jsonl`` past byte ``offset`` (steps taken after the checkpoint)."""
    path = os.path.join(run_dir or "", "metrics.jsonl")
    if not run_dir or not os.path.exists(path):
        return 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode("utf-8", errors="replace").splitlines()
    return sum(1 for line in tail if line.startswith("{") and '"kind": "eval"' not in line)
