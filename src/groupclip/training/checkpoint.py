"""Checkpoints of a training run, written atomically into the run folder (``checkpoint.pt``).

    save_checkpoint(state, run_dir)      # temp file in run_dir, fsync, os.replace onto checkpoint.pt, fsync run_dir
    state = load_checkpoint(run_dir)     # CheckpointError (one line) when there is none or it cannot be read

A kill at any moment leaves ``checkpoint.pt`` either the previous complete checkpoint or the new complete one,
never a half-written file: the new one is written (readable by its owner only) under a temporary name
(``.checkpoint-*.tmp``) in the same folder, flushed and fsynced, and only then renamed over the old one
(``os.replace`` is atomic within a file system); the folder is fsynced so the rename survives a power cut too. A
temporary file left behind by a kill is never read, and :func:`remove_stale_temporaries` deletes it when the run
resumes.

**Keep checkpoints private.** A checkpoint holds the noise generator's state. That state determines the noise of
every later step, and the torch generator (MT19937) can also be run backwards to recover the noise of earlier
steps. Anyone holding a checkpoint together with the model could therefore subtract the noise from the released
updates. The run deletes its checkpoint when it finishes unless ``run.keep_checkpoint`` is set.

Testing hook: with ``GROUPCLIP_TEST_CHECKPOINT_PAUSE=SECONDS`` (or ``SECONDS@STEP``: only the save of that step)
in the environment, a save writes the first half of the temporary file, flushes it, sleeps that long, then writes
the rest, so a test can kill the process in the middle of a write.
"""

from __future__ import annotations

import glob
import io
import os
import tempfile
import time
from typing import Any

import torch

from ..errors import GroupClipError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
PAUSE_ENV = "GROUPCLIP_TEST_CHECKPOINT_PAUSE"
_TEMP_PREFIX, _TEMP_SUFFIX = ".checkpoint-", ".tmp"


class CheckpointError(GroupClipError, ValueError):
    """A run folder has no usable checkpoint, or a checkpoint does not fit the run resuming from it."""


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT)


def save_checkpoint(state: dict[str, Any], run_dir: str) -> str:
    """Write ``state`` (``torch.save``) to ``run_dir/checkpoint.pt`` atomically; returns the path."""
    final = checkpoint_path(run_dir)
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            if _pause_now(state):  # testing hook: a half-written temporary file for a while
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(float(os.environ[PAUSE_ENV].split("@")[0]))
                handle.write(data[len(data) // 2 :])
            else:
                torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_folder(run_dir)
    return final


def _pause_now(state: dict[str, Any]) -> bool:
    """The testing hook: ``GROUPCLIP_TEST_CHECKPOINT_PAUSE=SECONDS`` (every save) or ``SECONDS@STEP``."""
    value = os.environ.get(PAUSE_ENV, "")
    if not value:
        return False
    seconds, _, step = value.partition("@")
    return float(seconds) > 0 and (not step or int(step) == state.get("step"))


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace`` (no half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".write-", suffix=_TEMP_SUFFIX, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it owner-only)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(run_dir: str) -> dict[str, Any]:
    """The latest checkpoint of ``run_dir``.

    Raises:
        CheckpointError: no checkpoint, or one that cannot be read or has another format.
    """
    path = checkpoint_path(run_dir)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} has no checkpoint ({CHECKPOINT}): nothing to resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: name it, in one line
        raise CheckpointError(
            f"{path} cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a groupclip training checkpoint of format {FORMAT}.")
    return state


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete temporary files left by a save that was killed; returns their paths."""
    stale = glob.glob(os.path.join(run_dir, _TEMP_PREFIX + "*" + _TEMP_SUFFIX))
    stale += glob.glob(os.path.join(run_dir, ".write-*" + _TEMP_SUFFIX))
    for path in stale:
        try:
            os.unlink(path)
        except OSError:
            pass
    return stale


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
