"""The controllers over a fake provider and in-memory agents: placement,
make-before-break moves, every rollback path, restart repair, cancel,
recovery and the reaper. Real processes are in tests/e2e."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents, fake_address
from gpuscout.agent.protocol import AgentState, checkpoint_prefix
from gpuscout.config import Settings
from gpuscout.controllers.plane import Conflict, InvalidRequest, ManualMarketOnly
from gpuscout.domain import (
    Capacity,
    InstanceStatus,
    JobSpec,
    JobStatus,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    OnBudget,
    Resources,
)
from gpuscout.market.feeds import TraceFeed
from gpuscout.policy import ZONE_BACKOFF_S
from gpuscout.providers.base import CapacityError, LaunchRequest, ProviderError
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service

P3_SPOT_A = "local:us-east-1a:p3.2xlarge:spot"
G4_SPOT_B = "local:us-east-1b:g4dn.xlarge:spot"
P3_SPOT_B = "local:us-east-1b:p3.2xlarge:spot"


address_for = fake_address


SPEC = JobSpec(name="train", command="python train.py", resources=Resources(gpus=1))


def run_until(service: Service, job_id: str, status: JobStatus, passes: int = 20) -> None:
    for _ in range(passes):
        if service.repo.get_job(job_id).status == status:
            return
        service.plane.reconcile_once()
    assert service.repo.get_job(job_id).status == status


def wait_for_event(service: Service, job_id: str, kind: str, timeout_s: float = 5) -> None:
    """Some events are written by a background thread (an emergency checkpoint)."""
    deadline = time.monotonic() + timeout_s
    while kind not in [e.kind for e in service.repo.list_events(job_id)]:
        assert time.monotonic() < deadline, f"no {kind} event for {job_id}"
        time.sleep(0.01)


def running_job(service: Service) -> str:
    # Make p3.2xlarge spot in us-east-1a the cheapest by taking away g4dn.
    for offer in service.repo.list_offers():
        if offer.instance_type == "g4dn.xlarge" and offer.capacity.value == "spot":
            service.plane.update_offer(offer.id, available=False)
    job = service.plane.submit(SPEC)
    run_until(service, job.id, JobStatus.RUNNING)
    return job.id


def move_to_g4(service: Service, job_id: str) -> None:
    service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.migrate(job_id, G4_SPOT_B)


def test_job_starts_on_the_cheapest_available_compatible_offer(service: Service) -> None:
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    assert job.offer_id == P3_SPOT_A
    instance = service.repo.get_instance(job.instance_id or "")
    assert instance.status == InstanceStatus.RUNNING
    assert service.ctx.router.resolve(job_id) == instance.address
    # Each instance gets its own agent token, handed to it at launch.
    (request,) = service.ctx.provider.launch_calls  # type: ignore[attr-defined]
    assert len(request.agent_token) >= 24
    assert service.ctx.agents.tokens[instance.address] == request.agent_token  # type: ignore[attr-defined]


def test_price_drop_migrates_make_before_break(service: Service, provider: FakeProvider,
                                                agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id)
    service.plane.update_offer(G4_SPOT_B, available=True)
    decisions = service.plane.scout_once(force=True)
    assert decisions[0].move and decisions[0].target and decisions[0].target.id == G4_SPOT_B
    service.plane.wait_for_migrations()

    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.status == MigrationStatus.COMPLETED, m.error
    assert m.reason == MigrationReason.PRICE
    assert m.resume_step == (m.checkpoint_step or 0) + 1
    assert m.downtime_s is not None and m.downtime_s >= 0
    assert m.expected_savings == pytest.approx(1 - 0.1578 / 0.5 / 0.918)
    for stamp in (m.started_at, m.replacement_ready_at, m.checkpointed_at, m.resumed_at,
                  m.switched_at, m.finished_at):
        assert stamp is not None
    assert (m.started_at <= m.replacement_ready_at <= m.checkpointed_at  # type: ignore[operator]
            <= m.resumed_at <= m.switched_at <= m.finished_at)
    job = service.repo.get_job(job_id)
    assert (job.status, job.offer_id, job.instance_id) == (
        JobStatus.RUNNING, G4_SPOT_B, m.to_instance_id)
    # Make before break: the replacement launched before the old one was
    # checkpointed, and the old one was terminated only after the new resumed.
    order = [c for c in agents.calls if c[0] != "health"]
    assert order == [("checkpoint", f"run-{old.instance_id}"),
                     ("restore", f"standby-{m.to_instance_id}")]
    assert provider.terminate_calls == [old.instance_id]
    assert service.repo.get_instance(old.instance_id or "").status == InstanceStatus.TERMINATED
    assert service.ctx.router.resolve(job_id) == f"standby-{m.to_instance_id}"
    # The provider heard of each route: first placement, then the switch.
    assert provider.route_calls == [(job_id, old.instance_id), (job_id, m.to_instance_id)]


def test_a_route_the_provider_moves_an_address_for(service: Service,
                                                  provider: FakeProvider) -> None:
    """What follows the job on the provider's side (an Elastic IP) is best
    effort, and an address that moved with it is persisted and used."""
    job_id = running_job(service)
    instance = service.repo.get_instance(service.repo.get_job(job_id).instance_id or "")
    token = service.ctx.agents.tokens[instance.address]  # type: ignore[attr-defined]

    provider.next_route_error = ProviderError("AssociateAddress: UnauthorizedOperation")
    service.ctx.route(job_id, instance)
    assert service.ctx.router.resolve(job_id) == instance.address  # the proxy still routes
    (failed,) = [e for e in service.repo.list_events(job_id) if e.kind == "route_failed"]
    assert "UnauthorizedOperation" in failed.message

    provider.route_addresses[instance.id] = "203.0.113.7:8700"
    service.ctx.route(job_id, instance)
    assert service.repo.get_instance(instance.id).address == "203.0.113.7:8700"
    assert service.ctx.router.resolve(job_id) == "203.0.113.7:8700"
    assert service.ctx.agents.tokens["203.0.113.7:8700"] == token  # type: ignore[attr-defined]
    # A restarted control plane rebuilds the route from the stored address.
    service.ctx.router.switch(job_id, None)
    service.plane.repair()
    assert service.ctx.router.resolve(job_id) == "203.0.113.7:8700"
    assert provider.route_calls[-1] == (job_id, instance.id)


def assert_rolled_back(service: Service, provider: FakeProvider, job_id: str,
                       old_instance: str) -> None:
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.status == MigrationStatus.FAILED
    assert m.phase == MigrationPhase.ROLLED_BACK
    job = service.repo.get_job(job_id)
    assert job.status == JobStatus.RUNNING
    assert job.instance_id == old_instance
    assert m.to_instance_id is not None
    assert m.to_instance_id in provider.terminate_calls
    assert old_instance not in provider.terminate_calls
    assert provider.running_ids() == [old_instance]
    assert service.ctx.router.resolve(job_id) == f"run-{old_instance}"


def test_boot_failure_keeps_the_job_on_the_old_instance(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    # The replacement's agent never comes up in standby.
    original = agents.agent

    def never_ready(address: str):  # type: ignore[no-untyped-def]
        a = original(address)
        if address.startswith("standby-"):
            a.reachable = False
        return a

    agents.agent = never_ready  # type: ignore[method-assign]
    step_before = agents.agents[f"run-{old}"].step
    move_to_g4(service, job_id)
    service.plane.wait_for_migrations()
    assert_rolled_back(service, provider, job_id, old)
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert "did not come up" in (m.error or "")
    assert m.checkpoint_step is None  # the old instance never stopped
    assert agents.agents[f"run-{old}"].step >= step_before
    assert agents.agents[f"run-{old}"].state == AgentState.RUNNING


def test_restore_failure_resumes_the_old_instance_with_no_step_lost(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    original = agents.restore

    def failing_restore(address: str, step: int | None) -> None:
        agents.fail_restore.add(address)
        original(address, step)

    agents.restore = failing_restore  # type: ignore[method-assign]
    # A checkpoint newer than the one handed over, as if the replacement had
    # written it before failing, must not survive the rollback.
    move_to_g4(service, job_id)
    service.plane.wait_for_migrations()
    assert_rolled_back(service, provider, job_id, old)
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.checkpoint_step is not None
    old_agent = agents.agents[f"run-{old}"]
    assert old_agent.state == AgentState.RUNNING  # resumed
    assert old_agent.step == m.checkpoint_step  # paused there, nothing lost or redone
    assert ("resume", f"run-{old}") in agents.calls


def test_rollback_deletes_checkpoints_written_by_the_replacement(
        service: Service, agents: FakeAgents) -> None:
    job_id = running_job(service)
    store = service.ctx.store
    prefix = checkpoint_prefix(job_id)
    original = agents.restore

    def restore_then_fail(address: str, step: int | None) -> None:
        assert step is not None
        store.put(f"{prefix}/{step + 10:012d}-replacement/MANIFEST.json", b"{}")
        agents.fail_restore.add(address)
        original(address, step)

    agents.restore = restore_then_fail  # type: ignore[method-assign]
    store.put(f"{prefix}/{1:012d}-old/MANIFEST.json", b"{}")
    move_to_g4(service, job_id)
    service.plane.wait_for_migrations()
    keys = list(store.list(prefix + "/"))
    assert keys == [f"{prefix}/{1:012d}-old/MANIFEST.json"]


# --- budget ------------------------------------------------------------------------------


def budget_job(service: Service, **changes: object) -> str:
    # P3 spot at $0.918 per work hour, about one work hour left: ~$0.92 of $2.
    for offer in service.repo.list_offers():
        if offer.instance_type == "g4dn.xlarge" and offer.capacity.value == "spot":
            service.plane.update_offer(offer.id, available=False)
    job = service.plane.submit(replace(SPEC, budget_usd=2.0, **changes))  # type: ignore[arg-type]
    run_until(service, job.id, JobStatus.RUNNING)
    assert service.repo.get_job(job.id).offer_id == P3_SPOT_A
    return job.id


def budget_events(service: Service, job_id: str) -> list[str]:
    return [e.message for e in service.repo.list_events(job_id) if e.kind == "budget"]


def test_budget_events_at_80_and_100_percent_once_each_even_after_a_restart(
        service: Service) -> None:
    job_id = budget_job(service)
    for _ in range(3):
        service.plane.reconcile_once()
    assert budget_events(service, job_id) == []

    service.plane.update_offer(P3_SPOT_A, price_per_hour=1.7)  # projected ~$1.70: 85%
    for _ in range(3):
        service.plane.reconcile_once()
    (warning,) = budget_events(service, job_id)
    assert "reached 80% of the $2.0000 budget" in warning
    assert "so far +" in warning and "remaining work hours at $1.7000 per work hour" in warning

    service.plane.update_offer(P3_SPOT_A, price_per_hour=2.5)  # over the budget
    for _ in range(3):
        service.plane.reconcile_once()
    events = [e for e in service.repo.list_events(job_id) if e.kind == "budget"]
    assert [e.data["threshold"] for e in events if e.data] == [0.8, 1.0]
    assert "reached 100%" in events[1].message and "stop" not in events[1].message
    assert service.repo.get_job(job_id).status == JobStatus.RUNNING  # on_budget: warn

    # A restarted control plane reads what was sent from the job's events.
    service.plane.lifecycle._budget_sent.clear()
    for _ in range(3):
        service.plane.reconcile_once()
    assert len(budget_events(service, job_id)) == 2


def test_on_budget_stop_checkpoints_and_cancels_keeping_the_checkpoints(
        service: Service, agents: FakeAgents, provider: FakeProvider) -> None:
    job_id = budget_job(service, on_budget=OnBudget.STOP, checkpoint_keep_finished=0)
    store = service.ctx.store
    key = f"{checkpoint_prefix(job_id)}/{1:012d}-v/MANIFEST.json"
    store.put(key, b"{}")
    instance = service.repo.get_job(job_id).instance_id
    service.plane.update_offer(P3_SPOT_A, price_per_hour=1.7)  # 80%: a warning only
    service.plane.reconcile_once()
    assert service.repo.get_job(job_id).status == JobStatus.RUNNING

    service.plane.update_offer(P3_SPOT_A, price_per_hour=2.5)
    service.plane.reconcile_once()
    job = service.repo.get_job(job_id)
    assert job.status == JobStatus.CANCELLED
    assert job.error is not None and "budget of $2.0000 (on_budget: stop)" in job.error
    assert ("checkpoint", f"run-{instance}") in agents.calls
    assert provider.running_ids() == []
    assert list(store.list(checkpoint_prefix(job_id) + "/")) == [key]
    kinds = [e.kind for e in service.repo.list_events(job_id)]
    assert "checkpoints_deleted" not in kinds and kinds.count("budget") == 2
    assert "checkpointing and cancelling" in budget_events(service, job_id)[1]
    (cancelled,) = [e for e in service.repo.list_events(job_id) if e.kind == "cancelled"]
    assert "checkpoints kept" in cancelled.message and "checkpointed step" in cancelled.message


def test_capacity_error_on_the_target_keeps_the_job_and_marks_the_offer(
        service: Service, provider: FakeProvider) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    provider.unavailable_offers.add(G4_SPOT_B)
    move_to_g4(service, job_id)
    service.plane.wait_for_migrations()
    job = service.repo.get_job(job_id)
    assert (job.status, job.instance_id) == (JobStatus.RUNNING, old)
    assert next(o for o in service.ctx.offers() if o.id == G4_SPOT_B).available is False
    # ... so the scout does not try it again at once.
    assert not service.plane.scout_once(force=True)[0].move


@pytest.mark.parametrize("phase", [MigrationPhase.BOOTING, MigrationPhase.CHECKPOINTING,
                                   MigrationPhase.RESTORING])
def test_restart_rolls_back_a_move_left_before_the_switch(
        service: Service, provider: FakeProvider, agents: FakeAgents,
        phase: MigrationPhase) -> None:
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    old = job.instance_id or ""
    target = service.plane.update_offer(G4_SPOT_B, available=True)
    m = service.plane.executor.begin(job, target, MigrationReason.MANUAL, 0.5)
    new, _ = service.ctx.launch(job, target, standby=True)
    fields: dict[str, object] = {"phase": phase, "to_instance_id": new.id}
    if phase != MigrationPhase.BOOTING:
        result = agents.checkpoint(f"run-{old}", pause=True, timeout_s=1)
        fields["checkpoint_step"] = result.step
    service.repo.update_migration(m.id, **fields)
    # The control plane dies here; a new one repairs on start.
    service.plane.repair()
    assert_rolled_back(service, provider, job_id, old)
    assert agents.agents[f"run-{old}"].state == AgentState.RUNNING
    # The restart ended the move, not the offer: it stays open to every job.
    assert next(o for o in service.ctx.offers() if o.id == G4_SPOT_B).available


def test_restart_after_the_replacement_launched_but_before_its_move_named_it(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    """A control plane killed inside LAUNCHING, between the launch and the
    next phase: the replacement's id is on the migration from before the
    launch, so the repair terminates it (it was left running, for the
    reaper to find as an orphan)."""
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    old = job.instance_id or ""
    target = service.plane.update_offer(G4_SPOT_B, available=True)
    m = service.plane.executor.begin(job, target, MigrationReason.MANUAL, 0.5)
    launch = service.ctx.launch

    def launch_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        launch(*args, **kwargs)
        raise SystemExit("killed")  # the process dies before the phase is written

    service.ctx.launch = launch_then_die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        service.plane.executor.run(m.id)
    service.ctx.launch = launch  # type: ignore[method-assign]
    left = service.repo.get_migration(m.id)
    assert left.phase == MigrationPhase.LAUNCHING and left.to_instance_id is not None
    assert len(provider.running_ids()) == 2
    service.plane.repair()
    assert_rolled_back(service, provider, job_id, old)


def test_restart_rolls_forward_a_move_left_after_the_switch(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    old = job.instance_id or ""
    target = service.plane.update_offer(G4_SPOT_B, available=True)
    m = service.plane.executor.begin(job, target, MigrationReason.MANUAL, 0.5)
    new, _ = service.ctx.launch(job, target, standby=True)
    service.repo.update_migration(m.id, phase=MigrationPhase.SWITCHING, to_instance_id=new.id,
                                  checkpoint_step=5, resume_step=6)
    service.plane.repair()
    m = service.repo.get_migration(m.id)
    assert m.status == MigrationStatus.COMPLETED
    job = service.repo.get_job(job_id)
    assert (job.status, job.instance_id, job.offer_id) == (JobStatus.RUNNING, new.id, G4_SPOT_B)
    assert provider.terminate_calls == [old]
    assert service.ctx.router.resolve(job_id) == new.address


def test_cancel_terminates_everything(service: Service, provider: FakeProvider) -> None:
    job_id = running_job(service)
    job = service.plane.cancel(job_id)
    assert job.status == JobStatus.CANCELLED
    assert provider.running_ids() == []
    assert all(i.status.is_terminal() for i in service.repo.list_instances(job_id=job_id))
    with pytest.raises(Conflict):
        service.plane.cancel(job_id)
    with pytest.raises(Conflict):
        service.plane.migrate(job_id)


def test_lost_instance_recovers_on_a_new_one(service: Service, provider: FakeProvider,
                                             agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    agents.checkpoints[7] = "k"
    agents.agents[f"run-{old}"].reachable = False
    provider.die(old)
    run_until(service, job_id, JobStatus.RECOVERING, passes=3)
    run_until(service, job_id, JobStatus.RUNNING)
    job = service.repo.get_job(job_id)
    assert job.instance_id != old
    assert service.repo.get_instance(old).status == InstanceStatus.FAILED
    events = [e.kind for e in service.repo.list_events(job_id)]
    assert "instance_lost" in events


def test_interruption_notice_moves_the_job_out_of_the_zone(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    provider.notify_interruption(old)
    service.plane.reconcile_once()
    service.plane.wait_for_migrations()
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert m.reason == MigrationReason.PREEMPTION
    assert m.status == MigrationStatus.COMPLETED, m.error
    assert not m.to_offer_id.startswith("local:us-east-1a:p3.2xlarge:spot")
    # Checkpointed at once, within the notice window, before the replacement
    # booted; then again at the switch, where the replacement resumed.
    checkpoints = [c for c in agents.calls if c[0] == "checkpoint"]
    assert checkpoints == [("checkpoint", f"run-{old}")] * 2
    events = {e.kind: e for e in service.repo.list_events(job_id)}
    assert events["emergency_checkpoint"].data["step"] < (m.checkpoint_step or 0)
    assert m.resume_step == (m.checkpoint_step or 0) + 1
    # Spot in the zone is avoided for a while, for every job.
    assert service.ctx.avoided_zones() == {"local:us-east-1a"}
    decision = service.plane.decisions[job_id]
    assert decision.trigger == "capacity" and "interruption notice" in decision.reason


def test_a_notice_seen_by_the_agent_moves_the_job_the_same_way(
        service: Service, agents: FakeAgents) -> None:
    # On EC2 the agent reads the notice from instance metadata and reports it
    # in its health; the provider may not know yet.
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    agents.agents[f"run-{old}"].notice = True
    service.plane.reconcile_once()
    service.plane.wait_for_migrations()
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert (m.reason, m.status) == (MigrationReason.PREEMPTION, MigrationStatus.COMPLETED)
    assert service.repo.get_offer(m.to_offer_id).zone != "us-east-1a" or \
        service.repo.get_offer(m.to_offer_id).capacity == Capacity.ON_DEMAND
    assert "emergency_checkpoint" in [e.kind for e in service.repo.list_events(job_id)]


def test_interruption_with_nowhere_to_go_checkpoints_then_recovers_outside_the_zone(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    others = [o for o in service.repo.list_offers()
              if o.gpus >= 1 and o.id != P3_SPOT_A and o.available]
    for o in others:
        service.plane.update_offer(o.id, available=False)
    provider.notify_interruption(old)
    service.plane.reconcile_once()
    for _ in range(8):  # later passes neither checkpoint nor log again
        service.plane.reconcile_once()
    events = [e.kind for e in service.repo.list_events(job_id)]
    assert events.count("interruption_wait") == 1
    assert events.count("interruption") == 1  # (it wrote one per pass: 16 in 8 s)
    wait_for_event(service, job_id, "emergency_checkpoint")
    assert service.repo.list_migrations(job_id=job_id) == []
    # The instance is taken; capacity comes back in another zone at the same
    # price, and the zone just reclaimed (first by id) is passed over.
    agents.agents[f"run-{old}"].reachable = False
    provider.die(old)
    run_until(service, job_id, JobStatus.RECOVERING, passes=3)
    service.plane.update_offer(P3_SPOT_B, available=True)
    run_until(service, job_id, JobStatus.RUNNING)
    assert service.repo.get_job(job_id).offer_id == P3_SPOT_B


def restarted(service: Service, provider: FakeProvider, agents: FakeAgents,
              clock: object = None) -> Service:
    """A new control plane over the same home and database (the old one's
    loops stopped), as `gpuscout up` started again."""
    service.plane.stop()
    svc = build_service(service.settings, provider=provider, agents=agents,
                        clock=clock)  # type: ignore[arg-type]
    svc.ctx.timeouts = service.ctx.timeouts
    svc.ctx.poll_interval_s = service.ctx.poll_interval_s
    svc.plane.feed.start(svc.repo, svc.ctx.clock.now())
    return svc


def test_a_notice_and_the_zone_it_avoids_outlive_a_restart_of_the_control_plane(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    old = service.repo.get_job(job_id).instance_id or ""
    for o in service.repo.list_offers():
        if o.gpus >= 1 and o.id != P3_SPOT_A and o.available:
            service.plane.update_offer(o.id, available=False)  # nowhere to go
    provider.notify_interruption(old)
    service.plane.reconcile_once()
    wait_for_event(service, job_id, "emergency_checkpoint")
    assert service.ctx.avoided_zones() == {"local:us-east-1a"}
    service.ctx.mark_unavailable(P3_SPOT_B)  # an offer that just failed to launch

    # A restart 10 s after the notice; the instance still has its notice.
    clock = ManualClock()
    clock.at = service.ctx.clock.now() + timedelta(seconds=10)
    svc = restarted(service, provider, agents, clock)
    try:
        assert svc.ctx.avoided_zones() == {"local:us-east-1a"}
        assert not next(o for o in svc.ctx.offers() if o.id == P3_SPOT_B).available
        for _ in range(3):
            svc.plane.reconcile_once()
        time.sleep(0.05)  # an emergency checkpoint would be a thread
        # The notice was recorded and answered before: not again.
        kinds = [e.kind for e in svc.repo.list_events(job_id)]
        assert (kinds.count("interruption"), kinds.count("interruption_wait"),
                kinds.count("emergency_checkpoint")) == (1, 1, 1)
        assert agents.calls.count(("checkpoint", f"run-{old}")) == 1
        # A new job is not placed on spot in the zone just reclaimed, though
        # it is the cheapest there is.
        g4_spot_a = "local:us-east-1a:g4dn.xlarge:spot"
        svc.plane.update_offer(g4_spot_a, available=True)
        svc.plane.update_offer(P3_SPOT_B, available=True)
        svc.plane.cancel(job_id)  # (so that it takes none of them)
        clock.sleep(300)  # the offer's launch backoff is over
        new = svc.plane.submit(replace(SPEC, name="after-restart")).id
        run_until(svc, new, JobStatus.PROVISIONING)
        assert svc.repo.get_job(new).offer_id == P3_SPOT_B
        # Once the window is over, a restart forgets the zone.
        clock.sleep(ZONE_BACKOFF_S)
        again = restarted(svc, provider, agents, clock)
        try:
            assert again.ctx.avoided_zones() == frozenset()
            assert again.repo.recall(clock.now(), "avoid_zone") == []
        finally:
            again.plane.stop()
    finally:
        svc.plane.stop()


@pytest.mark.parametrize(("submitted_h_ago", "moves_to"), [
    (0.0, None),  # ahead of the uniform-progress line: checkpoint, wait for spot
    (10.0, Capacity.ON_DEMAND),  # behind it: on-demand now
])
def test_a_notice_in_a_single_zone_market_waits_for_spot_unless_the_deadline_needs_it(
        service: Service, provider: FakeProvider, agents: FakeAgents,
        monkeypatch: pytest.MonkeyPatch, submitted_h_ago: float,
        moves_to: Capacity | None) -> None:
    for offer in service.repo.list_offers():
        if offer.instance_type == "g4dn.xlarge" and offer.capacity == Capacity.SPOT:
            service.plane.update_offer(offer.id, available=False)
    now = service.ctx.clock.now()
    job_id = service.plane.submit(replace(SPEC, expected_duration_hours=1.0,
                                          deadline=now + timedelta(hours=20))).id
    run_until(service, job_id, JobStatus.RUNNING)
    assert service.repo.get_job(job_id).offer_id == P3_SPOT_A
    service.repo.update_job(job_id, created_at=now - timedelta(hours=submitted_h_ago))
    # One zone, and the only spot the job fits is the offer being reclaimed.
    zone_a = [o for o in service.ctx.offers() if o.zone == "us-east-1a"
              and (o.capacity == Capacity.ON_DEMAND or o.id == P3_SPOT_A)]
    monkeypatch.setattr(service.ctx, "offers", lambda: list(zone_a))
    old = service.repo.get_job(job_id).instance_id or ""
    provider.notify_interruption(old)
    service.plane.reconcile_once()
    service.plane.wait_for_migrations()
    decision = service.plane.decisions[job_id]
    if moves_to is None:
        assert not decision.move and "waiting for spot" in decision.reason, decision.reason
        assert service.repo.list_migrations(job_id=job_id) == []
        events = [e.kind for e in service.repo.list_events(job_id)]
        assert events.count("interruption_wait") == 1
        wait_for_event(service, job_id, "emergency_checkpoint")
    else:
        assert decision.move and "behind the uniform-progress line" in decision.reason, \
            decision.reason
        (m,) = service.repo.list_migrations(job_id=job_id)
        assert m.reason == MigrationReason.PREEMPTION
        assert service.repo.get_offer(m.to_offer_id).capacity == moves_to


def test_a_notice_during_a_move_checkpoints_at_once(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    target = service.plane.update_offer(G4_SPOT_B, available=True)
    service.plane.executor.begin(job, target, MigrationReason.PRICE, 0.5)  # not run yet
    provider.notify_interruption(job.instance_id or "")
    service.plane.reconcile_once()
    service.plane.reconcile_once()  # once only
    deadline = time.monotonic() + 5
    while ("checkpoint", f"run-{job.instance_id}") not in agents.calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    assert agents.calls.count(("checkpoint", f"run-{job.instance_id}")) == 1
    assert service.ctx.avoided_zones() == {"local:us-east-1a"}
    kinds = [e.kind for e in service.repo.list_events(job_id)]
    assert kinds.count("interruption") == 1


def test_capacity_gone_under_a_job_moves_it_even_within_its_dwell(service: Service) -> None:
    job_id = running_job(service)
    service.repo.update_job(job_id, last_migration_at=service.ctx.clock.now())
    (stay,) = service.plane.scout_once(force=True)
    assert not stay.move and "minimum dwell" in stay.reason
    service.plane.update_offer(P3_SPOT_A, available=False)
    (move,) = service.plane.scout_once(force=True)
    service.plane.wait_for_migrations()
    assert move.move and move.trigger == "capacity"
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert (m.reason, m.status) == (MigrationReason.PREEMPTION, MigrationStatus.COMPLETED)
    assert m.to_offer_id != P3_SPOT_A


def test_a_tight_deadline_places_on_demand_and_a_loose_one_on_spot(service: Service) -> None:
    now = service.ctx.clock.now()
    tight = service.plane.submit(replace(SPEC, name="tight", expected_duration_hours=1.0,
                                         deadline=now + timedelta(hours=1.1)))
    loose = service.plane.submit(replace(SPEC, name="loose", expected_duration_hours=1.0,
                                         deadline=now + timedelta(hours=5)))
    run_until(service, tight.id, JobStatus.RUNNING)
    run_until(service, loose.id, JobStatus.RUNNING)
    assert service.repo.get_job(tight.id).offer_id == "local:us-east-1a:p3.2xlarge:on-demand"
    assert service.repo.get_offer(service.repo.get_job(loose.id).offer_id or "").capacity \
        == Capacity.SPOT
    placed = service.plane.decisions[tight.id]
    assert placed.trigger == "placement" and "on-demand" in placed.reason
    assert placed.deadline_slack_s is not None and placed.deadline_slack_s >= 0


def test_with_slack_and_no_spot_a_job_waits_for_spot_as_uniform_progress_does(
        service: Service, provider: FakeProvider) -> None:
    for o in service.repo.list_offers():
        if o.capacity == Capacity.SPOT:
            service.plane.update_offer(o.id, available=False)
    now = service.ctx.clock.now()
    job = service.plane.submit(replace(SPEC, expected_duration_hours=1.0,
                                       deadline=now + timedelta(hours=20)))
    for _ in range(5):
        service.plane.reconcile_once()
    assert service.repo.get_job(job.id).status == JobStatus.SCOUTING
    assert provider.launch_calls == []
    waits = [e for e in service.repo.list_events(job.id) if e.kind == "placement_wait"]
    assert len(waits) == 1 and "waiting for spot" in waits[0].message
    assert not service.plane.decisions[job.id].move
    service.plane.update_offer(P3_SPOT_B, available=True)
    run_until(service, job.id, JobStatus.RUNNING)
    assert service.repo.get_job(job.id).offer_id == P3_SPOT_B


def test_every_scout_decision_is_kept_with_its_numbers_and_moves_are_events(
        service: Service) -> None:
    job_id = running_job(service)
    (stay,) = service.plane.scout_once(force=True)
    assert not stay.move and service.plane.decisions[job_id] is stay
    assert stay.decided_at is not None and stay.remaining_work_hours is not None
    assert "scout_decision" not in [e.kind for e in service.repo.list_events(job_id)]
    service.plane.update_offer(G4_SPOT_B, available=True)
    (move,) = service.plane.scout_once(force=True)
    service.plane.wait_for_migrations()
    assert move.move and move.expected_saving_usd and move.move_cost_usd
    assert move.expected_saving_usd > move.move_cost_usd
    (event,) = [e for e in service.repo.list_events(job_id) if e.kind == "scout_decision"]
    assert event.data is not None
    assert event.data["move_cost_usd"] == pytest.approx(move.move_cost_usd)
    assert event.data["target_offer_id"] == G4_SPOT_B
    assert {"remaining_work_hours", "budget_left_usd", "deadline_slack_s", "savings",
            "current_cost_per_work_hour", "target_cost_per_work_hour"} <= set(event.data)
    # Just moved: the next pass stays for the dwell time, whatever the market.
    service.plane.update_offer(P3_SPOT_B, price_per_hour=0.01)
    (dwell,) = service.plane.scout_once(force=True)
    assert not dwell.move and "minimum dwell" in dwell.reason


def test_move_costs_come_from_the_settings_until_three_moves_are_measured(
        service: Service) -> None:
    base = service.plane.costs
    assert (base.boot_s, base.checkpoint_s, base.restore_s) == (180.0, 30.0, 60.0)
    t0 = service.ctx.clock.now()

    def done(boot: float, ckpt: float, restore: float) -> Migration:
        return Migration(id="m", job_id="j", status=MigrationStatus.COMPLETED,
                         phase=MigrationPhase.DONE, reason=MigrationReason.PRICE,
                         from_instance_id="a", from_offer_id="x", to_offer_id="y",
                         started_at=t0, replacement_ready_at=t0 + timedelta(seconds=boot),
                         checkpointed_at=t0 + timedelta(seconds=boot + ckpt),
                         resumed_at=t0 + timedelta(seconds=boot + ckpt + restore))

    two = [done(10, 1, 2), done(20, 2, 4)]
    assert service.plane.move_costs(two) == base
    measured = service.plane.move_costs([*two, done(30, 3, 6)])
    assert (measured.boot_s, measured.checkpoint_s, measured.restore_s) == (20.0, 2.0, 4.0)
    # Restarts (boot + restore) of 12, 24 and 36 s: the slow ones (90th
    # percentile, 33.6 s) ran 9.6 s past the median; the deadline reserves keep that.
    assert base.restart_spread_s == 0.0
    assert measured.restart_spread_s == pytest.approx(9.6)


def test_completed_job_terminates_its_instance(service: Service, provider: FakeProvider,
                                               agents: FakeAgents) -> None:
    job_id = running_job(service)
    instance = service.repo.get_job(job_id).instance_id or ""
    agents.agents[f"run-{instance}"].total_steps = agents.agents[f"run-{instance}"].step + 1
    run_until(service, job_id, JobStatus.COMPLETED)
    assert provider.running_ids() == []
    job = service.repo.get_job(job_id)
    assert job.finished_at is not None and job.cost_usd > 0


def test_capacity_error_at_placement_tries_the_next_offer(
        service: Service, provider: FakeProvider) -> None:
    provider.next_launch_error = CapacityError(G4_SPOT_B, "InsufficientInstanceCapacity")
    job = service.plane.submit(SPEC)
    run_until(service, job.id, JobStatus.RUNNING)
    first = provider.launch_calls[0].offer.id
    assert service.repo.get_job(job.id).offer_id != first


def test_reaper_terminates_unowned_instances(service: Service, provider: FakeProvider) -> None:
    job_id = running_job(service)
    job = service.repo.get_job(job_id)
    stray = LaunchRequest(instance_id="i-stray", job_id="nobody",
                          offer=service.repo.get_offer(P3_SPOT_A), command="x", store_url="")
    provider.launch(stray)
    reaped = service.plane.reaper.reap()
    assert reaped == ["i-stray"]
    assert provider.running_ids() == [job.instance_id]


def test_manual_migrate_validates_the_target(service: Service) -> None:
    job_id = running_job(service)
    with pytest.raises(InvalidRequest) as err:
        service.plane.migrate(job_id, "local:nowhere:x:spot")
    assert err.value.field == "offer_id"
    with pytest.raises(InvalidRequest, match="already runs"):
        service.plane.migrate(job_id, P3_SPOT_A)
    cpu = next(o for o in service.repo.list_offers() if o.gpus == 0)
    with pytest.raises(InvalidRequest, match="does not fit"):
        service.plane.migrate(job_id, cpu.id)


def test_offers_are_read_only_unless_the_market_is_manual(
        service: Service, tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp,provider,region,zone,instance_type,capacity,price_per_hour,"
                     "available\n2021-01-01T00:00:00Z,local,us-east-1,us-east-1a,p3.2xlarge,"
                     "spot,0.5,1\n")
    service.plane.feed = TraceFeed.from_spec(str(trace), service.plane.ctx.provider.offers())
    service.plane.feed.start(service.repo, service.ctx.clock.now())
    assert service.repo.get_offer(P3_SPOT_A).price_per_hour == 0.5
    with pytest.raises(ManualMarketOnly):
        service.plane.update_offer(P3_SPOT_A, price_per_hour=0.1)


def test_a_command_that_fails_at_once_fails_the_job_without_moving_it(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    original = agents.agent

    def crashing(address: str):  # type: ignore[no-untyped-def]
        a = original(address)
        a.state, a.exit_code = AgentState.FAILED, 2
        a.error = "command exited with code 2; last lines of stderr:\npython: can't open file"
        return a

    agents.agent = crashing  # type: ignore[method-assign]
    job = service.plane.submit(SPEC)
    run_until(service, job.id, JobStatus.FAILED)
    job = service.repo.get_job(job.id)
    # The agent's own account, once (it read "command exited with code 2: command exited
    # with code 2" when the control plane prefixed it again).
    assert job.error == "command exited with code 2; last lines of stderr:\npython: can't open file"
    assert len(provider.launch_calls) == 1  # not retried on other offers
    assert provider.running_ids() == []


class ManualClock:
    """The control plane's clock, moved by the test."""

    def __init__(self) -> None:
        self.at = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def test_savings_are_counted_against_staying_on_the_first_offer_from_its_launch(
        tmp_path: Path, provider: FakeProvider, agents: FakeAgents) -> None:
    # The baseline (the job left on its first offer) pays the first boot
    # too: with no move, what the job cost is exactly its baseline.
    clock = ManualClock()
    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    svc = build_service(settings, provider=provider, agents=agents, clock=clock)
    svc.plane.feed.start(svc.repo, clock.now())
    try:
        for offer in svc.repo.list_offers():
            if offer.instance_type == "g4dn.xlarge" and offer.capacity.value == "spot":
                svc.plane.update_offer(offer.id, available=False)
        job_id = svc.plane.submit(SPEC).id
        run_until(svc, job_id, JobStatus.PROVISIONING)
        clock.sleep(180)  # the instance boots
        run_until(svc, job_id, JobStatus.RUNNING)
        clock.sleep(3600)
        svc.plane.reconcile_once()
        job = svc.repo.get_job(job_id)
        price = svc.repo.instance_price(job.instance_id or "")
        assert job.cost_usd == pytest.approx(price * 3780 / 3600)
        assert job.baseline_cost_usd == pytest.approx(job.cost_usd)
        assert job.savings_usd == pytest.approx(0.0, abs=1e-9)
    finally:
        svc.plane.stop()


def test_a_jobs_setup_counts_in_its_move_cost_and_not_in_the_machines_boot(
        service: Service) -> None:
    t0 = service.ctx.clock.now()

    def done(n: int, boot: float) -> Migration:
        return Migration(id=f"m{n}", job_id="j", status=MigrationStatus.COMPLETED,
                         phase=MigrationPhase.DONE, reason=MigrationReason.PRICE,
                         from_instance_id="a", from_offer_id="x", to_offer_id="y",
                         to_instance_id=f"i-{n}", started_at=t0,
                         replacement_ready_at=t0 + timedelta(seconds=boot),
                         checkpointed_at=t0 + timedelta(seconds=boot + 1),
                         resumed_at=t0 + timedelta(seconds=boot + 2))

    # Three moves of 110 s to standby, 100 s of which was each job's setup:
    # the machines boot in 10 s.
    moves = [done(n, 110) for n in range(3)]
    measured = service.plane.move_costs(moves, {f"i-{n}": 100.0 for n in range(3)})
    assert measured.boot_s == pytest.approx(10.0)
    # A job whose setup took an hour pays it on every move: the scout weighs it.
    job_id = running_job(service)
    instance_id = service.repo.get_job(job_id).instance_id or ""
    service.repo.update_instance(instance_id, setup_s=3600.0)
    service.plane.update_offer(G4_SPOT_B, available=True)
    (quick,) = service.plane.scout_once(force=True)
    cost_with_setup = quick.move_cost_usd
    service.repo.update_instance(instance_id, setup_s=0.0)
    (plain,) = service.plane.scout_once(force=True)
    assert cost_with_setup is not None and plain.move_cost_usd is not None
    # The hour of setup is billed on the replacement (g4dn.xlarge spot).
    g4 = next(o for o in service.ctx.offers() if o.id == G4_SPOT_B)
    assert cost_with_setup - plain.move_cost_usd == pytest.approx(g4.price_per_hour, rel=0.01)


def test_an_offer_priced_at_zero_or_less_is_no_offer(service: Service) -> None:
    # moto's spot price history answers 0.0: a job was placed "at $0.0000/h".
    service.plane.update_offer(G4_SPOT_B, price_per_hour=0.0)
    offers = {o.id: o for o in service.ctx.offers()}
    assert offers[G4_SPOT_B].available is False
    job = service.plane.submit(SPEC)
    run_until(service, job.id, JobStatus.RUNNING)
    assert service.repo.get_job(job.id).offer_id != G4_SPOT_B


@pytest.mark.parametrize("name", ["", ".hidden", "../model.json", "a/b", "a\\b", "nul\0"])
def test_an_artifact_name_the_store_cannot_hold_is_refused_naming_the_field(
        service: Service, name: str) -> None:
    job_id = service.plane.submit(SPEC).id
    with pytest.raises(InvalidRequest) as refused:
        service.plane.artifact(job_id, name)
    assert refused.value.field == "name"


def test_a_price_set_by_hand_is_taken_to_hold_and_the_scout_moves_at_once(
        tmp_path: Path, provider: FakeProvider, agents: FakeAgents) -> None:
    """Prices set by hand minutes after the control plane started (a new
    user trying a move): one change is no market that keeps changing, so
    a 60% cheaper offer is taken at the next pass."""
    clock = ManualClock()
    service = build_service(Settings(home=tmp_path, scout_interval_s=120, api_token="t"),
                            provider=provider, agents=agents, clock=clock)  # type: ignore[arg-type]
    service.ctx.poll_interval_s = 0.005
    service.plane.feed.start(service.repo, clock.now())
    try:
        service.ctx.offers()  # the scout sees the market from the start...
        clock.sleep(133)
        service.plane.update_offer(P3_SPOT_B, price_per_hour=0.10)  # ...a user sets prices
        job_id = running_job(service)
        assert service.repo.get_job(job_id).offer_id == P3_SPOT_B
        service.plane.update_offer(G4_SPOT_B, available=True)
        clock.sleep(41)
        service.ctx.offers()
        service.plane.update_offer(G4_SPOT_B, price_per_hour=0.02)  # then drops another
        clock.sleep(10)
        (decision,) = service.plane.scout_once(force=True)
        assert decision.move and decision.target is not None, decision.reason
        assert decision.target.id == G4_SPOT_B
    finally:
        service.plane.stop()
