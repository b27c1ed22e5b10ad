"""An instance that dies in any phase of a move is a recovery, not a rollback
to nothing (issue 12, item 2), under the control plane with fake agents.

- the old instance dies while the replacement boots: the replacement takes
  over from the latest checkpoint; no third instance;
- the old instance freezes (unreachable, still running for the provider)
  while it checkpoints: the same, within ``lost_s``, not ``checkpoint_s``;
- the replacement dies while restoring: noticed in about a second, not after
  ``resume_s``, and the job resumes on the old instance, paused at its
  checkpoint;
- a lost instance's row is terminated, so its billing stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.domain import InstanceStatus, JobStatus, MigrationStatus
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service
from tests.unit.test_controllers import G4_SPOT_B, running_job


@pytest.fixture
def service(tmp_path: Path, provider: FakeProvider, agents: FakeAgents) -> Iterator[Service]:
    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    svc = build_service(settings, provider=provider, agents=agents)
    # Generous limits: each test shows that death is noticed long before them.
    svc.ctx.timeouts = Timeouts(health_s=30, checkpoint_s=60, resume_s=60, drain_s=0.5,
                                lost_s=1.0, setup_s=60)
    svc.ctx.poll_interval_s = 0.005
    svc.plane.feed.start(svc.repo, svc.ctx.clock.now())
    yield svc
    svc.plane.stop()


def kinds(service: Service, job_id: str) -> list[str]:
    return [e.kind for e in service.repo.list_events(job_id)]


def message(service: Service, job_id: str, kind: str) -> str:
    return next(e.message for e in service.repo.list_events(job_id) if e.kind == kind)


def assert_taken_over(service: Service, provider: FakeProvider, job_id: str, old: str) -> str:
    """The move completed as a recovery on its replacement; the old row is
    terminated; two instances were launched in all."""
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.status == MigrationStatus.COMPLETED, m.error
    job = service.repo.get_job(job_id)
    assert (job.status, job.instance_id) == (JobStatus.RUNNING, m.to_instance_id)
    assert len(provider.launch_calls) == 2  # the first instance and the replacement
    row = service.repo.get_instance(old)
    assert row.status == InstanceStatus.FAILED and row.terminated_at is not None
    assert provider.running_ids() == [m.to_instance_id]
    lost = message(service, job_id, "instance_lost")
    assert lost.startswith(old) and f"replacement {m.to_instance_id} takes over" in lost
    done = message(service, job_id, "migration_completed")
    assert done.startswith(f"recovered on {m.to_instance_id} after {old} was lost"), done
    assert "migration_failed" not in kinds(service, job_id)
    assert m.to_instance_id is not None
    return m.to_instance_id


def test_the_old_instance_dying_while_the_replacement_boots_hands_over_to_it(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    agents.checkpoints[7] = "jobs/j/checkpoints/000000000007-v"  # the latest verified
    original = agents.agent
    booted = threading.Event()

    def slow_boot(address: str):  # type: ignore[no-untyped-def]
        a = original(address)
        if address.startswith("standby-") and not booted.is_set():
            a.reachable = False  # still booting...
            if not provider.get(old).state.value == "terminated":
                provider.die(old)  # ...when the old instance is reclaimed
                agents.agents[f"run-{old}"].reachable = False
                threading.Timer(0.3, booted.set).start()
        elif address.startswith("standby-"):
            a.reachable = True
        return a

    agents.agent = slow_boot  # type: ignore[method-assign]
    service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.migrate(job_id, G4_SPOT_B)
    service.plane.wait_for_migrations()
    new = assert_taken_over(service, provider, job_id, old)
    assert ("restore", f"standby-{new}") in agents.calls
    assert agents.agents[f"standby-{new}"].first_step == 8  # the checkpoint's next step
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert (m.checkpoint_step, m.resume_step) == (7, 8)
    # The old instance was never asked to checkpoint: it was gone.
    assert ("checkpoint", f"run-{old}") not in agents.calls
    # Its billing stopped when it was found lost: only the replacement is billed.
    service.plane.reconcile_once()
    assert [i.id for i in service.repo.list_instances(job_id=job_id, live_only=True)] == [new]


def test_a_frozen_old_instance_is_lost_within_lost_s_and_the_ready_replacement_takes_over(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    frozen = threading.Event()

    def hangs(address: str, *, pause: bool, timeout_s: float):  # type: ignore[no-untyped-def]
        agents.agents[address].reachable = False  # the machine freezes mid-save
        frozen.wait(timeout_s)
        raise AssertionError("unreachable")

    agents.checkpoint = hangs  # type: ignore[method-assign]
    started = time.monotonic()
    service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.migrate(job_id, G4_SPOT_B)
    service.plane.wait_for_migrations(timeout_s=30)
    took = time.monotonic() - started
    frozen.set()
    assert_taken_over(service, provider, job_id, old)
    assert took < 10, took  # lost_s (1 s) and a liveness check, not checkpoint_s (60 s)
    assert "has not answered" in message(service, job_id, "instance_lost")
    assert old in provider.terminate_calls  # fenced: terminated, though it still ran


def test_a_replacement_killed_while_restoring_is_noticed_in_seconds(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""

    def dies(address: str, step: int | None) -> None:
        agents.calls.append(("restore", address))
        agents.agents[address].reachable = False
        provider.die(address.removeprefix("standby-"))

    agents.restore = dies  # type: ignore[method-assign]
    started = time.monotonic()
    service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.migrate(job_id, G4_SPOT_B)
    service.plane.wait_for_migrations(timeout_s=30)
    assert time.monotonic() - started < 5  # resume_s is 60 s
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.status == MigrationStatus.FAILED
    assert "terminated by the provider while restoring" in (m.error or ""), m.error
    job = service.repo.get_job(job_id)
    assert (job.status, job.instance_id) == (JobStatus.RUNNING, old)
    assert agents.agents[f"run-{old}"].step == m.checkpoint_step  # resumed there
    assert f"job stays on {old}" in message(service, job_id, "migration_failed")


def test_a_move_whose_old_and_new_instances_both_die_recovers_and_says_so(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""

    def both_die(address: str, step: int | None) -> None:
        agents.agents[address].reachable = False
        provider.die(address.removeprefix("standby-"))
        agents.agents[f"run-{old}"].reachable = False
        provider.die(old)

    agents.restore = both_die  # type: ignore[method-assign]
    service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.migrate(job_id, G4_SPOT_B)
    service.plane.wait_for_migrations(timeout_s=30)
    job = service.repo.get_job(job_id)
    assert (job.status, job.instance_id) == (JobStatus.RECOVERING, None)
    row = service.repo.get_instance(old)
    assert row.status == InstanceStatus.FAILED and row.terminated_at is not None
    failed = message(service, job_id, "migration_failed")
    assert "stays on" not in failed and "is lost too" in failed, failed
    service.plane.reconcile_once()
    service.plane.reconcile_once()
    assert service.repo.get_job(job_id).status in (JobStatus.PROVISIONING, JobStatus.RUNNING)
