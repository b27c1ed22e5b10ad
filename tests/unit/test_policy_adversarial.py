"""The move policy against markets that try to make it misbehave.

A small driver replays a market through ``decide_move`` as the scout would
(a decision every scout interval, the job following each move it is told
to make), and the tests check what a user relies on: a flipping market does
not make the job ping-pong, a spike during a move does not bounce it back at
once, a nearly spent budget is never broken by a move, a deadline is kept by
falling back to on-demand, and spot is taken again when that pays. A seeded
fuzz test checks the same rules over thousands of random situations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Progress, Resources
from gpuscout.policy import (
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    Trigger,
    decide_move,
    dwell_s,
    move_cost_usd,
    remaining_work_hours,
    spot_reserve_s,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
COSTS = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60)
POLICY = MovePolicy()
GPU = Resources(gpus=1)


def offer(name: str, price: float, *, zone: str = "z", capacity: Capacity = Capacity.SPOT,
          available: bool = True, speed: float = 1.0) -> Offer:
    return Offer(id=name, provider="p", region="r", zone=zone, instance_type="t",
                 capacity=capacity, gpus=1, gpu_type="V100", vcpus=8, memory_gb=61,
                 price_per_hour=price, available=available, relative_speed=speed)


def job(*, hours: float = 48.0, step: int = 0, budget: float | None = None,
        spent: float = 0.0, deadline: datetime | None = None, offer_id: str = "a",
        status: JobStatus = JobStatus.RUNNING, last_move: datetime | None = None) -> Job:
    spec = JobSpec(name="j", command="true", resources=GPU, expected_duration_hours=hours,
                   budget_usd=budget, deadline=deadline)
    return Job(id="job", spec=spec, status=status, created_at=T0, offer_id=offer_id,
               instance_id="i", progress=Progress(step=step, total_steps=10_000),
               cost_usd=spent, started_at=T0, last_migration_at=last_move)


@dataclass
class Run:
    moves: list[tuple[datetime, MoveDecision]]
    cost_usd: float
    job: Job


def replay(market: Callable[[datetime], list[Offer]], start: Job, *, hours: float,
           policy: MovePolicy = POLICY, interval_s: float = 120.0) -> Run:
    """The scout over ``hours`` of ``market``: bill and progress the job on
    its offer, decide, follow the move (its cost billed, its downtime lost).
    A job left on an offer that is no longer available waits, unbilled."""
    j, now, price_moves = start, T0, 0
    moves: list[tuple[datetime, MoveDecision]] = []
    end = T0 + timedelta(hours=hours)
    while now < end and j.progress.step < (j.progress.total_steps or 0):
        offers = market(now)
        current = next(o for o in offers if o.id == j.offer_id)
        d = decide_move(j, current, offers, policy, now,
                        view=JobView(price_moves=price_moves), costs=COSTS)
        spent = j.cost_usd
        step = j.progress.step
        if d.move and d.target is not None:
            moves.append((now, d))
            spent += move_cost_usd(current, d.target, COSTS, 0.0)
            price_moves += d.trigger == Trigger.PRICE
            # Boot while training, then the downtime.
            work_s = interval_s - COSTS.downtime_s
            j = replace(j, offer_id=d.target.id, last_migration_at=now)
            current = d.target
        elif not current.available:
            # Reclaimed and waiting for capacity: no progress, no bill.
            now += timedelta(seconds=interval_s)
            continue
        else:
            work_s = interval_s
        spent += current.price_per_hour * interval_s / 3600
        total = j.progress.total_steps or 1
        step += round(work_s / 3600 * current.relative_speed / j.spec.expected_duration_hours
                      * total)
        j = replace(j, cost_usd=spent, progress=replace(j.progress, step=min(step, total)))
        now += timedelta(seconds=interval_s)
    return Run(moves, j.cost_usd, j)


# --- oscillating prices ----------------------------------------------------------------


def flipping(period_min: float, low: float = 0.5, high: float = 1.0
             ) -> Callable[[datetime], list[Offer]]:
    """Two offers whose prices swap every ``period_min`` minutes."""
    def market(now: datetime) -> list[Offer]:
        flip = int((now - T0).total_seconds() // (period_min * 60)) % 2
        return [offer("a", high if flip else low), offer("b", low if flip else high)]
    return market


@pytest.mark.parametrize("period_min", [2, 10, 30, 120, 360])
def test_a_flipping_market_is_followed_a_bounded_number_of_times(period_min: float) -> None:
    run = replay(flipping(period_min), job(), hours=48)
    assert len(run.moves) <= POLICY.max_moves  # type: ignore[operator]
    # Each move waited out its dwell, which doubles with every move.
    times = [at for at, _ in run.moves]
    for k, (previous, at) in enumerate(zip(times, times[1:], strict=False), start=1):
        assert (at - previous).total_seconds() >= dwell_s(POLICY, k)


def test_without_a_cap_the_growing_dwell_still_bounds_the_moves() -> None:
    policy = replace(POLICY, max_moves=None)
    run = replay(flipping(10), job(), hours=48, policy=policy)
    # 10, 20, 40, 80, 160, 320 min, then every 6 h at most.
    assert 1 <= len(run.moves) <= 6 + 48 / 6


def test_following_a_flipping_market_costs_no_more_than_staying_put() -> None:
    stayed = replay(flipping(360), job(), hours=48, policy=replace(POLICY, max_moves=0))
    moved = replay(flipping(360), job(), hours=48)
    assert moved.moves and not stayed.moves
    assert moved.cost_usd < stayed.cost_usd


@pytest.mark.parametrize("swing", [0.05, 0.10, 0.15, 0.19])
def test_prices_flickering_under_the_threshold_never_move_the_job(swing: float) -> None:
    run = replay(flipping(2, low=1.0 - swing, high=1.0), job(), hours=24)
    assert run.moves == []


# --- a price spike during a move ------------------------------------------------------


def test_a_spike_on_the_target_during_the_move_does_not_bounce_the_job() -> None:
    a, b = offer("a", 1.0), offer("b", 0.5)
    first = decide_move(job(), a, [a, b], POLICY, T0, costs=COSTS)
    assert first.move and first.target == b
    spiked = [a, b.with_(price_per_hour=5.0)]
    # While the move runs the job is migrating: no second decision starts.
    migrating = job(status=JobStatus.MIGRATING)
    assert not decide_move(migrating, a, spiked, POLICY, T0 + timedelta(minutes=2),
                           costs=COSTS).move
    # Landed on the spiked offer: it stays out the dwell...
    landed = job(offer_id="b", last_move=T0 + timedelta(minutes=5))
    view = JobView(price_moves=1)
    early = decide_move(landed, spiked[1], spiked, POLICY, T0 + timedelta(minutes=10),
                        view=view, costs=COSTS)
    assert not early.move and "minimum dwell" in early.reason
    # ... then goes back once, because at 5x the price that pays.
    later = decide_move(landed, spiked[1], spiked, POLICY, T0 + timedelta(minutes=16),
                        view=view, costs=COSTS)
    assert later.move and later.target == a


def test_a_spike_that_passes_before_the_dwell_ends_causes_no_move() -> None:
    def market(now: datetime) -> list[Offer]:
        minutes = (now - T0).total_seconds() / 60
        b_price = 0.5 if minutes < 4 or minutes > 8 else 50.0  # spike from 4 to 8 min
        return [offer("a", 1.0), offer("b", b_price)]

    run = replay(market, job(), hours=6)
    assert [d.target.id for _, d in run.moves if d.target] == ["b"]


# --- budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("left", [-5.0, -0.01, 0.01, 0.05, 0.5, 1.0])
def test_a_move_that_lowers_the_total_is_never_refused_for_the_budget(left: float) -> None:
    # Nearly done, and the budget covers staying with ``left`` to spare
    # (negative: the job overruns where it is).
    j = job(hours=10, step=9_000)
    stay_cost = remaining_work_hours(j, T0) * 1.0
    j = replace(j, spec=replace(j.spec, budget_usd=100.0), cost_usd=100.0 - stay_cost - left)
    a, b = offer("a", 1.0), offer("b", 0.1)
    d = decide_move(j, a, [a, b], POLICY, T0, costs=COSTS)
    assert d.move, d.reason
    assert "break the budget" not in d.reason


def test_a_budget_run_never_ends_over_budget_because_of_moves() -> None:
    # A market that flips every 6 h, and a budget that staying on the
    # dearer offer the whole way would just meet.
    budget = 48 * 1.0 + 0.01
    run = replay(flipping(360), job(budget=budget), hours=60)
    assert run.job.progress.step == run.job.progress.total_steps
    assert run.cost_usd <= budget


# --- deadline and on-demand fallback -----------------------------------------------------

SPOT = offer("spot", 0.918)
OD = offer("od", 3.06, capacity=Capacity.ON_DEMAND)


def test_a_deadline_forces_on_demand_once_the_slack_cannot_absorb_a_preemption() -> None:
    deadline = T0 + timedelta(hours=52)
    guard = spot_reserve_s(POLICY, COSTS)  # one preemption's loss + the margin
    # 48 work hours; at hour h, with `done` hours done, slack = 52 - h - (48 - done).
    for hour, done, expect in [(10, 10, False), (20, 16.5, False), (20, 16.1, False),
                               (20, 16.05, True), (30, 26.05, True)]:
        j = job(deadline=deadline, offer_id="spot", step=int(done / 48 * 10_000))
        now = T0 + timedelta(hours=hour)
        d = decide_move(j, SPOT, [SPOT, OD], POLICY, now, costs=COSTS)
        slack = d.deadline_slack_s or 0.0
        assert d.move == (slack < guard) == expect, (hour, done, d.reason)
        if d.move:
            assert d.trigger == Trigger.DEADLINE and d.target == OD
    # Too late for even on-demand to make it after a move: stay, the best chance.
    j = job(deadline=deadline, offer_id="spot", step=int(36 / 48 * 10_000))
    d = decide_move(j, SPOT, [SPOT, OD], POLICY, T0 + timedelta(hours=40), costs=COSTS)
    assert not d.move


def test_spot_gone_goes_to_on_demand_and_comes_back_when_it_returns_and_pays() -> None:
    # 48 work hours, 52 h to the deadline: spot goes away from hour 1 to 6.
    deadline = T0 + timedelta(hours=52)
    spot_back_at = 6.0

    def market(now: datetime) -> list[Offer]:
        hours = (now - T0).total_seconds() / 3600
        return [SPOT.with_(available=not 1.0 <= hours < spot_back_at), OD]

    run = replay(market, job(deadline=deadline, offer_id="spot"), hours=52)
    path = [(d.trigger, d.target.id) for _, d in run.moves if d.target]
    assert path == [(Trigger.CAPACITY, "od"), (Trigger.PRICE, "spot")]
    # Uniform Progress: on-demand only once the job fell behind its line
    # (minutes after spot went), back on spot as soon as it returned.
    to_od, back = ((at - T0).total_seconds() / 3600 for at, _ in run.moves)
    assert 1.0 < to_od < 1.5
    assert spot_back_at <= back < spot_back_at + 0.1
    assert run.job.progress.step == run.job.progress.total_steps  # by the deadline


def test_a_job_ahead_of_the_line_waits_out_a_spot_gap_instead_of_paying_on_demand() -> None:
    # After 10 h on spot a 48 h job due in 70 h is 3 h of work ahead of the
    # uniform-progress line: a 3 h gap in spot costs it nothing.
    deadline = T0 + timedelta(hours=70)

    def market(now: datetime) -> list[Offer]:
        hours = (now - T0).total_seconds() / 3600
        return [SPOT.with_(available=not 10.0 <= hours < 13.0), OD]

    run = replay(market, job(deadline=deadline, offer_id="spot"), hours=70)
    assert run.moves == []
    assert run.job.progress.step == run.job.progress.total_steps
    assert run.cost_usd == pytest.approx(48 * 0.918, rel=0.01)


def test_on_demand_with_thin_slack_does_not_gamble_on_spot_returning() -> None:
    j = job(deadline=T0 + timedelta(hours=48.07), offer_id="od")
    d = decide_move(j, OD, [OD, SPOT], POLICY, T0, costs=COSTS)
    assert not d.move and "break the deadline" in d.reason


# --- seeded fuzz: the rules hold everywhere ----------------------------------------------


def random_situation(rng: random.Random) -> tuple[Job, Offer, list[Offer], JobView, datetime]:
    offers = [
        Offer(id=f"o{i}", provider="p", region=rng.choice(["r1", "r2"]),
              zone=rng.choice(["z1", "z2", "z3"]), instance_type="t",
              capacity=rng.choice(list(Capacity)), gpus=rng.choice([0, 1, 1, 2]),
              gpu_type="V100", vcpus=8, memory_gb=61,
              price_per_hour=round(rng.uniform(0.05, 4.0), 3),
              available=rng.random() < 0.8, relative_speed=rng.choice([0.25, 0.5, 1.0, 2.0]))
        for i in range(rng.randint(1, 12))
    ]
    current = rng.choice(offers)
    now = T0 + timedelta(hours=rng.uniform(0, 40))
    hours = rng.uniform(0.1, 60)
    spec = JobSpec(
        name="j", command="true", resources=GPU, expected_duration_hours=hours,
        budget_usd=rng.choice([None, rng.uniform(1, 200)]),
        deadline=rng.choice([None, now + timedelta(hours=rng.uniform(0.1, 80))]),
        dataset_size_gb=rng.choice([0.0, 10.0, 500.0]),
        savings_threshold=rng.choice([None, 0.05, 0.5]))
    j = Job(id="job", spec=spec, status=rng.choice([JobStatus.RUNNING] * 4 + list(JobStatus)),
            created_at=T0, offer_id=current.id, instance_id="i",
            progress=Progress(step=rng.randint(0, 1000), total_steps=1000),
            cost_usd=rng.uniform(0, 150), started_at=T0,
            last_migration_at=rng.choice([None, now - timedelta(minutes=rng.uniform(0, 600))]))
    view = JobView(price_moves=rng.randint(0, 12),
                   avoid_zones=frozenset(rng.sample(["p:z1", "p:z2", "p:z3"], rng.randint(0, 2))))
    return j, current, offers, view, now


def test_fuzz_no_decision_breaks_a_rule() -> None:
    rng = random.Random(20261124)
    moved = {t: 0 for t in (Trigger.PRICE, Trigger.DEADLINE, Trigger.CAPACITY)}
    for _ in range(5000):
        j, current, offers, view, now = random_situation(rng)
        d = decide_move(j, current, offers, POLICY, now, view=view, costs=COSTS)
        assert d.decided_at == now and d.reason
        if not d.move:
            continue
        moved[d.trigger] += 1
        t = d.target
        assert j.status == JobStatus.RUNNING and t is not None
        assert t.id != current.id and t.available and t.satisfies(GPU)
        assert not (t.capacity == Capacity.SPOT and f"p:{t.zone}" in view.avoid_zones)
        if d.trigger == Trigger.DEADLINE:
            assert current.capacity == Capacity.SPOT and t.capacity == Capacity.ON_DEMAND
        if d.trigger == Trigger.CAPACITY:
            assert not current.available
        if d.trigger != Trigger.PRICE:
            continue
        threshold = j.spec.savings_threshold or POLICY.savings_threshold
        assert d.savings >= threshold - 1e-9
        assert d.expected_saving_usd is not None and d.move_cost_usd is not None
        assert d.expected_saving_usd > d.move_cost_usd
        # The cap and the dwell hold every price move but a return from
        # on-demand to spot.
        returning = current.capacity == Capacity.ON_DEMAND and t.capacity == Capacity.SPOT
        assert returning or view.price_moves < (POLICY.max_moves or 0)
        if j.last_migration_at is not None and not returning:
            assert (now - j.last_migration_at).total_seconds() >= dwell_s(POLICY,
                                                                          view.price_moves)
        if j.spec.budget_usd is not None:
            left = j.spec.budget_usd - j.cost_usd
            stay = (d.remaining_work_hours or 0.0) * current.cost_per_work_hour
            # A price move nets a saving: it lowers the projected total.
            assert stay - d.expected_saving_usd + d.move_cost_usd <= stay + 1e-9 or left >= 0
        if j.spec.deadline is not None:
            work = d.remaining_work_hours or 0.0
            finish = (COSTS.boot_s + COSTS.downtime_s
                      + max(0.0, work - COSTS.boot_s / 3600 * current.relative_speed)
                      / t.relative_speed * 3600)
            assert now + timedelta(seconds=finish) <= j.spec.deadline
    assert all(n > 0 for n in moved.values()), moved  # every kind of move was exercised
