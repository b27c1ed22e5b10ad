"""Folder jobs (GPUSCOUT_CHECKPOINT_DIR and SIGUSR1): the agent's decisions
as table tests (gpuscout.agent.core), and the folder's side
(gpuscout.agent.ckptdir) on real files and a real file store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuscout.agent import ckptdir, core
from gpuscout.agent.core import AgentStatus, CheckpointRequest
from gpuscout.agent.protocol import AgentState
from gpuscout.store import FileStore
from gpuscout.workload.checkpoint import CheckpointStore

S = AgentState


def status(state: AgentState = S.RUNNING, **fields: Any) -> AgentStatus:
    return replace(core.initial("i-1", "job-1", standby=False), state=state, **fields)


def req(id: int, pause: bool, after: int = 0) -> CheckpointRequest:
    return CheckpointRequest(id=id, pause=pause, after=after)


# --- the mode -------------------------------------------------------------------


def test_a_call_from_the_command_makes_it_a_library_job_for_good() -> None:
    assert core.on_workload_call(status()).checkpoint_mode == core.LIBRARY
    assert core.on_workload_call(status(checkpoint_mode=core.DIR)).checkpoint_mode == core.LIBRARY
    # the grace running out after a call changes nothing
    assert core.plain_mode(status(checkpoint_mode=core.LIBRARY)).checkpoint_mode == core.LIBRARY


def test_a_silent_command_is_a_running_folder_job() -> None:
    after = core.plain_mode(status(S.STARTING))
    assert (after.checkpoint_mode, after.state) == (core.DIR, S.RUNNING)


@pytest.mark.parametrize(
    ("fields", "wanted"),
    [
        ({"checkpoint_mode": core.DIR, "pending": (req(1, True),)}, True),
        ({"checkpoint_mode": core.DIR, "pending": (req(1, False),)}, True),  # a spot notice
        ({"checkpoint_mode": core.DIR, "pending": ()}, False),  # nothing asked
        ({"checkpoint_mode": core.DIR, "pending": (req(1, True),), "signal_sent": True}, False),
        ({"checkpoint_mode": None, "pending": (req(1, True),)}, False),  # not known yet
        ({"checkpoint_mode": core.LIBRARY, "pending": (req(1, True),)}, False),
        # paused by a save it made of its own accord: it must stop too
        ({"checkpoint_mode": core.DIR, "state": S.PAUSED}, True),
        ({"checkpoint_mode": core.DIR, "pending": (req(1, True),), "state": S.STANDBY}, False),
        ({"checkpoint_mode": core.DIR, "pending": (req(1, True),), "state": S.COMPLETED}, False),
    ],
)
def test_when_sigusr1_is_sent(fields: dict[str, Any], wanted: bool) -> None:
    state = fields.pop("state", S.RUNNING)
    assert core.wants_signal(status(state, **fields)) is wanted


# --- saves and exits --------------------------------------------------------------


def test_a_save_answers_the_pending_requests_and_pauses_if_one_asked() -> None:
    before = status(S.STARTING, pending=(req(1, False), req(2, True)), signal_sent=True,
                    checkpoint_mode=core.DIR)
    after, counted = core.on_saved(before, step=40, key="k40", at=12.5)
    assert counted
    assert (after.state, after.step, after.last_step_at) == (S.PAUSED, 40, 12.5)
    assert (after.last_checkpoint_step, after.last_checkpoint_key) == (40, "k40")
    assert after.pending == () and after.checkpoints_reported == 1
    assert core.checkpoint_outcome(after, req(2, True)) is not None


def test_a_save_made_before_the_signal_answers_nothing() -> None:
    # STEP written at 10.0, SIGUSR1 sent at 10.5, the upload done after:
    # the save the signal asks for comes next and answers the request
    before = status(pending=(req(1, True),), signal_sent=True, signalled_at=10.5,
                    checkpoint_mode=core.DIR, step=30)
    after, counted = core.on_saved(before, step=40, key="k40", at=10.0)
    assert counted and after.pending == before.pending and after.state is S.RUNNING
    assert (after.last_checkpoint_step, after.step) == (40, 40)
    assert core.checkpoint_outcome(after, req(1, True)) is None  # still waiting
    final, _ = core.on_saved(after, step=43, key="k43", at=11.0)
    assert final.state is S.PAUSED and final.last_checkpoint_step == 43
    assert core.checkpoint_outcome(final, req(1, True)) is not None


def test_a_periodic_save_records_the_step_and_settles_the_mode() -> None:
    after, counted = core.on_saved(status(S.STARTING), step=10, key="k10", at=1.0)
    assert counted and after.state is S.RUNNING and after.checkpoint_mode == core.DIR
    assert after.step == 10 and after.last_checkpoint_step == 10


@pytest.mark.parametrize("state", [S.PAUSED, S.COMPLETED, S.FAILED])
def test_a_save_after_the_pause_or_the_end_does_not_count(state: AgentState) -> None:
    before = status(state, checkpoint_mode=core.DIR, last_checkpoint_step=40,
                    last_checkpoint_key="k40", step=40)
    after, counted = core.on_saved(before, step=41, key="k41", at=2.0)
    assert not counted and after == before


@pytest.mark.parametrize(
    ("code", "saved", "state", "error"),
    [
        (0, True, S.PAUSED, None),  # saved on SIGUSR1 and exited, as asked
        (-signal.SIGUSR1, True, S.PAUSED, None),  # no handler: killed; its last save holds
        (0, False, S.FAILED, "command exited (code 0) after SIGUSR1 without saving a "
                            "checkpoint in GPUSCOUT_CHECKPOINT_DIR"),
        (3, True, S.FAILED, "command exited with code 3"),  # its own failure
    ],
)
def test_the_exit_after_sigusr1(code: int, saved: bool, state: AgentState,
                                error: str | None) -> None:
    fields: dict[str, Any] = {"last_checkpoint_step": 30, "last_checkpoint_key": "k30"} \
        if saved else {}
    before = status(checkpoint_mode=core.DIR, signal_sent=True, step=30,
                    pending=(req(1, True, after=0),), **fields)
    after = core.on_exit(before, code)
    assert (after.state, after.error) == (state, error)
    assert after.pending == ()
    if state is S.PAUSED:  # the request still pending is answered with the last save
        outcome = core.checkpoint_outcome(after, req(1, True, after=0))
        assert outcome is not None and getattr(outcome, "step", None) == 30


def test_an_exit_without_the_signal_is_the_end_of_the_job() -> None:
    after = core.on_exit(status(checkpoint_mode=core.DIR, step=100), 0)
    assert after.state is S.COMPLETED


def test_a_stop_is_not_a_pause() -> None:
    before = status(checkpoint_mode=core.DIR, signal_sent=True, stopping=True,
                    last_checkpoint_step=3, last_checkpoint_key="k")
    assert core.on_exit(before, 0).state is S.COMPLETED


@pytest.mark.parametrize("exited_first", [True, False])
def test_a_resume_starts_a_signalled_command_again(exited_first: bool) -> None:
    paused = status(S.PAUSED, checkpoint_mode=core.DIR, signal_sent=True,
                    last_checkpoint_step=30, last_checkpoint_key="k30", step=30)
    if exited_first:
        after = core.resume(core.on_exit(paused, 0))
    else:  # the resume comes while it is still saving; it exits after
        after = core.on_exit(core.resume(paused), 0)
    assert after.resume_pending
    restarted = core.dir_started(core.resume(after), 30, at=50.0)
    assert (restarted.state, restarted.signal_sent, restarted.resume_pending) == (
        S.RUNNING, False, False)


def test_a_library_resume_never_asks_for_a_restart() -> None:
    assert not core.resume(status(S.PAUSED, checkpoint_mode=core.LIBRARY)).resume_pending


def test_a_replacement_started_on_the_restored_folder_resumed_at_the_next_step() -> None:
    after = core.dir_started(status(S.RESTORING, standby=True), 40, at=99.0)
    assert (after.state, after.step, after.first_step, after.first_step_at) == (
        S.RUNNING, 40, 41, 99.0)
    assert after.health().checkpoint_mode == core.DIR
    fresh = core.dir_started(status(S.STARTING), None, at=5.0)
    assert fresh.state is S.RUNNING and fresh.first_step is None and fresh.step is None


# --- the folder -------------------------------------------------------------------


def write_save(folder: Path, step: int, payload: bytes) -> ckptdir.Save:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "state.pt").write_bytes(payload)
    (folder / "sub" / "extra.bin").write_bytes(payload[::-1])
    (folder / ".STEP.tmp").write_text(f"{step}\n")
    os.replace(folder / ".STEP.tmp", folder / "STEP")
    save = ckptdir.read_step(folder)
    assert save is not None and save.step == step
    return save


@pytest.mark.parametrize("text", ["", "abc", "-3", "1.5", "\x00\xff"])
def test_a_step_file_that_is_not_a_step_is_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / "STEP").write_text(text, errors="surrogateescape")
    assert ckptdir.read_step(tmp_path) is None
    assert ckptdir.read_step(tmp_path / "absent") is None


def test_a_snapshot_copies_the_save_and_leaves_hidden_files_out(tmp_path: Path) -> None:
    folder, copy = tmp_path / "ckpt", tmp_path / "copy"
    save = write_save(folder, 7, b"weights")
    (folder / ".partial").write_bytes(b"half-written")
    copy.mkdir()
    files = ckptdir.snapshot(folder, copy, save)
    assert files is not None and sorted(files) == ["STEP", "state.pt", "sub/extra.bin"]
    assert files["state.pt"].read_bytes() == b"weights"
    assert files["STEP"].read_text() == "7\n"


def test_a_snapshot_of_a_save_overtaken_by_the_next_is_refused(tmp_path: Path) -> None:
    folder, copy = tmp_path / "ckpt", tmp_path / "copy"
    old = write_save(folder, 7, b"weights-7")
    write_save(folder, 8, b"weights-8")
    copy.mkdir()
    assert ckptdir.snapshot(folder, copy, old) is None


def test_restore_fills_the_folder_with_a_verified_checkpoint_and_skips_a_corrupt_one(
        tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, "jobs/j/checkpoints")
    for step in (10, 20):
        folder = tmp_path / f"save{step}"
        save = write_save(folder, step, f"weights-{step}".encode())
        copy = tmp_path / f"copy{step}"
        copy.mkdir()
        files = ckptdir.snapshot(folder, copy, save)
        assert files is not None
        checkpoints.save_paths(step, files)
    newest = checkpoints.latest()
    assert newest is not None and newest.step == 20
    store.put(f"{newest.key}/state.pt", b"tampered")  # altered after its manifest

    target = tmp_path / "GPUSCOUT_CHECKPOINT_DIR"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"from an earlier run")
    info = ckptdir.restore(checkpoints, None, target)
    assert info is not None and info.step == 10  # the previous good one
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) \
        == ["STEP", "state.pt", "sub/extra.bin"]
    assert (target / "state.pt").read_bytes() == b"weights-10"
    assert ckptdir.restore(CheckpointStore(store, "jobs/other/checkpoints"), None, target) is None
    assert list(target.iterdir()) == []  # a fresh start: empty


def test_the_mode_marker_round_trips_and_ignores_junk(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    marker = ckptdir.ModeMarker(store, "jobs/j/checkpoint-mode")
    assert marker.read() is None
    marker.write("dir")
    assert marker.read() == "dir"
    store.put("jobs/j/checkpoint-mode", b"something else")
    assert marker.read() is None


def test_the_signal_goes_to_the_script_not_its_shell_wrapper() -> None:
    shell = subprocess.Popen(["bash", "-c", f"cd / && {sys.executable} -c "
                              "'import time; time.sleep(30)'; true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        # until the child has exec'd python (forked, it is a bash a moment)
        while (target := ckptdir.main_process(shell.pid)) == shell.pid or not Path(
                f"/proc/{target}/cmdline").read_bytes().startswith(sys.executable.encode()):
            assert time.monotonic() < deadline, "the script never started"
            time.sleep(0.01)
        assert target != shell.pid
        assert Path(f"/proc/{target}/cmdline").read_bytes().endswith(b"time.sleep(30)\x00")
        assert ckptdir.main_process(target) == target  # not a shell: itself
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)
