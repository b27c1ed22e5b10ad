"""Checkpoint retention: a running job keeps its newest ``checkpoint_keep``
verified checkpoints; one that ended keeps ``checkpoint_keep_finished``."""

from __future__ import annotations

from dataclasses import replace

from gpuscout.agent.fake import FakeAgents
from gpuscout.agent.protocol import AgentState, checkpoint_prefix
from gpuscout.domain import JobStatus
from gpuscout.service import Service
from gpuscout.workload.checkpoint import CheckpointStore
from tests.unit.test_controllers import ManualClock
from tests.unit.test_job_failures import SPEC, agents, clock, passes, service

__all__ = ["agents", "clock", "service"]  # fixtures used here


def saved(service: Service, agents: FakeAgents, job_id: str, *steps: int) -> CheckpointStore:
    """Checkpoints of these steps in the job's store, as its agent reports them."""
    store = CheckpointStore(service.ctx.store, checkpoint_prefix(job_id))
    for step in steps:
        info = store.save(step, {"state.json": b'{"step": %d}' % step})
        agents.checkpoints[step] = info.key
    return store


def steps_in(store: CheckpointStore) -> list[int]:
    return [c.step for c in store.list()]


def test_a_running_job_keeps_its_newest_checkpoints_and_one_when_done(
        service: Service, agents: FakeAgents, clock: ManualClock) -> None:
    job = service.plane.submit(replace(SPEC, checkpoint_keep=2))
    passes(service, 3, clock)
    assert service.repo.get_job(job.id).status == JobStatus.RUNNING
    store = saved(service, agents, job.id, 10, 20, 30, 40)
    passes(service, 1, clock)
    assert steps_in(store) == [30, 40]
    # A partial save in progress (no manifest yet) is left alone.
    service.ctx.store.put(f"{checkpoint_prefix(job.id)}/000000000050-zz/state.json", b"{}")
    saved(service, agents, job.id, 45)
    passes(service, 1, clock)
    assert steps_in(store) == [40, 45]
    assert any(k.endswith("000000000050-zz/state.json")
               for k in service.ctx.store.list(checkpoint_prefix(job.id)))
    # Completed: the newest one is kept (checkpoint_keep_finished defaults to 1).
    agent = agents.agents[f"run-{service.repo.get_job(job.id).instance_id}"]
    agent.state, agent.exit_code = AgentState.COMPLETED, 0
    passes(service, 2, clock)
    assert service.repo.get_job(job.id).status == JobStatus.COMPLETED
    assert steps_in(store) == [45]
    events = [e for e in service.repo.list_events(job.id) if e.kind == "checkpoints_deleted"]
    assert events and "kept the newest 1" in events[-1].message


def test_a_cancelled_job_that_keeps_none_leaves_no_checkpoint(
        service: Service, agents: FakeAgents, clock: ManualClock) -> None:
    job = service.plane.submit(replace(SPEC, checkpoint_keep_finished=0))
    passes(service, 3, clock)
    store = saved(service, agents, job.id, 10, 20)
    service.plane.cancel(job.id)
    assert steps_in(store) == []
    assert list(service.ctx.store.list(checkpoint_prefix(job.id))) == []
