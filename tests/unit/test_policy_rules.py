"""Table tests of ``decide_move``'s ordered rules, one table per rule
(``gpuscout.policy.migration.MOVE_RULES``), of the stale-market guard and of
the statistics of past moves (``measured_move_costs``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import (
    Capacity,
    Job,
    JobSpec,
    JobStatus,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    Offer,
    Progress,
    Resources,
)
from gpuscout.policy import (
    MOVE_RULES,
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    Trigger,
    decide_move,
)
from gpuscout.policy.migration import (
    MoveSituation,
    capacity_gone,
    deadline_guard,
    held_back,
    market_synced,
    price_move,
    situation,
    stale_offers,
    within_limits,
)
from gpuscout.policy.past_moves import MEASURED_MOVES, measured_move_costs

NOW = datetime(2026, 1, 1, tzinfo=UTC)
COSTS = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60)


def offer(name: str, price: float, *, capacity: Capacity = Capacity.SPOT, speed: float = 1.0,
          available: bool = True, zone: str = "z") -> Offer:
    return Offer(id=name, provider="local", region="r", zone=zone, instance_type=name,
                 capacity=capacity, gpus=1, gpu_type="V100", vcpus=8, memory_gb=61,
                 price_per_hour=price, available=available, relative_speed=speed)


SPOT = offer("spot", 0.918)
GONE = SPOT.with_(available=False)
OD = offer("od", 3.06, capacity=Capacity.ON_DEMAND)
CUR = offer("cur", 1.0)


def job(*, hours: float = 10.0, step: int = 0, deadline_in_h: float | None = None,
        created_h_ago: float = 0.0, budget: float | None = None, spent: float = 0.0,
        moved_s_ago: float | None = None, offer_id: str = "cur") -> Job:
    spec = JobSpec(name="j", command="true", resources=Resources(gpus=1),
                   expected_duration_hours=hours, budget_usd=budget,
                   deadline=NOW + timedelta(hours=deadline_in_h) if deadline_in_h else None)
    return Job(id="job-1", spec=spec, status=JobStatus.RUNNING,
               created_at=NOW - timedelta(hours=created_h_ago), offer_id=offer_id,
               instance_id="i-1", progress=Progress(step=step, total_steps=1000),
               cost_usd=spent,
               last_migration_at=(NOW - timedelta(seconds=moved_s_ago)
                                  if moved_s_ago is not None else None))


def at(job_: Job, current: Offer, others: list[Offer], *, view: JobView | None = None,
       policy: MovePolicy | None = None, offers_age_s: float | None = None) -> MoveSituation:
    return situation(replace(job_, offer_id=current.id), current, [current, *others],
                     policy or MovePolicy(), NOW, view=view, costs=COSTS,
                     offers_age_s=offers_age_s)


def outcome(decision: MoveDecision | None) -> tuple[bool, str | None, str] | None:
    """(move, target, trigger) of a rule's decision; None when it passes."""
    if decision is None:
        return None
    return decision.move, decision.target.id if decision.target else None, decision.trigger


def test_the_rules_are_asked_in_order() -> None:
    assert MOVE_RULES == (market_synced, capacity_gone, deadline_guard, held_back, price_move)


# --- 0. the market is recent enough to act on --------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "bound_s", "reason"),
    [
        (None, 600.0, None),  # unknown age (a manual market): never too old
        (0.0, 600.0, None),
        (600.0, 600.0, None),  # at the bound: still acted on
        (601.0, 600.0, "no move: offers are 601 s old (bound 600 s)"),
        (7200.0, 600.0, "no move: offers are 7200 s old (bound 600 s)"),
        (30.0, 10.0, "no move: offers are 30 s old (bound 10 s)"),
    ],
)
def test_stale_offers(age_s: float | None, bound_s: float, reason: str | None) -> None:
    assert MovePolicy().max_offer_age_s == 600.0
    assert stale_offers(age_s, MovePolicy(max_offer_age_s=bound_s)) == reason


@pytest.mark.parametrize(
    ("case", "current", "others", "age_s", "expected"),
    [
        ("fresh: the other rules decide", CUR, [offer("x", 0.5)], 5.0, None),
        ("unknown age: the other rules decide", CUR, [offer("x", 0.5)], None, None),
        ("stale: no price move", CUR, [offer("x", 0.5)], 601.0, (False, None, Trigger.PRICE)),
        ("stale: not even a forced one (the gone capacity may be stale too)", GONE, [OD],
         601.0, (False, None, Trigger.PRICE)),
    ],
)
def test_market_synced(case: str, current: Offer, others: list[Offer], age_s: float | None,
                       expected: tuple[bool, str | None, str] | None) -> None:
    s = at(job(), current, others, offers_age_s=age_s)
    assert outcome(market_synced(s)) == expected, case
    d = decide_move(replace(job(), offer_id=current.id), current, [current, *others],
                    MovePolicy(), NOW, costs=COSTS, offers_age_s=age_s)
    if expected is not None:
        assert d.reason == "no move: offers are 601 s old (bound 600 s)", case
        assert d.remaining_work_hours is not None and d.decided_at == NOW  # its numbers
    else:
        assert "offers are" not in d.reason, case


# --- 1. the current capacity is gone -----------------------------------------------------


@pytest.mark.parametrize(
    ("case", "job_", "current", "others", "expected", "reason_part"),
    [
        ("still available: the rule passes", job(), SPOT, [OD], None, None),
        ("gone: move now, even right after a move", job(moved_s_ago=5), GONE, [OD],
         (True, "od", Trigger.CAPACITY), "no longer available; moving to od"),
        ("gone, nowhere to go: stay and say so", job(), GONE, [], (False, None, Trigger.PRICE),
         "no other offer fits"),
        ("gone, ahead of the uniform-progress line: wait for spot, not on-demand",
         job(deadline_in_h=40), GONE, [OD], (False, "od", Trigger.PRICE), "waiting for spot"),
        ("gone, and the deadline needs on-demand", job(deadline_in_h=10.1), GONE, [OD],
         (True, "od", Trigger.CAPACITY), "moving to od"),
        ("gone, behind the line: on-demand", job(deadline_in_h=20, created_h_ago=15), GONE,
         [OD], (True, "od", Trigger.CAPACITY), "moving to od"),
        ("gone: of the offers that keep the deadline, the most net saving",
         job(deadline_in_h=30), GONE, [OD, offer("spot-y", 0.9, zone="y")],
         (True, "spot-y", Trigger.CAPACITY), "moving to spot-y"),
        ("gone: spot in the zone just reclaimed is no target", job(deadline_in_h=10.1), GONE,
         [offer("spot-z", 0.5), OD], (True, "od", Trigger.CAPACITY), "moving to od"),
    ],
)
def test_capacity_gone(case: str, job_: Job, current: Offer, others: list[Offer],
                       expected: tuple[bool, str | None, str] | None,
                       reason_part: str | None) -> None:
    view = JobView(avoid_zones=frozenset({"local:z"})) if "reclaimed" in case else None
    d = capacity_gone(at(job_, current, others, view=view))
    assert outcome(d) == expected, (case, d and d.reason)
    if d is not None:
        assert reason_part is not None and reason_part in d.reason, (case, d.reason)


# --- 2. a spot job whose slack no longer covers a preemption ----------------------------


@pytest.mark.parametrize(
    ("case", "job_", "current", "others", "spread_s", "expected"),
    [
        ("no deadline: passes", job(), SPOT, [OD], 0.0, None),
        ("on-demand already: passes", job(deadline_in_h=10.01), OD, [SPOT], 0.0, None),
        ("slack covers a preemption and the margin: passes", job(deadline_in_h=10.07), SPOT,
         [OD], 0.0, None),
        ("slack short of a preemption: on-demand", job(deadline_in_h=10.05), SPOT, [OD], 0.0,
         (True, "od", Trigger.DEADLINE)),
        ("restarts measured a minute slower: the same slack is short", job(deadline_in_h=10.07),
         SPOT, [OD], 60.0, (True, "od", Trigger.DEADLINE)),
        ("short, but no on-demand offer: passes (staying is its best chance)",
         job(deadline_in_h=10.05), SPOT, [offer("spot-y", 0.5, zone="y")], 0.0, None),
        ("short, and no on-demand offer would make it either: passes",
         job(deadline_in_h=10.01), SPOT, [OD], 0.0, None),
        ("short: the cheapest on-demand per work hour",
         job(deadline_in_h=10.05), SPOT,
         [OD, offer("od-2", 2.0, capacity=Capacity.ON_DEMAND)], 0.0,
         (True, "od-2", Trigger.DEADLINE)),
    ],
)
def test_deadline_guard(case: str, job_: Job, current: Offer, others: list[Offer],
                        spread_s: float, expected: tuple[bool, str | None, str] | None) -> None:
    s = at(job_, current, others)
    s = replace(s, costs=replace(COSTS, restart_spread_s=spread_s))
    d = deadline_guard(s)
    assert outcome(d) == expected, (case, d and d.reason)
    if d is not None:
        assert "no longer covers a spot preemption" in d.reason
        assert f"margin {60 + spread_s:.0f}s" in d.reason


# --- 3. the dwell and the cap on price moves ---------------------------------------------

HELD = MovePolicy(min_dwell_s=600, max_moves=3)


@pytest.mark.parametrize(
    ("case", "job_", "current", "others", "view", "reason"),
    [
        ("never moved: passes", job(), CUR, [offer("x", 0.1)], JobView(), None),
        ("past the dwell: passes", job(moved_s_ago=601), CUR, [offer("x", 0.1)], JobView(),
         None),
        ("within the dwell on spot: stays", job(moved_s_ago=60), CUR, [offer("x", 0.1)],
         JobView(), "moved 60s ago, minimum dwell is 600s after 0 price moves"),
        ("the dwell doubles with each price move", job(moved_s_ago=1000), CUR,
         [offer("x", 0.1)], JobView(price_moves=2),
         "moved 1000s ago, minimum dwell is 1200s after 2 price moves"),
        ("at the cap on spot: stays", job(), CUR, [offer("x", 0.1)], JobView(price_moves=3),
         "already moved 3 times for price, the cap is 3"),
        ("on-demand within the dwell, spot is back: passes (back to spot)",
         job(moved_s_ago=60), OD, [SPOT], JobView(), None),
        ("on-demand at the cap, spot is back: passes", job(), OD, [SPOT],
         JobView(price_moves=3), None),
        ("on-demand within the dwell, only on-demand elsewhere: stays", job(moved_s_ago=60),
         OD, [offer("od-2", 0.5, capacity=Capacity.ON_DEMAND)], JobView(),
         "moved 60s ago, minimum dwell is 600s after 0 price moves"),
    ],
)
def test_held_back(case: str, job_: Job, current: Offer, others: list[Offer], view: JobView,
                   reason: str | None) -> None:
    d = held_back(at(job_, current, others, view=view, policy=HELD))
    assert (d.reason if d else None) == reason, case
    assert d is None or not d.move


# --- 4. budget and deadline of the moves that pay ----------------------------------------


@pytest.mark.parametrize(
    ("case", "job_", "targets", "expected", "reason_part"),
    [
        ("one move, within both", job(), [offer("x", 0.5)], (True, "x", Trigger.PRICE),
         "50.0% cheaper than cur"),
        ("the one that nets the most", job(), [offer("x", 0.5), offer("y", 0.4)],
         (True, "y", Trigger.PRICE), "60.0% cheaper"),
        ("a budget nearly spent: a move that lowers the total is allowed",
         job(budget=10.0, spent=9.0, step=900), [offer("x", 0.5)], (True, "x", Trigger.PRICE),
         "cheaper"),
        ("a slow spot target would miss the deadline", job(deadline_in_h=14),
         [offer("slow", 0.2, speed=0.5)], (False, "slow", Trigger.PRICE),
         "moving to slow would break the deadline"),
        ("the slow one breaks the deadline, the fast one is taken", job(deadline_in_h=14),
         [offer("slow", 0.2, speed=0.5), offer("x", 0.5)], (True, "x", Trigger.PRICE),
         "cheaper"),
    ],
)
def test_within_limits(case: str, job_: Job, targets: list[Offer],
                       expected: tuple[bool, str, str], reason_part: str) -> None:
    s = at(job_, CUR, targets)
    d = within_limits(s, [s.weigh(o) for o in targets])
    assert outcome(d) == expected, (case, d.reason)
    assert reason_part in d.reason, (case, d.reason)


# --- 5. price: the threshold, and a saving that pays the move ----------------------------


@pytest.mark.parametrize(
    ("case", "job_", "others", "threshold", "expected", "reason_part"),
    [
        ("nothing else", job(), [], None, (False, None, Trigger.PRICE),
         "no other available compatible offer"),
        ("only unavailable or unfit offers", job(),
         [offer("x", 0.1, available=False), offer("y", 0.1).with_(gpus=0)], None,
         (False, None, Trigger.PRICE), "no other available compatible offer"),
        ("exactly the threshold", job(), [offer("x", 0.8)], None, (True, "x", Trigger.PRICE),
         "20.0% cheaper"),
        ("just below the threshold", job(), [offer("x", 0.81)], None,
         (False, "x", Trigger.PRICE), "below the 20% threshold"),
        ("the job's own threshold", job(), [offer("x", 0.9)], 0.05, (True, "x", Trigger.PRICE),
         "threshold 5%"),
        ("cheaper per hour, dearer per work hour", job(), [offer("x", 0.6, speed=0.5)], None,
         (False, "x", Trigger.PRICE), "below"),
        ("nearly done: the saving does not pay the move", job(step=995), [offer("x", 0.5)],
         None, (False, "x", Trigger.PRICE), "does not pay"),
    ],
)
def test_price_move(case: str, job_: Job, others: list[Offer], threshold: float | None,
                    expected: tuple[bool, str | None, str], reason_part: str) -> None:
    job_ = replace(job_, spec=replace(job_.spec, savings_threshold=threshold))
    d = price_move(at(job_, CUR, others))
    assert outcome(d) == expected, (case, d.reason)
    assert reason_part in d.reason, (case, d.reason)
    assert d.threshold == (threshold if threshold is not None else 0.2)


# --- the statistics of past moves ---------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def done(boot: float | None, ckpt: float, restore: float, *, n: int = 0,
         started_s: float = 0.0) -> Migration:
    start = T0 + timedelta(seconds=started_s)
    ready = start + timedelta(seconds=boot) if boot is not None else None
    ckpt_at = start + timedelta(seconds=(boot or 0) + ckpt)
    return Migration(id=f"m{n}", job_id="j", status=MigrationStatus.COMPLETED,
                     phase=MigrationPhase.DONE, reason=MigrationReason.PRICE,
                     from_instance_id="a", from_offer_id="x", to_offer_id="y",
                     to_instance_id=f"i-{n}", started_at=start, replacement_ready_at=ready,
                     checkpointed_at=ckpt_at,
                     resumed_at=ckpt_at + timedelta(seconds=restore))


BASE = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60, restart_spread_s=0.0)


@pytest.mark.parametrize(
    ("case", "moves", "setups", "expected"),
    [
        ("none measured: the estimates", [], None, (180.0, 30.0, 60.0, 0.0)),
        ("two measured: still the estimates", [done(10, 1, 2), done(20, 2, 4)], None,
         (180.0, 30.0, 60.0, 0.0)),
        ("three: the medians, and how far the slow restarts ran past theirs",
         [done(10, 1, 2), done(20, 2, 4), done(30, 3, 6)], None, (20.0, 2.0, 4.0, 9.6)),
        ("a job's setup is left out of the machine's boot",
         [done(110, 1, 2, n=n) for n in range(3)], {f"i-{n}": 100.0 for n in range(3)},
         (10.0, 1.0, 2.0, 0.0)),
        ("a phase not timed is not measured: boot and checkpoint stay the estimates",
         [done(None, 1, 2, n=n) for n in range(3)], None, (180.0, 30.0, 2.0, 0.0)),
        ("only the last moves count, by start time",
         [done(1000, 1, 2, n=n, started_s=n) for n in range(5)]
         + [done(10, 1, 2, n=n, started_s=100 + n) for n in range(5, 5 + MEASURED_MOVES)],
         None, (10.0, 1.0, 2.0, 0.0)),
    ],
)
def test_measured_move_costs(case: str, moves: list[Migration], setups: dict[str, float] | None,
                             expected: tuple[float, float, float, float]) -> None:
    got = measured_move_costs(list(reversed(moves)), setups, BASE)
    assert (got.boot_s, got.checkpoint_s, got.restore_s) == expected[:3], case
    assert got.restart_spread_s == pytest.approx(expected[3]), case
    assert (got.notice_s, got.egress_usd_per_gb) == (BASE.notice_s, BASE.egress_usd_per_gb)
