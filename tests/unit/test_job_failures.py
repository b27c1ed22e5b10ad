"""A job's own failures, and one job's failure never holding others back
(controllers over the fake provider and fake agents)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents
from gpuscout.agent.protocol import AgentState
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.controllers.lifecycle import MAX_LAUNCH_FAILURES, launch_backoff_s
from gpuscout.domain import JobSpec, JobStatus, Resources
from gpuscout.providers.base import LaunchError, LaunchRequest, ProviderInstance
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service
from tests.unit.test_controllers import ManualClock, address_for

SPEC = JobSpec(name="train", command="python train.py", resources=Resources(gpus=1))
ERROR = "command exited with code 1; last lines of stderr:\nValueError: boom"


class PickyProvider(FakeProvider):
    """Refuses every launch of one command, as EC2 refuses an AMI it cannot
    find (InvalidAMIID.NotFound): not a capacity problem, and it won't heal."""

    def __init__(self, refuse_command: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.refuse_command = refuse_command

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        if request.command == self.refuse_command:
            with self._lock:
                self.launch_calls.append(request)
            raise LaunchError("InvalidAMIID.NotFound: the image id 'ami-0bad' does not exist")
        return super().launch(request)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents()


def make_service(tmp_path: Path, provider: FakeProvider, agents: FakeAgents,
                 clock: ManualClock) -> Service:
    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    svc = build_service(settings, provider=provider, agents=agents, clock=clock)
    svc.ctx.timeouts = Timeouts(health_s=30, checkpoint_s=1, resume_s=0.5, drain_s=0.5,
                                lost_s=10)
    svc.plane.feed.start(svc.repo, clock.now())
    return svc


@pytest.fixture
def service(tmp_path: Path, agents: FakeAgents, clock: ManualClock) -> Iterator[Service]:
    svc = make_service(tmp_path, FakeProvider(address_for=address_for), agents, clock)
    yield svc
    svc.plane.stop()


def failing_agents(agents: FakeAgents) -> None:
    """Every agent's command fails after its first step."""
    original = agents.agent

    def failing(address: str):  # type: ignore[no-untyped-def]
        a = original(address)
        if a.state == AgentState.RUNNING and a.step >= 1:
            a.state, a.exit_code, a.error = AgentState.FAILED, 1, ERROR
        return a

    agents.agent = failing  # type: ignore[method-assign]


def passes(service: Service, n: int, clock: ManualClock, step_s: float = 1.0) -> None:
    for _ in range(n):
        service.plane.reconcile_once()
        clock.sleep(step_s)


def test_a_failing_command_fails_the_job_with_its_stderr_tail(
        service: Service, agents: FakeAgents, clock: ManualClock) -> None:
    failing_agents(agents)
    job = service.plane.submit(SPEC)
    passes(service, 10, clock)
    job = service.repo.get_job(job.id)
    assert (job.status, job.error, job.restarts) == (JobStatus.FAILED, ERROR, 0)
    failed = [e for e in service.repo.list_events(job.id) if e.kind == "failed"]
    assert failed and "ValueError: boom" in failed[0].message


def test_max_restarts_on_errors_restarts_from_the_checkpoint_then_fails(
        service: Service, agents: FakeAgents, clock: ManualClock) -> None:
    failing_agents(agents)
    agents.checkpoints[5] = "jobs/j/checkpoints/000000000005-v"  # restarts restore it
    provider: FakeProvider = service.ctx.provider  # type: ignore[assignment]
    job = service.plane.submit(replace(SPEC, max_restarts_on_errors=2))
    passes(service, 30, clock)
    job = service.repo.get_job(job.id)
    assert (job.status, job.restarts, job.error) == (JobStatus.FAILED, 2, ERROR)
    assert len(provider.launch_calls) == 3  # the first run and two restarts
    restarts = [e for e in service.repo.list_events(job.id) if e.kind == "restart"]
    assert [e.data["restarts"] for e in restarts] == [1, 2]  # type: ignore[index]
    assert "restart 1 of 2 from the last checkpoint" in restarts[0].message
    assert provider.running_ids() == []


def test_a_launch_refused_for_its_own_reason_backs_off_and_fails_while_others_run(
        tmp_path: Path, agents: FakeAgents, clock: ManualClock) -> None:
    bad_command = "python bad.py"
    provider = PickyProvider(bad_command, address_for=address_for)
    service = make_service(tmp_path, provider, agents, clock)
    try:
        bad = service.plane.submit(replace(SPEC, name="bad", command=bad_command))
        good = service.plane.submit(replace(SPEC, name="good"))
        service.plane.reconcile_once()  # both pending -> scouting
        tries = []
        for _ in range(400):  # 400 passes, 1 s apart: more than the backoff adds up to
            service.plane.reconcile_once()
            tries.append(len([r for r in provider.launch_calls if r.command == bad_command]))
            clock.sleep(1.0)
        # The other job was placed in the first pass and ran meanwhile.
        assert service.repo.get_job(good.id).status in (JobStatus.RUNNING, JobStatus.COMPLETED)
        bad_job = service.repo.get_job(bad.id)
        assert bad_job.status == JobStatus.FAILED
        assert bad_job.error == (f"could not launch after {MAX_LAUNCH_FAILURES} tries: "
                                 "InvalidAMIID.NotFound: the image id 'ami-0bad' does not exist")
        assert tries[-1] == MAX_LAUNCH_FAILURES  # bounded: not one call per pass
        # Backed off: the n-th retry waited launch_backoff_s(n) seconds.
        first_at = [tries.index(n) for n in range(1, MAX_LAUNCH_FAILURES + 1)]
        gaps = [b - a for a, b in zip(first_at, first_at[1:], strict=False)]
        assert gaps == [pytest.approx(launch_backoff_s(n), abs=1.01)
                        for n in range(1, MAX_LAUNCH_FAILURES)]
    finally:
        service.plane.stop()


def test_one_jobs_unexpected_error_is_recorded_and_the_pass_goes_on(
        service: Service, clock: ManualClock) -> None:
    first = service.plane.submit(replace(SPEC, name="broken"))
    second = service.plane.submit(replace(SPEC, name="fine"))
    real = service.plane.lifecycle.reconcile

    def reconcile(job):  # type: ignore[no-untyped-def]
        if job.id == first.id:
            raise RuntimeError("a bug in one job's handling")
        real(job)

    service.plane.lifecycle.reconcile = reconcile  # type: ignore[method-assign]
    passes(service, 5, clock)
    assert service.repo.get_job(second.id).status == JobStatus.RUNNING
    errors = [e for e in service.repo.list_events(first.id) if e.kind == "control_error"]
    assert len(errors) == 1  # once, not once per pass
    assert "RuntimeError: a bug in one job's handling" in errors[0].message


def test_secrets_are_sealed_at_rest_and_handed_to_an_agent_that_awaits_them(
        service: Service, agents: FakeAgents, clock: ManualClock) -> None:
    job = service.plane.submit(SPEC, {"WANDB_API_KEY": "canary-value"})
    assert job.spec.secret_names == ("WANDB_API_KEY",)
    sealed = service.repo.job_row_fields(job.id, "secrets_sealed")["secrets_sealed"]
    assert sealed and "canary-value" not in sealed
    original = agents.health

    def awaiting(address: str):  # type: ignore[no-untyped-def]
        health = original(address)
        return health.model_copy(update={
            "state": AgentState.SETUP, "awaiting_secrets": address not in agents.secrets_sent})

    agents.health = awaiting  # type: ignore[method-assign]
    passes(service, 4, clock)
    assert list(agents.secrets_sent.values()) == [{"WANDB_API_KEY": "canary-value"}]
    request = service.ctx.provider.request_of(  # type: ignore[attr-defined]
        service.repo.get_job(job.id).instance_id)
    assert request.secret_names == ("WANDB_API_KEY",) and "canary-value" not in repr(request)
    # In SETUP the job stays provisioning (its setup may take long).
    assert service.repo.get_job(job.id).status == JobStatus.PROVISIONING


def test_a_replacement_whose_setup_fails_rolls_the_move_back_and_spares_the_offer(
        tmp_path: Path, agents: FakeAgents) -> None:
    from gpuscout.clock import SystemClock
    from tests.unit.test_controllers import G4_SPOT_B, move_to_g4, running_job

    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    svc = build_service(settings, provider=FakeProvider(address_for=address_for),
                        agents=agents, clock=SystemClock())
    svc.ctx.timeouts = Timeouts(health_s=2, checkpoint_s=1, resume_s=0.5, drain_s=0.5,
                                lost_s=2)
    svc.ctx.poll_interval_s = 0.005
    svc.plane.feed.start(svc.repo, svc.ctx.clock.now())
    try:
        job_id = running_job(svc)
        old = svc.repo.get_job(job_id).instance_id
        original = agents.agent

        def setup_fails(address: str):  # type: ignore[no-untyped-def]
            a = original(address)
            if address.startswith("standby-"):
                a.state, a.exit_code = AgentState.FAILED, 1
                a.error = "setup exited with code 1; last lines of stderr:\nNo module named x"
            return a

        agents.agent = setup_fails  # type: ignore[method-assign]
        original_health = agents.health

        def with_phase(address: str):  # type: ignore[no-untyped-def]
            health = original_health(address)
            failed = address.startswith("standby-")
            return health.model_copy(update={"failed_phase": "setup" if failed else None})

        agents.health = with_phase  # type: ignore[method-assign]
        move_to_g4(svc, job_id)
        svc.plane.wait_for_migrations()
        (m,) = svc.repo.list_migrations(job_id=job_id)
        assert m.status.value == "failed" and "No module named x" in (m.error or "")
        job = svc.repo.get_job(job_id)
        assert (job.status, job.instance_id) == (JobStatus.RUNNING, old)
        # The job's own setup failed, not the offer: other jobs may still use it.
        target = next(o for o in svc.ctx.offers() if o.id == G4_SPOT_B)
        assert target.available
    finally:
        svc.plane.stop()


def test_a_job_sees_skypilots_variables_unless_it_sets_them(
        service: Service, clock: ManualClock) -> None:
    job = service.plane.submit(replace(SPEC, envs={"SKYPILOT_NODE_RANK": "mine", "A": "1"}))
    passes(service, 3, clock)
    request = service.ctx.provider.request_of(  # type: ignore[attr-defined]
        service.repo.get_job(job.id).instance_id)
    assert request.env == {"SKYPILOT_NODE_RANK": "mine", "SKYPILOT_NUM_NODES": "1",
                           "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_GPUS_PER_NODE": "1",
                           "SKYPILOT_TASK_ID": job.id, "A": "1"}


def test_of_two_cancels_at_once_one_wins_and_the_other_is_a_conflict(
        tmp_path: Path, agents: FakeAgents) -> None:
    """Two DELETE /jobs/{id} at the same moment (PostgreSQL-like races on
    SQLite too): exactly one cancels, the other answers 409, one event."""
    import threading

    for attempt in range(20):
        svc = make_service(tmp_path / str(attempt), FakeProvider(address_for=address_for),
                           agents, ManualClock())
        try:
            job = svc.plane.submit(SPEC)
            barrier = threading.Barrier(2)
            outcomes: list[str] = []
            threads = [threading.Thread(target=cancel_once, args=(svc, job.id, barrier, outcomes))
                       for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == ["cancelled", "conflict"], outcomes
            events = [e for e in svc.repo.list_events(job.id) if e.kind == "cancelled"]
            assert len(events) == 1
        finally:
            svc.plane.stop()


def cancel_once(svc: Service, job_id: str, barrier: object, outcomes: list[str]) -> None:
    from gpuscout.controllers.context import Conflict

    barrier.wait()  # type: ignore[attr-defined]
    try:
        svc.plane.cancel(job_id)
        outcomes.append("cancelled")
    except Conflict:
        outcomes.append("conflict")
