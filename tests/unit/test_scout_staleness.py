"""The scout refuses to act on offers older than the policy's bound
(Karpenter's ``Synced()`` guard), through the control plane: a trace-fed
market whose feed has not ticked for longer than the bound moves no job,
and says so in the decision; once the feed ticks again, the same market
moves the job."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.domain import Capacity, JobSpec, JobStatus, Resources
from gpuscout.market.feeds import ManualFeed, SyncedFeed, TraceFeed
from gpuscout.market.trace import TraceRow
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service

P3_SPOT_A = "local:us-east-1a:p3.2xlarge:spot"
P3_SPOT_B = "local:us-east-1b:p3.2xlarge:spot"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class ManualClock:
    """The control plane's clock, moved by the test."""

    def __init__(self) -> None:
        self.at = T0

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def price_row(after_s: float, zone: str, price: float) -> TraceRow:
    return TraceRow(timestamp=T0 + timedelta(seconds=after_s), provider="local",
                    region="us-east-1", zone=zone, instance_type="p3.2xlarge",
                    capacity=Capacity.SPOT, price_per_hour=price, available=True)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(tmp_path: Path, clock: ManualClock) -> Iterator[Service]:
    provider = FakeProvider(address_for=lambda r, n: (
        f"{'standby' if r.standby else 'run'}-{r.instance_id}"))
    # p3.2xlarge spot in us-east-1b drops to a third of its price 4 minutes in.
    feed = TraceFeed(provider.offers(), [price_row(0, "us-east-1b", 0.918),
                                         price_row(240, "us-east-1b", 0.3)])
    svc = build_service(Settings(home=tmp_path, scout_interval_s=120, api_token="t"),
                        provider=provider, agents=FakeAgents(), feed=feed,
                        clock=clock)  # type: ignore[arg-type]
    svc.ctx.timeouts = Timeouts(health_s=0.5, checkpoint_s=1, resume_s=0.5, drain_s=0.5,
                                lost_s=0.0)
    svc.ctx.poll_interval_s = 0.005
    svc.plane.feed.start(svc.repo, clock.now())
    yield svc
    svc.plane.stop()


def running_v100_job(service: Service, clock: ManualClock) -> str:
    job = service.plane.submit(JobSpec(name="train", command="python train.py",
                                       resources=Resources(gpus=1, gpu_type="V100")))
    for _ in range(20):
        service.plane.reconcile_once()
        if service.repo.get_job(job.id).status == JobStatus.RUNNING:
            break
        clock.sleep(30)
    job = service.repo.get_job(job.id)
    assert job.status == JobStatus.RUNNING and job.offer_id == P3_SPOT_A
    return job.id


def test_the_scout_moves_nothing_on_offers_older_than_the_bound(
        service: Service, clock: ManualClock) -> None:
    assert isinstance(service.plane.feed, SyncedFeed)
    assert not isinstance(ManualFeed([]), SyncedFeed)  # the table is the market: never old
    job_id = running_v100_job(service, clock)
    clock.at = T0 + timedelta(seconds=240)
    service.plane.reconcile_once()  # the feed writes the cheaper price, synced now
    assert service.repo.get_offer(P3_SPOT_B).price_per_hour == 0.3
    # No tick for longer than the bound (the reconcile loop stuck, say).
    clock.sleep(service.plane.policy.max_offer_age_s + 1)
    (stale,) = service.plane.scout_once(force=True)
    assert not stale.move
    assert stale.reason == "no move: offers are 601 s old (bound 600 s)"
    assert service.plane.decisions[job_id] == stale
    assert service.repo.list_migrations(job_id=job_id) == []
    # The feed ticks again: the same market moves the job, for price.
    service.plane.reconcile_once()
    (fresh,) = service.plane.scout_once(force=True)
    assert fresh.move and fresh.target is not None and fresh.target.id == P3_SPOT_B, fresh.reason
    service.plane.wait_for_migrations(timeout_s=20)
    (m,) = service.repo.list_migrations(job_id=job_id)
    assert (m.status.value, m.to_offer_id) == ("completed", P3_SPOT_B)


def test_the_aws_feed_is_synced_when_its_source_last_answered(tmp_path: Path) -> None:
    """A price source that keeps failing (expired credentials, the EC2 API
    down) leaves the offers to age: the AWS feed's sync time is its last
    answer, or its start before any answer, so the scout stops after the bound."""
    from gpuscout.db import open_repository
    from gpuscout.market.aws_prices import AwsPriceFeed
    from gpuscout.policy import MovePolicy, stale_offers

    repo = open_repository(f"sqlite:///{tmp_path / 'db.sqlite'}")
    offers = FakeProvider().offers()[:2]
    failing = {"now": True}

    def source() -> list:  # type: ignore[type-arg]
        if failing["now"]:
            raise RuntimeError("ExpiredToken")
        return list(offers)

    feed = AwsPriceFeed(source, refresh_s=300)
    assert isinstance(feed, SyncedFeed)
    with pytest.raises(RuntimeError):
        feed.start(repo, T0)
    assert feed.synced_at() == T0  # the table is at least as old as this start
    with pytest.raises(RuntimeError):
        feed.tick(repo, T0 + timedelta(seconds=301))
    later = T0 + timedelta(seconds=601)
    age = (later - (feed.synced_at() or later)).total_seconds()
    assert stale_offers(age, MovePolicy()) is not None  # 601 s > 600 s: no move
    failing["now"] = False
    feed.tick(repo, T0 + timedelta(seconds=602))
    assert feed.synced_at() == T0 + timedelta(seconds=602)
