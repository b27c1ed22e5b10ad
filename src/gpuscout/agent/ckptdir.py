"""Checkpoints of a script that does not import GPU Scout: a folder and a signal.

The convention SageMaker's checkpoint folder and SLURM's ``SIGUSR1`` have
taught users, as the agent keeps it:

- ``GPUSCOUT_CHECKPOINT_DIR`` names a local folder. When the command starts
  it holds the files of the checkpoint to resume from (empty on a fresh
  start), ``STEP`` among them.
- The script saves by writing its files there and then a file ``STEP``
  holding the number of completed steps, written last (under a temporary
  name, then renamed over ``STEP``). The agent sees each new ``STEP``,
  copies the folder aside and uploads the copy as a verified checkpoint of
  that step while the script trains on.
- On ``SIGUSR1`` (a move, or a spot interruption notice) the script saves at
  its next step boundary and exits 0. The replacement, already booted and set
  up, starts the command on the restored folder.

This module holds the folder's side (reading ``STEP``, copying a save
aside, restoring a checkpoint into the folder) and finds the process to
signal; the agent's server decides when (``gpuscout.agent.core``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from gpuscout.store import ObjectNotFound, ObjectStore
from gpuscout.workload.checkpoint import MANIFEST, CheckpointInfo, CheckpointStore, NoCheckpoint

log = logging.getLogger("gpuscout.agent")

STEP_FILE = "STEP"
# Longest STEP file read (a number and a newline).
_MAX_STEP_BYTES = 64
# Names a shell wrapper may have: ``bash -c "cd x && python train.py"``
# keeps bash as the leader; the signal is meant for the script.
_SHELLS = frozenset({"bash", "sh", "dash", "zsh"})


class ModeMarker:
    """How the job checkpoints ("library": it calls the agent through
    ``gpuscout.workload``; "dir": the folder convention), kept beside its
    checkpoints so that a replacement knows before it starts the command:
    a library job's replacement starts it at once and waits in standby
    (its imports and data loading happen before the move pauses the old
    instance); a folder job's replacement starts it only on the restored
    folder."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store = store
        self.key = key

    def read(self) -> str | None:
        try:
            text = self.store.get(self.key).decode(errors="replace").strip()
        except ObjectNotFound:
            return None
        return text if text in ("library", "dir") else None

    def write(self, mode: str) -> None:
        self.store.put(self.key, mode.encode())


@dataclass(frozen=True, slots=True)
class Save:
    """One save the script finished: its step and when ``STEP`` was written."""

    step: int
    mtime_ns: int

    @property
    def at(self) -> float:
        return self.mtime_ns / 1e9


def read_step(folder: Path) -> Save | None:
    """The save ``folder/STEP`` announces, or None (no STEP yet, or one that
    does not hold a non-negative integer: logged, and ignored until the
    script writes a good one)."""
    path = folder / STEP_FILE
    try:
        stat = path.stat()
        raw = path.read_bytes()[:_MAX_STEP_BYTES]
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    try:
        step = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        log.warning("%s does not hold a step number: %r", path, raw[:20])
        return None
    if step < 0:
        log.warning("%s holds a negative step: %d", path, step)
        return None
    return Save(step, stat.st_mtime_ns)


def snapshot(folder: Path, dest: Path, save: Save) -> dict[str, Path] | None:
    """Copy the files of ``folder`` into the empty folder ``dest`` and return
    them as {checkpoint file name: path}; None when the script started
    another save meanwhile (``STEP`` changed), so the copy may mix two.

    Hidden files (a script's ``.STEP.tmp``) and the store's reserved names
    are left out; symlinks are followed if they point to a file.
    """
    files: dict[str, Path] = {}
    for here, dirs, names in os.walk(folder):
        base = Path(here)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            source = base / name
            rel = source.relative_to(folder).as_posix()
            if name.startswith(".") or rel == MANIFEST or not source.is_file():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target)
            except FileNotFoundError:
                return None  # removed by a save under way
            files[rel] = target
    if read_step(folder) != save or STEP_FILE not in files:
        return None
    return dict(sorted(files.items()))


def clear(folder: Path) -> None:
    """Empty ``folder`` (created if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def restore(checkpoints: CheckpointStore, step: int | None, folder: Path) -> CheckpointInfo | None:
    """Fill ``folder`` with the checkpoint of ``step`` (None: the newest that
    verifies; None returned when there is none), every file checked against
    its manifest before it lands. Raises NoCheckpoint / CorruptCheckpoint
    for a named step that does not exist / verify."""
    clear(folder)
    try:
        return checkpoints.load_to_dir(folder, step)
    except NoCheckpoint:
        if step is not None:
            raise
        return None


def main_process(leader: int) -> int:
    """The process a signal for "the script" goes to: the command's own
    process, looking through shell wrappers (``bash -c "cd x && python
    train.py"`` keeps bash as the leader, with the script its one child).
    Signalling the whole group would also reach a data loader's worker
    processes, which ``SIGUSR1`` kills by default."""
    pid = leader
    try:
        process = psutil.Process(pid)
        while process.name() in _SHELLS:
            children = process.children()
            if len(children) != 1:
                break
            process = children[0]
        return process.pid
    except psutil.Error:
        return pid
