"""Failpoints: a test hook that kills the control plane at a chosen instant.

Does nothing unless ``GPUSCOUT_FAILPOINT`` is set. It exists so that crash
tests (``bench/crash_matrix.py``, ``tests/e2e/test_crash_matrix.py``) can
SIGKILL a real ``gpuscout up`` inside a migration phase that lasts only
milliseconds (switching, terminating), in the manner of etcd's gofail and
FoundationDB's buggify. Never set it on a control plane that matters.

    GPUSCOUT_FAILPOINT=<phase>      die right after <phase> is persisted,
                                    before any of its side effects
    GPUSCOUT_FAILPOINT=<phase>:end  die once <phase>'s work is done, just
                                    before the next phase is persisted

``<phase>`` is a ``MigrationPhase`` value (launching, booting, checkpointing,
restoring, switching, terminating). The migration executor persists LAUNCHING
when it records the move, and DONE, not through a phase change: so
``launching`` never fires, nor does ``terminating:end`` in a move that runs
through (only in a repair that finishes a move left in TERMINATING), while
``launching:end`` (the replacement is launched, its migration does not name
it yet) and ``terminating`` do.

The process kills itself with SIGKILL, as ``kill -9`` would: no handler, no
``finally`` and no buffered write runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

ENV = "GPUSCOUT_FAILPOINT"


def hit(name: str) -> None:
    """SIGKILL this process if ``GPUSCOUT_FAILPOINT`` names ``name``."""
    if os.environ.get(ENV) != name:
        return
    # One line to say why the log stops here (stderr is unbuffered enough
    # for one write, and nothing after the kill would flush it).
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"failpoint {name}: SIGKILL (pid {os.getpid()})\n")
        sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def phase_change(leaving: str, entering: str) -> Iterator[None]:
    """Around the write that moves a migration from phase ``leaving`` to
    ``entering``: ``<leaving>:end`` fires before it, ``<entering>`` after it
    (only if the write succeeded)."""
    hit(f"{leaving}:end")
    yield
    hit(entering)
