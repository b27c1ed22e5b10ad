"""The demo of `make run` beside a user's own jobs: its scripted market and
its job leave them alone, and a restart neither submits another demo job
nor replays the script from its start."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.controllers.plane import InvalidRequest, ManualMarketOnly
from gpuscout.demo import (
    DEMO_PROVIDER,
    cancel_demo,
    demo_job_spec,
    demo_jobs,
    demo_rows,
    enable_demo,
    submit_demo,
)
from gpuscout.domain import JobSpec, JobStatus, Resources
from gpuscout.market.trace import TraceRow
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service

DEMO_P3_SPOT_A = "demo:us-east-1a:p3.2xlarge:spot"
DEMO_G4_SPOT_B = "demo:us-east-1b:g4dn.xlarge:spot"
LOCAL_G4_SPOT_B = "local:us-east-1b:g4dn.xlarge:spot"
# A user's job on the very hardware and zone the demo's script changes.
MINE = JobSpec(name="mine", command="python train.py",
               resources=Resources(gpus=1, zone="us-east-1b"))


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Home:
    """One home; each ``start`` is `gpuscout up --demo` on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.provider = FakeProvider(
            address_for=lambda r, n: f"{'standby' if r.standby else 'run'}-{r.instance_id}")
        self.agents = FakeAgents()
        self.service: Service | None = None

    def start(self, rows: list[TraceRow] | None = None) -> Service:
        self.stop()
        # A move costs what it costs on local instances (the fake's are cloud's).
        settings = Settings(home=self.path, api_token="t", move_boot_s=7, move_checkpoint_s=2,
                            move_restore_s=2)
        svc = build_service(settings, provider=self.provider, agents=self.agents,
                            clock=self.clock)  # type: ignore[arg-type]
        svc.ctx.timeouts = Timeouts(health_s=60, checkpoint_s=1, resume_s=1, drain_s=0.5,
                                    lost_s=60)
        svc.ctx.poll_interval_s = 0.005
        enable_demo(svc, rows=rows)
        svc.plane.feed.start(svc.repo, self.clock.now())
        self.service = svc
        return svc

    def stop(self) -> None:
        if self.service is not None:
            self.service.plane.stop()
            self.service = None


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path)
    yield h
    h.stop()


def run_until(svc: Service, job_id: str, status: JobStatus) -> None:
    for _ in range(20):
        if svc.repo.get_job(job_id).status == status:
            return
        svc.plane.reconcile_once()
    assert svc.repo.get_job(job_id).status == status


def test_a_user_job_beside_the_demo_is_never_moved_by_the_demos_script(home: Home) -> None:
    # The demo's script, and more: 3 min in, the g4dn.xlarge spot capacity
    # the demo's job moved to in us-east-1b is taken back.
    lost = next(r for r in demo_rows() if r.zone == "us-east-1b")
    start = min(r.timestamp for r in demo_rows())
    script = [*demo_rows(), replace(lost, timestamp=start + timedelta(minutes=3),
                                    available=False)]
    svc = home.start(script)
    demo, submitted = submit_demo(svc)
    assert submitted
    mine = svc.plane.submit(MINE).id
    run_until(svc, demo.id, JobStatus.RUNNING)
    run_until(svc, mine, JobStatus.RUNNING)
    # Each on its own market: the demo's job on the demo's offers; the user's
    # on the control plane's, where g4dn.xlarge spot is there all along.
    assert svc.repo.get_job(demo.id).offer_id == DEMO_P3_SPOT_A
    assert svc.repo.get_job(mine).offer_id == LOCAL_G4_SPOT_B
    my_instance = svc.repo.get_job(mine).instance_id

    demo_offers = []
    for _ in range(28):  # 7 minutes: the whole script
        home.clock.sleep(15)
        svc.plane.reconcile_once()
        svc.plane.scout_once()
        svc.plane.wait_for_migrations()
        demo_offers.append(svc.repo.get_job(demo.id).offer_id)
        assert next(o for o in svc.ctx.offers() if o.id == LOCAL_G4_SPOT_B).available
    # The demo's job moved to g4dn.xlarge spot (a price drop) and off it again
    # (a capacity loss) ...
    assert DEMO_G4_SPOT_B in demo_offers and demo_offers[-1] != DEMO_G4_SPOT_B
    assert all(o.startswith(f"{DEMO_PROVIDER}:") for o in demo_offers)
    moves = svc.repo.list_migrations(job_id=demo.id)
    assert [m.reason.value for m in moves][:2] == ["price", "preemption"]
    # ... an interruption notice reaches its instance ...
    svc.ctx.provider.notify_interruption(  # type: ignore[attr-defined]
        svc.repo.get_job(demo.id).instance_id)
    svc.plane.reconcile_once()
    svc.plane.wait_for_migrations()
    assert all(z.startswith(f"{DEMO_PROVIDER}:") for z in svc.ctx.avoided_zones())
    # ... and the user's job never moved, nor saw a notice.
    job = svc.repo.get_job(mine)
    assert (job.status, job.offer_id, job.instance_id) == (
        JobStatus.RUNNING, LOCAL_G4_SPOT_B, my_instance)
    assert svc.repo.list_migrations(job_id=mine) == []
    assert not {"interruption", "scout_decision"} & {e.kind for e in svc.repo.list_events(mine)}
    # The demo's offers are its job's alone: not to be moved to, nor set by hand.
    with pytest.raises(InvalidRequest, match="not open to job"):
        svc.plane.migrate(mine, DEMO_G4_SPOT_B)
    with pytest.raises(ManualMarketOnly):
        svc.plane.update_offer(DEMO_G4_SPOT_B, available=True)
    later = svc.plane.submit(replace(MINE, name="later")).id
    run_until(svc, later, JobStatus.RUNNING)
    assert not (svc.repo.get_job(later).offer_id or "").startswith(f"{DEMO_PROVIDER}:")


def test_a_restarted_demo_keeps_one_demo_job_and_resumes_its_script(home: Home) -> None:
    svc = home.start()
    demo, submitted = submit_demo(svc)
    assert submitted
    mine = svc.plane.submit(replace(demo_job_spec(), resources=MINE.resources)).id
    run_until(svc, demo.id, JobStatus.RUNNING)
    assert not svc.repo.get_offer(DEMO_G4_SPOT_B).available
    # The market shown holds the demo's offers while its job lives.
    assert DEMO_G4_SPOT_B in {o.id for o in svc.plane.market()}
    home.clock.sleep(60)  # 45 s in, g4dn.xlarge spot returns in us-east-1b
    svc.plane.reconcile_once()
    assert svc.repo.get_offer(DEMO_G4_SPOT_B).available

    home.clock.sleep(10)
    svc = home.start()  # `gpuscout up --demo` again, 70 s in
    # The script goes on where it was: not from its start, where g4dn.xlarge
    # spot is unavailable in every zone.
    assert svc.repo.get_offer(DEMO_G4_SPOT_B).available
    assert not svc.repo.get_offer("demo:us-east-1a:g4dn.xlarge:spot").available  # 6 min in
    again, submitted = submit_demo(svc)
    assert (again.id, submitted) == (demo.id, False)
    assert [j.id for j in demo_jobs(svc)] == [demo.id]

    # Ctrl-C cancels the demo's job, and no other (a user's job of the same
    # name included); the next start submits none.
    assert [j.id for j in cancel_demo(svc)] == [demo.id]
    assert svc.repo.get_job(mine).status != JobStatus.CANCELLED
    svc = home.start()
    again, submitted = submit_demo(svc)
    assert (again.id, again.status, submitted) == (demo.id, JobStatus.CANCELLED, False)
    names = [j.spec.name for j in svc.repo.list_jobs()]
    assert names.count(demo_job_spec().name) == 2  # the demo's and the user's
    # After the demo, its offers stay reserved for it, with or without --demo.
    plain = build_service(Settings(home=home.path, api_token="t"), provider=home.provider,
                          agents=home.agents, clock=home.clock)  # type: ignore[arg-type]
    try:
        assert all(not o.id.startswith(f"{DEMO_PROVIDER}:")
                   for o in plain.ctx.scope_offers(mine, plain.ctx.offers()))
        # ...and, their job over, they are not shown as a market: frozen rows
        # nobody may use (a new user saw twelve of them listed "available").
        shown = plain.plane.market()
        assert shown and all(o.provider != DEMO_PROVIDER for o in shown)
    finally:
        plain.plane.stop()
