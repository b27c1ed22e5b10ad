"""A corrupt or partial checkpoint a restore skipped is named in the job's
events: the agent reports it (health's ``skipped_checkpoints``), the control
plane writes one ``checkpoint_skipped`` event per checkpoint, restarts
included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gpuscout.agent import core
from gpuscout.agent.fake import FakeAgents
from gpuscout.agent.protocol import AgentState
from gpuscout.config import Settings
from gpuscout.service import build_service
from gpuscout.store import FileStore
from gpuscout.workload.checkpoint import CheckpointStore, NoCheckpoint
from tests.unit.test_controllers import running_job


def test_the_agent_records_each_skipped_checkpoint_once() -> None:
    status = replace(core.initial("i", "j", standby=False), state=AgentState.RUNNING)
    once = core.on_skipped(status, [("k2", "file w.pt: 3 bytes, manifest says 9"),
                                    ("k1", "no manifest")])
    again = core.on_skipped(once, [("k2", "file w.pt: 3 bytes, manifest says 9")])
    assert again is once
    assert once.health().model_dump()["skipped_checkpoints"] == (
        {"key": "k2", "reason": "file w.pt: 3 bytes, manifest says 9"},
        {"key": "k1", "reason": "no manifest"})
    many = core.on_skipped(status, [(f"k{i}", "bad") for i in range(50)])
    assert len(many.skipped_checkpoints) == core.MAX_SKIPPED


def test_a_restore_lists_what_it_skipped(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    checkpoints = CheckpointStore(store, "jobs/j/checkpoints")
    good = checkpoints.save(1, {"w": b"one"})
    bad = checkpoints.save(2, {"w": b"two"})
    store.put(f"{bad.key}/w", b"tw")  # truncated
    partial = checkpoints.save(3, {"w": b"three"})
    store.delete(partial.manifest_key)  # a save cut short
    info, _ = checkpoints.load(None)
    assert info.key == good.key
    assert [(exc.key, exc.reason) for exc in checkpoints.skipped] == [
        (partial.key, "no MANIFEST.json (partial or in progress)"),
        (bad.key, "w: size 2 != 3 in the manifest")]
    empty = CheckpointStore(store, "jobs/none/checkpoints")
    try:
        empty.load(None)
    except NoCheckpoint:
        pass
    assert empty.skipped == []


def test_each_skipped_checkpoint_is_one_event_restarts_included(
        service, agents: FakeAgents, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_id = running_job(service)
    address = f"run-{service.repo.get_job(job_id).instance_id}"
    agents.agents[address].skipped = (("jobs/x/checkpoints/000000000020-a", "no manifest"),)
    for _ in range(3):
        service.plane.reconcile_once()
    agents.agents[address].skipped += (("jobs/x/checkpoints/000000000010-b", "w: altered"),)
    service.plane.reconcile_once()
    events = [e for e in service.repo.list_events(job_id) if e.kind == "checkpoint_skipped"]
    assert [e.message for e in events] == [
        "restore skipped checkpoint jobs/x/checkpoints/000000000020-a: no manifest; it took "
        "the previous verified one",
        "restore skipped checkpoint jobs/x/checkpoints/000000000010-b: w: altered; it took "
        "the previous verified one"]
    # a new control plane on the same database names nothing twice
    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    again = build_service(settings, provider=service.ctx.provider, agents=agents)
    try:
        again.plane.reconcile_once()
        kinds = [e.kind for e in again.repo.list_events(job_id)]
        assert kinds.count("checkpoint_skipped") == 2
    finally:
        again.plane.stop()

