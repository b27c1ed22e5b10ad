"""A job's history for its charts is recorded by the control plane for the
whole run (not only while a dashboard is open) and outlives its restart: a
point when the job's offer or prices move, else one per HISTORY_SAMPLE_S
when its progress or cost moved."""

from __future__ import annotations

from datetime import timedelta

from gpuscout.agent.fake import FakeAgents
from gpuscout.controllers.plane import HISTORY_SAMPLE_S
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service
from tests.unit.test_controllers import G4_SPOT_B, P3_SPOT_A, running_job


def test_history_points_follow_progress_prices_and_moves(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    t0 = service.ctx.clock.now()
    # The loop recorded the job's first point as it started running.
    first = (service.plane.record_history(t0) or service.plane.history(job_id))[-1]
    assert (first.job_id, first.step) == (job_id, service.repo.get_job(job_id).progress.step)
    p3 = next(o for o in service.ctx.offers() if o.id == P3_SPOT_A)
    assert first.cost_per_work_hour == p3.cost_per_work_hour
    assert first.best_offer_id is not None and first.best_cost_per_work_hour is not None
    # Nothing moved: no point.
    assert service.plane.record_history(t0 + timedelta(seconds=1)) == []
    # Progress moved: a point only once HISTORY_SAMPLE_S has passed.
    service.plane.reconcile_once()  # the fake agent completes a step per look
    assert service.plane.record_history(t0 + timedelta(seconds=2)) == []
    (later,) = service.plane.record_history(t0 + timedelta(seconds=HISTORY_SAMPLE_S + 1))
    assert later.step > first.step
    # A price move is a point at once: the best offer is now far cheaper.
    service.plane.update_offer(G4_SPOT_B, available=True, price_per_hour=0.05)
    (moved,) = service.plane.record_history(t0 + timedelta(seconds=HISTORY_SAMPLE_S + 2))
    assert moved.best_offer_id == G4_SPOT_B
    assert moved.best_cost_per_work_hour < first.best_cost_per_work_hour  # type: ignore[operator]
    assert [p.time for p in service.plane.history(job_id)][-3:] == [
        first.time, later.time, moved.time]


def test_the_history_outlives_a_restart_of_the_control_plane(
        service: Service, provider: FakeProvider, agents: FakeAgents) -> None:
    job_id = running_job(service)
    service.plane.record_history(service.ctx.clock.now())
    service.plane.stop()
    again = build_service(service.settings, provider=provider, agents=agents)
    try:
        (point,) = again.plane.history(job_id)
        assert point.job_id == job_id and point.cost_per_work_hour is not None
    finally:
        again.plane.stop()


def test_the_reconcile_loop_records_the_history_without_any_dashboard(
        service: Service) -> None:
    job_id = running_job(service)  # reconcile passes only, no page, no stream
    assert service.plane.history(job_id), "no history point recorded by the loop"
