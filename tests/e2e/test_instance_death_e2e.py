"""An instance that dies during a move, on real processes (issue 12, item 2).

The old instance is SIGKILLed while its replacement boots after a spot
notice, or frozen (SIGSTOP) while it checkpoints. Either way the
replacement already on its way takes over from the latest verified
checkpoint: the job runs again one boot after the notice, not two; no third
instance is launched; the dead row stops being billed; and the job ends with
the very model an uninterrupted run produces.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E, wait
from tests.e2e.test_migration_e2e import P3_SPOT_A, assert_same_model, no_g4dn_spot

pytestmark = pytest.mark.e2e

SLOW_BOOT_S = 6.0  # the replacement's boot; the old instance dies meanwhile


def signal_instance(e2e: E2E, instance_id: str, sig: int) -> None:
    pids = e2e.pids_of(instance_id)
    assert pids, f"no process of {instance_id}"
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def events(e2e: E2E, job_id: str) -> list[dict[str, Any]]:
    return list(e2e.api.get(f"/api/v1/jobs/{job_id}/events",
                            params={"limit": 500}).json()["data"])


def assert_taken_over(e2e: E2E, job_id: str, old: str) -> dict[str, Any]:
    (m,) = e2e.migrations(job_id)
    assert m["status"] == "completed", m
    instances = e2e.api.get("/api/v1/instances", params={"job_id": job_id}).json()["data"]
    assert sorted(i["id"] for i in instances) == sorted([old, m["to_instance_id"]])
    row = next(i for i in instances if i["id"] == old)
    assert row["status"] == "failed" and row["terminated_at"], row
    kinds = [e["kind"] for e in events(e2e, job_id)]
    assert "instance_lost" in kinds and "migration_failed" not in kinds, kinds
    done = next(e for e in events(e2e, job_id) if e["kind"] == "migration_completed")
    assert done["message"].startswith(f"recovered on {m['to_instance_id']} after {old} "
                                      "was lost"), done
    assert m["resume_step"] == m["checkpoint_step"] + 1
    return m


def test_old_instance_killed_while_the_replacement_boots_after_a_notice(
        e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 500, 23
    no_g4dn_spot(e2e)
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.03, checkpoint_every=10)
    job = e2e.wait_status(job_id, "running")
    assert job["offer_id"] == P3_SPOT_A
    old = job["instance_id"]
    e2e.wait_step(job_id, 40)
    e2e.provider.boot_delay_s = SLOW_BOOT_S  # replacements boot slowly from now on

    notice = time.monotonic()
    assert e2e.api.post(f"/api/v1/instances/{old}/interrupt").status_code == 202
    e2e.wait(lambda: "emergency_checkpoint" in [e["kind"] for e in events(e2e, job_id)],
             20, "the emergency checkpoint")
    e2e.wait(lambda: (e2e.migrations(job_id) or [{}])[0].get("phase") == "booting",
             10, "the replacement to be booting")
    signal_instance(e2e, old, signal.SIGKILL)  # the notice's window ran out
    killed = time.monotonic()

    e2e.wait_migration(job_id, 1, timeout_s=60)
    running_again = time.monotonic()
    assert_taken_over(e2e, job_id, old)
    # Back to training one boot after the notice (the replacement already
    # booting), not after a second full boot launched at the kill.
    assert running_again - notice < SLOW_BOOT_S + 6, (running_again - notice,
                                                       running_again - killed)
    lost = next(e for e in events(e2e, job_id) if e["kind"] == "instance_lost")
    assert "terminated by the provider" in lost["message"] and "booting" in lost["message"]
    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)


def test_old_instance_frozen_while_it_checkpoints_is_replaced_by_the_ready_replacement(
        e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 80, 29
    no_g4dn_spot(e2e)
    # Long steps: the checkpoint waits for the next step boundary, long
    # enough for the test to freeze the machine in the middle of it.
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.4, checkpoint_every=5)
    old = e2e.wait_status(job_id, "running")["instance_id"]
    e2e.wait_step(job_id, 12)
    started = time.monotonic()
    assert e2e.manual_move(job_id).status_code == 202

    def checkpointing() -> bool:
        return (e2e.migrations(job_id) or [{}])[0].get("phase") == "checkpointing"

    wait(checkpointing, 20, "the move to checkpoint", poll_s=0.01)
    signal_instance(e2e, old, signal.SIGSTOP)  # frozen: running, but answers nothing
    try:
        e2e.wait_migration(job_id, 1, timeout_s=60)
        took = time.monotonic() - started
        m = assert_taken_over(e2e, job_id, old)
        lost = next(e for e in events(e2e, job_id) if e["kind"] == "instance_lost")
        assert "has not answered" in lost["message"] and "checkpointing" in lost["message"]
        # lost_s (5 s) after the freeze, not checkpoint_s (20 s).
        assert took < 15, took
        assert e2e.pids_of(old) == []  # fenced: terminated though it never died
        assert m["to_instance_id"] == e2e.job(job_id)["instance_id"]
    finally:
        for pid in e2e.pids_of(old):
            os.kill(pid, signal.SIGCONT)
    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)
