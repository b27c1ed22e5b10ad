"""Steadiness of spot capacity: the history the scout keeps, how it ranks
offers of the same cost, and the market rule that a spot price above
on-demand means no capacity (EC2's default maximum price)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Resources
from gpuscout.market.combined import combined_market
from gpuscout.market.history import DAY_S, CapacityHistory
from gpuscout.market.trace import TraceRow
from gpuscout.policy import MoveCosts, Offers, place_job
from gpuscout.sim import GpuScoutPolicy, SimConfig, SimJob, SimMarket, simulate

T0 = datetime(2023, 2, 15, tzinfo=UTC)


def spot(zone: str, price: float = 0.9, available: bool = True) -> Offer:
    return Offer(id=f"aws:{zone}:p3.2xlarge:spot", provider="aws", region="us-east-1",
                 zone=zone, instance_type="p3.2xlarge", capacity=Capacity.SPOT, gpus=1,
                 gpu_type="V100", vcpus=8, memory_gb=61, price_per_hour=price,
                 available=available)


def test_a_loss_is_counted_when_capacity_seen_goes_away_not_when_it_was_never_there() -> None:
    h = CapacityHistory()
    h.observe(0.0, [spot("a"), spot("b", available=False)])
    out = {o.zone: o for o in h.observe(60.0, [spot("a", available=False),
                                               spot("b", available=False)])}
    assert out["a"].interruptions_per_day == 1.0
    assert out["b"].interruptions_per_day == 0.0
    # Still gone: no new loss; back and gone again: a second one.
    h.observe(120.0, [spot("a", available=False)])
    h.observe(180.0, [spot("a")])
    (a,) = h.observe(240.0, [spot("a", available=False)])
    assert a.interruptions_per_day == 2.0


def test_losses_leave_the_window_and_recorded_interruptions_count() -> None:
    h = CapacityHistory(window_s=DAY_S / 2)
    h.record_loss("x", 0.0)
    h.record_loss("x", 1000.0)
    assert h.rate("x", 2000.0) == pytest.approx(4.0)  # 2 in half a day
    assert h.rate("x", DAY_S / 2 + 500.0) == pytest.approx(2.0)  # the first has aged out
    assert h.rate("x", DAY_S) == 0.0
    assert h.rate("never", 0.0) == 0.0


def test_offers_of_the_same_cost_rank_the_steadier_first_but_cost_comes_first() -> None:
    flaky, steady = spot("a").with_(interruptions_per_day=3.0), spot("b")
    assert Offers([flaky, steady]).cheapest() == steady
    cheaper_flaky = flaky.with_(price_per_hour=0.8)
    assert Offers([steady, cheaper_flaky]).cheapest() == cheaper_flaky


def test_spot_above_the_on_demand_price_has_no_capacity() -> None:
    rows = [TraceRow(T0 + timedelta(hours=h), "aws", "us-east-1", "us-east-1a", "m1.large",
                     Capacity.SPOT, price, True)
            for h, price in ((0, 0.03), (1, 3.0), (2, 0.03))]
    market = combined_market(price_rows=rows, ondemand={("us-east-1", "m1.large"): 0.24})
    spot_rows = [r for r in market if r.capacity == Capacity.SPOT]
    assert [r.available for r in spot_rows] == [True, False, True]
    # The price is kept: a user who bids higher could still pay it.
    assert [r.price_per_hour for r in spot_rows] == [0.03, 3.0, 0.03]
    lenient = combined_market(price_rows=rows, ondemand={("us-east-1", "m1.large"): 0.24},
                              max_price_ondemand=False)
    assert all(r.available for r in lenient if r.capacity == Capacity.SPOT)


def test_a_preemption_costs_the_restart_less_what_the_notice_window_trains() -> None:
    costs = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60, notice_s=120)
    assert costs.preemption_loss_s == 150.0  # 240 s restart - (120 - 30) s trained
    # A notice long enough to hide the boot still leaves the move's downtime.
    assert MoveCosts(boot_s=60, notice_s=600).preemption_loss_s == MoveCosts().downtime_s


def two_zone_market(hours: float = 30) -> SimMarket:
    """Zone a loses capacity for 10 minutes every 3 hours; zone b never does.
    Same price; a sorts first by id."""
    rows = []
    for zone in ("us-east-1a", "us-east-1b"):
        rows.append(TraceRow(T0, "aws", "us-east-1", zone, "p3.2xlarge", Capacity.SPOT,
                             0.918, True))
        rows.append(TraceRow(T0, "aws", "us-east-1", zone, "p3.2xlarge", Capacity.ON_DEMAND,
                             3.06, True))
    for k in range(1, int(hours / 3)):
        drop = T0 + timedelta(hours=3 * k)
        for t, up in ((drop, False), (drop + timedelta(minutes=10), True)):
            rows.append(TraceRow(t, "aws", "us-east-1", "us-east-1a", "p3.2xlarge",
                                 Capacity.SPOT, 0.918, up))
    return SimMarket(rows)


def test_the_simulated_scout_sees_losses_as_they_happen_and_places_on_the_steady_zone() -> None:
    market = two_zone_market()
    before = {o.zone: o for o in market.offers((T0 + timedelta(hours=1)).timestamp())
              if o.capacity == Capacity.SPOT}
    assert before["us-east-1a"].interruptions_per_day == 0.0  # nothing seen yet
    later = (T0 + timedelta(hours=10)).timestamp()
    after = {o.zone: o for o in market.offers(later) if o.capacity == Capacity.SPOT}
    assert after["us-east-1a"].interruptions_per_day == 3.0
    assert after["us-east-1b"].interruptions_per_day == 0.0
    spec = JobSpec(name="j", command="sim", expected_duration_hours=8,
                   resources=Resources(gpus=1))
    job = Job(id="j", spec=spec, status=JobStatus.SCOUTING, created_at=T0)
    decision = place_job(job, market.offers(later), datetime.fromtimestamp(later, UTC))
    assert decision.offer is not None and decision.offer.zone == "us-east-1b"


def test_a_job_submitted_after_losses_were_seen_is_never_preempted() -> None:
    market = two_zone_market(hours=40)
    early = SimJob(JobSpec(name="early", command="sim", expected_duration_hours=12,
                           resources=Resources(gpus=1)), T0)
    late = SimJob(JobSpec(name="late", command="sim", expected_duration_hours=12,
                          resources=Resources(gpus=1)), T0 + timedelta(hours=10))
    config = SimConfig()
    result = simulate([early, late], market, GpuScoutPolicy.for_config(config), config)
    by_name = {j.name: j for j in result.jobs}
    # Before any loss was seen the tie went to zone a, by id: it was preempted.
    assert by_name["early"].preemptions >= 1
    assert by_name["late"].preemptions == 0 and by_name["late"].migrations == 0
