"""The crash-test hook: a process dies by SIGKILL exactly at the failpoint
GPUSCOUT_FAILPOINT names, and nowhere else (nothing at all when it is unset)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

# Prints what ran, so the test sees where the process died.
SCRIPT = """
from gpuscout.controllers import failpoints
print("start", flush=True)
with failpoints.phase_change("booting", "checkpointing"):
    print("write", flush=True)
print("after", flush=True)
"""


def run(failpoint: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
    if failpoint is not None:
        env["GPUSCOUT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("failpoint", "printed"), [
    ("booting:end", "start"),  # before the phase change is written
    ("checkpointing", "start write"),  # right after it is written
])
def test_the_named_failpoint_kills_the_process_there(failpoint: str, printed: str) -> None:
    done = run(failpoint)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == printed.split()
    assert f"failpoint {failpoint}: SIGKILL" in done.stderr


@pytest.mark.parametrize("failpoint", [None, "", "restoring", "checkpointing:end", "booting"])
def test_no_other_value_fires(failpoint: str | None) -> None:
    done = run(failpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["start", "write", "after"]
