"""File checkpoints in the workload library: ``step_done(files=...)`` and
``restore_dir()``, standalone and against a scripted agent client: what is
saved and restored, the damage that is never restored, local staging that is
always cleaned up, and the script's mistakes that raise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuscout import workload
from gpuscout.agent.protocol import ProgressAction
from gpuscout.store import FileStore, ObjectStore, open_store
from gpuscout.workload.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    CorruptCheckpoint,
    NoCheckpoint,
)
from gpuscout.workload.runtime import STANDALONE_CHECKPOINT_DIR, WORK_DIR, AgentUnavailable
from tests.unit.test_workload_runtime import BrokenStore, SlowStore, timed


def standalone(folder: Path, every: int | None = 5) -> workload.Run:
    return workload.init(checkpoint_every=every, default_dir=folder, environ={})


def files_of(step: int) -> dict[str, bytes]:
    return {
        "weights.bin": bytes([step % 256]) * 3000 + os.urandom(16),
        "meta/step.json": f'{{"step": {step}}}'.encode(),
        "meta/deep/empty.bin": b"",
    }


def writer(contents: dict[str, bytes], calls: list[Path] | None = None) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        assert folder.is_dir() and not any(folder.iterdir())  # fresh and empty
        if calls is not None:
            calls.append(folder)
        for name, data in contents.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return write


def read_dir(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_store(folder: Path) -> ObjectStore:
    return open_store((folder / STANDALONE_CHECKPOINT_DIR).resolve().as_uri())


def test_files_are_saved_when_due_and_restored_into_a_fresh_folder(tmp_path: Path) -> None:
    saved: dict[int, dict[str, bytes]] = {}
    staged: list[Path] = []
    with standalone(tmp_path) as run:
        assert run.restore_dir() is None  # a fresh start
        for step in range(1, 13):
            saved[step] = files_of(step)
            run.step_done(step, loss=0.5, total_steps=12,
                          files=writer(saved[step], staged))
        assert len(staged) == 2  # steps 5 and 10 only
        run.flush()  # step 10's upload runs in the background
        assert run.last_checkpoint is not None and run.last_checkpoint.step == 10
        assert not any(path.exists() for path in staged)  # staging deleted after upload
        assert not (tmp_path / WORK_DIR).exists()

    with standalone(tmp_path) as again:
        restored = again.restore_dir()
        assert restored is not None
        step, folder = restored
        assert step == 10 and read_dir(folder) == saved[10]
        assert folder.is_relative_to(tmp_path / WORK_DIR)
        assert again.last_checkpoint is not None and again.last_checkpoint.step == 10
        # a second restore replaces the first folder
        step2, folder2 = again.restore_dir() or (None, tmp_path)
        assert step2 == 10 and folder2 != folder and not folder.exists()
    assert not folder2.exists() and not (tmp_path / WORK_DIR).exists()  # close() cleans


def _missing(store: ObjectStore, info: CheckpointInfo) -> None:
    store.delete(f"{info.key}/weights.bin")


def _truncated(store: ObjectStore, info: CheckpointInfo) -> None:
    key = f"{info.key}/weights.bin"
    store.put(key, store.get(key)[:-1])


def _altered(store: ObjectStore, info: CheckpointInfo) -> None:
    key = f"{info.key}/meta/step.json"
    data = bytearray(store.get(key))
    data[-2] ^= 0x01  # same size, one bit flipped
    store.put(key, bytes(data))


def _no_manifest(store: ObjectStore, info: CheckpointInfo) -> None:
    store.delete(info.manifest_key)


def _garbled_manifest(store: ObjectStore, info: CheckpointInfo) -> None:
    store.put(info.manifest_key, b"{not json")


@pytest.mark.parametrize(
    "damage", [_missing, _truncated, _altered, _no_manifest, _garbled_manifest],
    ids=lambda f: f.__name__.strip("_"))
def test_restore_dir_skips_a_damaged_checkpoint_for_the_previous_one(
    tmp_path: Path, damage: Callable[[ObjectStore, CheckpointInfo], None]
) -> None:
    with standalone(tmp_path, every=None) as run:
        run.checkpoint_files(4, writer(files_of(4)))
        bad = run.checkpoint_files(8, writer(files_of(8)))
    good_files = CheckpointStore(checkpoint_store(tmp_path), "checkpoints").load(4)[1]
    damage(checkpoint_store(tmp_path), bad)

    with standalone(tmp_path) as again:
        restored = again.restore_dir()
        assert restored is not None
        step, folder = restored
        assert step == 4 and read_dir(folder) == good_files
        assert not any(".gpuscout-tmp-" in p.name for p in folder.rglob("*"))


def test_restore_dir_with_only_damaged_checkpoints_starts_fresh(tmp_path: Path) -> None:
    with standalone(tmp_path, every=None) as run:
        bad = run.checkpoint_files(3, writer(files_of(3)))
    _truncated(checkpoint_store(tmp_path), bad)
    with standalone(tmp_path) as again:
        assert again.restore_dir() is None
    assert not (tmp_path / WORK_DIR).exists()


def test_restore_dir_into_a_folder_of_the_callers(tmp_path: Path) -> None:
    with standalone(tmp_path, every=None) as run:
        run.checkpoint_files(2, writer(files_of(2)))
        dest = tmp_path / "mine"
        (dest / "x").mkdir(parents=True)
        with pytest.raises(ValueError, match="empty folder"):
            run.restore_dir(dest)
        (dest / "x").rmdir()
        assert run.restore_dir(dest) == (2, dest)
        assert read_dir(dest)["meta/step.json"] == b'{"step": 2}'
    assert dest.is_dir()  # the caller's: left alone by close()


def test_json_and_file_checkpoints_are_read_by_their_own_call(tmp_path: Path) -> None:
    with standalone(tmp_path, every=1) as run:
        run.step_done(1, state={"w": 0.1})
        step, folder = run.restore_dir() or (None, tmp_path)
        assert step == 1 and read_dir(folder) == {"state.json": b'{"w":0.1}'}
        run.step_done(2, files=writer(files_of(2)))
        with pytest.raises(CheckpointError, match="restore_dir"):
            run.restore()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({}, ValueError), ({"state": {"w": 1}, "files": writer({})}, ValueError),
     ({"files": b"not a function"}, TypeError)],
    ids=["neither", "both", "not-callable"])
def test_exactly_one_kind_of_state_per_step(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with standalone(tmp_path, every=None) as run, pytest.raises(error):
        run.step_done(1, **kwargs)  # raised even when no checkpoint is due


def _symlinked_folder(folder: Path) -> None:
    elsewhere = folder.parents[2] / "elsewhere"  # beside the run's folder
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "a.bin").write_bytes(b"a")
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe")


@pytest.mark.parametrize(
    ("save", "match"),
    [(writer({}), "wrote no file"),
     (writer({MANIFEST: b"{}"}), "reserved"),
     (writer({".gpuscout-tmp-x": b"x"}), "invalid object key"),
     (_symlinked_folder, "symlink"),
     (_fifo, "not a regular file")],
    ids=["nothing", "manifest", "reserved-prefix", "symlinked-folder", "fifo"])
def test_a_bad_files_function_raises_and_leaves_nothing(
    tmp_path: Path, save: Callable[[Path], None], match: str
) -> None:
    with standalone(tmp_path / "out", every=1) as run:
        with pytest.raises(ValueError, match=match):
            run.step_done(1, files=save)
        assert run.last_checkpoint is None
    assert CheckpointStore(checkpoint_store(tmp_path / "out"), "checkpoints").list() == []
    assert not (tmp_path / "out" / WORK_DIR).exists()


def test_an_error_of_the_files_function_propagates_and_staging_is_cleaned(
    tmp_path: Path,
) -> None:
    seen: list[Path] = []

    def broken(folder: Path) -> None:
        seen.append(folder)
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("torch.save failed")

    with standalone(tmp_path, every=1) as run, pytest.raises(RuntimeError, match="torch.save"):
        run.step_done(1, files=broken)
    assert seen and not seen[0].exists()


def test_a_failing_upload_does_not_stop_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    staged: list[Path] = []
    run = workload.Run(checkpoints=CheckpointStore(BrokenStore(), "ck"), checkpoint_every=1,
                       instance_id="i", default_dir=tmp_path)
    run.step_done(1, files=writer(files_of(1), staged))
    run.step_done(2, files=writer(files_of(2), staged))
    run.flush()
    assert run.last_checkpoint is None and len(staged) == 2
    assert "checkpoint of step 1 failed" in caplog.text
    assert not any(path.exists() for path in staged)
    with pytest.raises(OSError):
        run.checkpoint_files(3, writer(files_of(3)))  # the direct call raises
    run.close()


def test_staging_left_by_a_killed_run_is_swept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    work = tmp_path / WORK_DIR
    dead = work / f"save-{dead_pid}-0123abcd"
    alive = work / f"save-{os.getppid()}-0123abcd"  # a live process: kept
    other = work / "notes"
    for folder in (dead, alive, other):
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x")
    with standalone(tmp_path, every=1) as run:
        run.step_done(1, files=writer(files_of(1)))
    assert not dead.exists() and alive.exists() and other.exists()


# --- under an agent (scripted client) ------------------------------------------------


class ScriptedAgent:
    """The workload side of the protocol, scripted: ask for a checkpoint and
    a pause after ``checkpoint_at``; record what the run reports."""

    def __init__(self, checkpoint_at: int, target: int | None = None) -> None:
        self.checkpoint_at = checkpoint_at
        self.target = target
        self.calls: list[tuple[Any, ...]] = []

    def restore_target(self) -> int | None:
        self.calls.append(("restore_target",))
        return self.target

    def progress(self, step: int, *, loss: float | None, total_steps: int | None,
                 at: float) -> ProgressAction:
        self.calls.append(("progress", step))
        if step == self.checkpoint_at:
            return ProgressAction.CHECKPOINT
        return ProgressAction.CONTINUE

    def checkpointed(self, step: int, key: str, *, periodic: bool = False) -> ProgressAction:
        self.calls.append(("checkpointed", step, key, *(("periodic",) if periodic else ())))
        return ProgressAction.CONTINUE if periodic else ProgressAction.PAUSE

    def skipped(self, checkpoints: list[tuple[str, str]]) -> None:
        self.calls.append(("skipped", *(key for key, _ in checkpoints)))

    def wait_resume(self) -> None:
        self.calls.append(("wait_resume",))

    def close(self) -> None:
        self.calls.append(("close",))


def managed(tmp_path: Path, agent: ScriptedAgent) -> workload.Run:
    ckpts = CheckpointStore(open_store((tmp_path / "store").as_uri()), "jobs/j/checkpoints")
    return workload.Run(checkpoints=ckpts, checkpoint_every=None, instance_id="i-a",
                        default_dir=tmp_path / "work", agent=agent,  # type: ignore[arg-type]
                        workload_port=0)


def test_under_an_agent_a_files_checkpoint_is_reported_and_pauses(tmp_path: Path) -> None:
    agent = ScriptedAgent(checkpoint_at=3)
    with managed(tmp_path, agent) as run:
        for step in range(1, 6):
            run.step_done(step, loss=1.0, total_steps=5, files=writer(files_of(step)))
    assert run.last_checkpoint is not None
    key = run.last_checkpoint.key
    assert agent.calls == [("progress", 1), ("progress", 2), ("progress", 3),
                           ("checkpointed", 3, key), ("wait_resume",),
                           ("progress", 4), ("progress", 5), ("close",)]

    # the replacement restores the step the agent names
    new = ScriptedAgent(checkpoint_at=-1, target=3)
    with managed(tmp_path, new) as replacement:
        step, folder = replacement.restore_dir() or (None, tmp_path)
        assert step == 3 and read_dir(folder)["meta/step.json"] == b'{"step": 3}'
    assert new.calls[0] == ("restore_target",)


def test_under_an_agent_a_named_step_that_does_not_exist_raises(tmp_path: Path) -> None:
    with managed(tmp_path, ScriptedAgent(-1, target=7)) as run, pytest.raises(NoCheckpoint):
        run.restore_dir()
    assert not (tmp_path / "work" / WORK_DIR).exists()


def test_under_an_agent_a_named_step_that_is_damaged_raises(tmp_path: Path) -> None:
    agent = ScriptedAgent(checkpoint_at=2)
    with managed(tmp_path, agent) as run:
        run.checkpoint_files(1, writer(files_of(1)))
        bad = run.checkpoint_files(2, writer(files_of(2)))
    _altered(open_store((tmp_path / "store").as_uri()), bad)
    named = ScriptedAgent(-1, target=2)
    with managed(tmp_path, named) as again, pytest.raises(CorruptCheckpoint):
        again.restore_dir()
    assert ("skipped", bad.key) in named.calls  # the agent is told which one


# --- periodic checkpoints upload in the background ------------------------------------


def test_a_periodic_files_checkpoint_is_staged_then_uploaded_in_the_background(
    tmp_path: Path,
) -> None:
    store = SlowStore(tmp_path / "store", delay_s=0.3)  # four writes: >= 1.2 s
    staged: list[Path] = []
    contents = {step: files_of(step) for step in (1, 2, 3)}
    run = workload.Run(checkpoints=CheckpointStore(store, "ck"), checkpoint_every=2,
                       instance_id="i", default_dir=tmp_path / "work")
    run.step_done(1, files=writer(contents[1], staged))
    assert timed(lambda: run.step_done(2, files=writer(contents[2], staged))) < 0.25
    assert len(staged) == 1 and staged[0].is_dir()  # written here, uploading from it
    run.step_done(3, files=writer(contents[3], staged))
    run.close()  # waits for the upload
    assert not staged[0].exists() and not (tmp_path / "work" / WORK_DIR).exists()
    assert run.last_checkpoint is not None and run.last_checkpoint.step == 2
    info, files = CheckpointStore(store, "ck").load(None)
    assert info.step == 2 and files == contents[2]  # every byte as staged


def test_an_agent_request_waits_for_the_upload_in_flight_then_saves_synchronously(
    tmp_path: Path,
) -> None:
    store = SlowStore(tmp_path / "store", delay_s=0.3)
    agent = ScriptedAgent(checkpoint_at=3)
    run = workload.Run(checkpoints=CheckpointStore(store, "ck"), checkpoint_every=2,
                       instance_id="i", default_dir=tmp_path / "work",
                       agent=agent, workload_port=0)  # type: ignore[arg-type]
    with run:
        run.step_done(1, files=writer(files_of(1)))
        assert timed(lambda: run.step_done(2, files=writer(files_of(2)))) < 0.25
        # step 3: the agent asks (a move): step 2's upload finishes first, then
        # step 3 is saved and reported before step_done returns
        assert timed(lambda: run.step_done(3, files=writer(files_of(3)))) > 1.0
        ckpts = CheckpointStore(store, "ck").list()
        assert [c.step for c in ckpts] == [2, 3]
        assert run.last_checkpoint == ckpts[-1]
        # step 3 was reported while step 2 was uploading; step 2's report
        # (periodic: it answers no request) comes before step 3's
        assert agent.calls == [
            ("progress", 1), ("progress", 2), ("progress", 3),
            ("checkpointed", 2, ckpts[0].key, "periodic"), ("checkpointed", 3, ckpts[1].key),
            ("wait_resume",)]
        run.step_done(4, files=writer(files_of(4)))
    assert store.most_active == 1
    assert [c.step for c in CheckpointStore(store, "ck").list()] == [2, 3, 4]
    assert agent.calls[-2:] == [("checkpointed", 4, run.last_checkpoint.key, "periodic"),
                                ("close",)]


class AgentGoneForPeriodic(ScriptedAgent):
    def checkpointed(self, step: int, key: str, *, periodic: bool = False) -> ProgressAction:
        raise AgentUnavailable("agent gone")


def test_an_agent_gone_while_reporting_in_the_background_raises_in_training(
    tmp_path: Path,
) -> None:
    run = workload.Run(checkpoints=CheckpointStore(FileStore(tmp_path / "store"), "ck"),
                       checkpoint_every=1, instance_id="i", default_dir=tmp_path / "work",
                       agent=AgentGoneForPeriodic(-1), workload_port=0)  # type: ignore[arg-type]
    run.step_done(1, files=writer(files_of(1)))
    with pytest.raises(AgentUnavailable):
        run.step_done(2, files=writer(files_of(2)))
    run.close()
