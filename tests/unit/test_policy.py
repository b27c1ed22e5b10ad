"""Table tests of the pure placement and move policy."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Progress, Resources
from gpuscout.policy import (
    JobView,
    MoveCosts,
    MovePolicy,
    Offers,
    PlacementDecision,
    Trigger,
    budget_allows,
    budget_thresholds_reached,
    decide_move,
    move_cost_usd,
    offers_for,
    place_job,
    plan_moves,
    projected_cost_usd,
    remaining_work_hours,
    uniform_progress_line,
    weigh_move,
    zone_key,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def offer(name: str, price: float, *, speed: float = 1.0, gpus: int = 1, gpu_type: str = "V100",
          available: bool = True, capacity: Capacity = Capacity.SPOT, vcpus: float = 8,
          memory_gb: float = 61) -> Offer:
    return Offer(id=name, provider="local", region="r", zone="z", instance_type=name,
                 capacity=capacity, gpus=gpus, gpu_type=gpu_type, vcpus=vcpus,
                 memory_gb=memory_gb, price_per_hour=price, available=available,
                 relative_speed=speed)


ONE_GPU = Resources(gpus=1)


def job(offer_id: str = "cur", *, status: JobStatus = JobStatus.RUNNING,
        resources: Resources = ONE_GPU, threshold: float | None = None,
        last_migration_at: datetime | None = None) -> Job:
    return Job(id="job-1", spec=JobSpec(name="j", command="true", resources=resources,
                                        savings_threshold=threshold),
               status=status, created_at=NOW, offer_id=offer_id, instance_id="i-1",
               last_migration_at=last_migration_at)


@pytest.mark.parametrize(
    ("offers", "resources", "expected"),
    [
        ([offer("a", 1.0), offer("b", 0.5)], Resources(gpus=1), "b"),
        ([offer("a", 1.0), offer("b", 0.5, available=False)], Resources(gpus=1), "a"),
        # Per unit of work: half the price at a quarter of the speed is dearer.
        ([offer("fast", 1.0), offer("slow", 0.5, speed=0.25)], Resources(gpus=1), "fast"),
        ([offer("v100", 1.0), offer("t4", 0.1, gpu_type="T4")],
         Resources(gpus=1, gpu_type="v100"), "v100"),
        ([offer("cpu", 0.01, gpus=0), offer("gpu", 1.0)], Resources(gpus=1), "gpu"),
        ([offer("small", 0.1, memory_gb=4), offer("big", 1.0)],
         Resources(gpus=1, memory_gb=16), "big"),
        ([offer("few", 0.1, vcpus=2), offer("many", 1.0)], Resources(gpus=1, cpus=4), "many"),
        # Ties go to the id, so a snapshot always gives the same answer.
        ([offer("b", 1.0), offer("a", 1.0)], Resources(gpus=1), "a"),
        ([offer("a", 1.0, available=False)], Resources(gpus=1), None),
        ([], Resources(), None),
    ],
)
def test_placement_takes_the_cheapest_eligible_offer(
        offers: list[Offer], resources: Resources, expected: str | None) -> None:
    # (the removed ``choose_offer``'s table, through the live placement and
    # through the eligibility filter it uses)
    placement = place_job(job(resources=resources), offers, NOW)
    assert (placement.offer.id if placement.offer else None) == expected
    cheapest = offers_for(resources, offers).eligible(resources).cheapest()
    assert (cheapest.id if cheapest else None) == expected


def test_the_cheapest_eligible_offer_excludes() -> None:
    cheapest = (Offers([offer("a", 0.1), offer("b", 1.0)]).eligible(Resources(gpus=1))
                .excluding({"a"}).cheapest())
    assert cheapest is not None and cheapest.id == "b"


POLICY = MovePolicy(savings_threshold=0.20)


@pytest.mark.parametrize(
    ("current_price", "others", "move", "target", "reason_part"),
    [
        (1.0, [offer("x", 0.80)], True, "x", "20.0% cheaper"),  # exactly the threshold
        (1.0, [offer("x", 0.81)], False, "x", "below the 20% threshold"),
        (1.0, [offer("x", 0.5), offer("y", 0.3)], True, "y", "70.0% cheaper"),
        (1.0, [offer("x", 0.1, available=False)], False, None, "no other available"),
        (1.0, [offer("x", 0.1, gpus=0)], False, None, "no other available"),
        # Cheaper per hour but slower: 0.6 $/h at half speed is 1.2 per work hour.
        (1.0, [offer("x", 0.6, speed=0.5)], False, "x", "below"),
        (1.0, [], False, None, "no other available"),
    ],
)
def test_decide_move(current_price: float, others: list[Offer], move: bool, target: str | None,
                     reason_part: str) -> None:
    current = offer("cur", current_price)
    decision = decide_move(job(), current, [current, *others], POLICY, NOW)
    assert decision.move is move
    assert (decision.target.id if decision.target else None) == target
    assert reason_part in decision.reason
    assert decision.current_offer_id == "cur"


def test_job_threshold_overrides_the_default() -> None:
    current = offer("cur", 1.0)
    cheaper = offer("x", 0.9)
    assert not decide_move(job(), current, [current, cheaper], POLICY, NOW).move
    decision = decide_move(job(threshold=0.05), current, [current, cheaper], POLICY, NOW)
    assert decision.move and decision.savings == pytest.approx(0.1)


@pytest.mark.parametrize("status", [s for s in JobStatus if s != JobStatus.RUNNING])
def test_only_running_jobs_move(status: JobStatus) -> None:
    current = offer("cur", 1.0)
    decision = decide_move(job(status=status), current, [current, offer("x", 0.1)], POLICY, NOW)
    assert not decision.move
    assert status.value in decision.reason


def test_min_dwell_blocks_ping_pong() -> None:
    current = offer("cur", 1.0)
    policy = MovePolicy(savings_threshold=0.2, min_dwell_s=600)
    recent = job(last_migration_at=NOW - timedelta(seconds=60))
    assert not decide_move(recent, current, [current, offer("x", 0.1)], policy, NOW).move
    old = job(last_migration_at=NOW - timedelta(seconds=601))
    assert decide_move(old, current, [current, offer("x", 0.1)], policy, NOW).move


@pytest.mark.parametrize(
    ("current_capacity", "others", "held", "move", "target"),
    [
        # On-demand (spot was gone): back to spot within the dwell, and past the cap.
        (Capacity.ON_DEMAND, [offer("spot", 0.3)], "dwell", True, "spot"),
        (Capacity.ON_DEMAND, [offer("spot", 0.3)], "cap", True, "spot"),
        # ... but not to a cheaper on-demand offer: that is a move between offers.
        (Capacity.ON_DEMAND, [offer("od", 0.3, capacity=Capacity.ON_DEMAND)], "dwell", False,
         None),
        (Capacity.ON_DEMAND, [offer("od", 0.3, capacity=Capacity.ON_DEMAND)], "cap", False,
         None),
        # A spot job within its dwell or at the cap stays.
        (Capacity.SPOT, [offer("spot", 0.3)], "dwell", False, None),
        (Capacity.SPOT, [offer("spot", 0.3)], "cap", False, None),
    ],
)
def test_dwell_and_cap_do_not_keep_a_job_on_on_demand_when_spot_is_back(
        current_capacity: Capacity, others: list[Offer], held: str, move: bool,
        target: str | None) -> None:
    current = offer("cur", 1.0, capacity=current_capacity)
    policy = MovePolicy(savings_threshold=0.2, min_dwell_s=600, max_moves=3)
    if held == "dwell":
        the_job, view = job(last_migration_at=NOW - timedelta(seconds=60)), JobView()
    else:
        the_job, view = job(), JobView(price_moves=3)
    decision = decide_move(the_job, current, [current, *others], policy, NOW, view=view)
    assert decision.move is move
    assert (decision.target.id if decision.target else None) == target
    if not move:
        assert ("minimum dwell" if held == "dwell" else "the cap is 3") in decision.reason


def test_plan_moves_covers_running_jobs_only() -> None:
    current = offer("cur", 1.0)
    jobs = [job(), job(status=JobStatus.PENDING)]
    decisions = plan_moves(jobs, [current, offer("x", 0.5)], POLICY, NOW)
    assert [d.move for d in decisions] == [True]


# --- the cost of moving, budget, deadline, fallback -------------------------------------

COSTS = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60)


def offer_at(name: str, price: float, *, zone: str = "z", region: str = "r",
             capacity: Capacity = Capacity.SPOT, speed: float = 1.0,
             available: bool = True, provider: str = "local") -> Offer:
    return Offer(id=name, provider=provider, region=region, zone=zone, instance_type=name,
                 capacity=capacity, gpus=1, gpu_type="V100", vcpus=8, memory_gb=61,
                 price_per_hour=price, available=available, relative_speed=speed)


def job_with(*, hours: float = 10.0, step: int = 0, total_steps: int | None = 1000,
             budget: float | None = None, spent: float = 0.0,
             deadline_in_h: float | None = None, dataset_gb: float = 0.0,
             status: JobStatus = JobStatus.RUNNING, offer_id: str = "cur",
             started_h_ago: float | None = None, created_h_ago: float = 0.0,
             last_migration_at: datetime | None = None) -> Job:
    spec = JobSpec(name="j", command="true", resources=ONE_GPU, expected_duration_hours=hours,
                   budget_usd=budget, dataset_size_gb=dataset_gb,
                   deadline=NOW + timedelta(hours=deadline_in_h) if deadline_in_h else None)
    return Job(id="job-1", spec=spec, status=status,
               created_at=NOW - timedelta(hours=created_h_ago), offer_id=offer_id,
               instance_id="i-1", progress=Progress(step=step, total_steps=total_steps),
               cost_usd=spent, last_migration_at=last_migration_at,
               started_at=NOW - timedelta(hours=started_h_ago) if started_h_ago else None)


def test_move_cost_counts_boot_on_the_replacement_and_downtime_on_both() -> None:
    cur, tgt = offer_at("cur", 1.0), offer_at("x", 0.5)
    # 0.5 $/h x (180 + 90) s + 1.0 $/h x 90 s, no egress within a region.
    assert move_cost_usd(cur, tgt, COSTS, gb=100) == pytest.approx(0.5 * 270 / 3600 + 90 / 3600)
    far = offer_at("x", 0.5, region="other")
    assert move_cost_usd(cur, far, COSTS, gb=100) == pytest.approx(
        0.5 * 270 / 3600 + 90 / 3600 + 100 * 0.02)
    elsewhere = offer_at("x", 0.5, provider="gcp")
    assert move_cost_usd(cur, elsewhere, COSTS, gb=100) == pytest.approx(
        0.5 * 270 / 3600 + 90 / 3600 + 100 * 0.09)


@pytest.mark.parametrize(
    ("job_", "view", "expected"),
    [
        (job_with(hours=10, step=250, total_steps=1000), JobView(), 7.5),
        (job_with(hours=10, step=1000, total_steps=1000), JobView(), 0.0),
        # No step count: from the time it has run (at the speed it runs).
        (job_with(hours=10, total_steps=None), JobView(running_s=3 * 3600), 7.0),
        (job_with(hours=10, total_steps=None, started_h_ago=4), JobView(), 6.0),
        (job_with(hours=10, total_steps=None), JobView(running_s=11 * 3600), 0.0),
    ],
)
def test_remaining_work(job_: Job, view: JobView, expected: float) -> None:
    assert remaining_work_hours(job_, NOW, view) == pytest.approx(expected)


CUR = offer_at("cur", 1.0)


@pytest.mark.parametrize(
    ("case", "left", "stay", "move", "allowed"),
    [
        ("no budget", None, 1.0, 5.0, True),
        ("cheaper, within budget", 10.0, 5.0, 3.0, True),
        ("cheaper, already over budget", -0.05, 1.0, 0.3, True),
        ("cheaper, staying overruns and so does the move", 0.5, 2.0, 1.0, True),
        ("same total, over budget", -1.0, 1.0, 1.0, True),
        ("dearer, still within budget", 10.0, 3.0, 9.0, True),
        ("dearer, would cross the budget", 5.0, 3.0, 9.0, False),
        ("dearer, already over budget", -1.0, 1.0, 1.5, False),
        ("dearer, lands exactly on the budget", 9.0, 3.0, 9.0, True),
    ],
)
def test_the_budget_rule_refuses_only_moves_that_raise_the_total_over_budget(
        case: str, left: float | None, stay: float, move: float, allowed: bool) -> None:
    assert budget_allows(left, stay, move) is allowed, case


@pytest.mark.parametrize(
    ("spent", "work_h", "budget", "projected", "reached"),
    [
        (0.0, 1.0, 10.0, 1.0, []),
        (7.0, 1.0, 10.0, 8.0, [0.8]),
        (7.0, 3.0, 10.0, 10.0, [0.8, 1.0]),
        (0.07, 0.0, 0.02, 0.07, [0.8, 1.0]),  # past its estimate: the cost so far
        (5.0, 1.0, None, 6.0, []),
    ],
)
def test_projected_cost_and_budget_thresholds(spent: float, work_h: float, budget: float | None,
                                              projected: float, reached: list[float]) -> None:
    j = job_with(spent=spent, budget=budget)
    total = projected_cost_usd(j, work_h, 1.0)
    assert total == pytest.approx(projected)
    assert budget_thresholds_reached(total, budget) == reached


def test_weigh_move_refuses_a_dearer_move_that_crosses_the_budget() -> None:
    # 5 work hours left at $1/h; $8 of budget left.
    j = job_with(budget=10.0, spent=2.0, step=500)
    cheaper = weigh_move(j, CUR, offer_at("x", 0.3), NOW, costs=COSTS)
    assert cheaper.budget_ok and cheaper.expected_usd < cheaper.stay_usd
    dearer = weigh_move(j, CUR, offer_at("y", 2.0), NOW, costs=COSTS)
    assert dearer.expected_usd > 8.0 and not dearer.budget_ok
    affordable = weigh_move(j, CUR, offer_at("z", 1.2), NOW, costs=COSTS)
    assert affordable.expected_usd < 8.0 and affordable.budget_ok
    over = job_with(budget=1.0, spent=2.0, step=500)
    assert weigh_move(over, CUR, offer_at("x", 0.3), NOW, costs=COSTS).budget_ok


@pytest.mark.parametrize(
    ("case", "job_", "others", "view", "move", "target", "reason_part"),
    [
        ("pays: 50% off over 10 work hours", job_with(), [offer_at("x", 0.5)], JobView(),
         True, "x", "saves $"),
        ("nearly done: the saving does not pay the move",
         job_with(step=995), [offer_at("x", 0.5)], JobView(), False, "x", "does not pay"),
        ("no step count, past its estimate", job_with(total_steps=None),
         [offer_at("x", 0.5)], JobView(running_s=10 * 3600), False, "x", "does not pay"),
        ("egress of a big dataset to another region does not pay",
         job_with(hours=2, dataset_gb=500), [offer_at("x", 0.5, region="far")], JobView(),
         False, "x", "does not pay"),
        ("same dataset, same region: free to move", job_with(hours=2, dataset_gb=500),
         [offer_at("x", 0.5)], JobView(), True, "x", "cheaper"),
        ("a cheaper offer far away, one nearly as cheap nearby: the nearby one nets more",
         job_with(hours=2, dataset_gb=500),
         [offer_at("far", 0.4, region="far"), offer_at("near", 0.5)], JobView(), True, "near",
         "cheaper"),
        ("budget nearly spent: a move that lowers the total is allowed",
         job_with(budget=10.0, spent=9.0, step=900), [offer_at("x", 0.5)], JobView(), True,
         "x", "cheaper"),
        ("budget fine", job_with(budget=100.0, spent=9.0), [offer_at("x", 0.5)], JobView(),
         True, "x", "cheaper"),
        ("staying overruns the budget, the move brings it back", job_with(
            budget=10.0, spent=9.0, step=850), [offer_at("x", 0.5)], JobView(), True, "x",
         "cheaper"),
        ("overruns either way: the move overruns less", job_with(
            budget=10.0, spent=9.5, step=850), [offer_at("x", 0.5)], JobView(), True, "x",
         "cheaper"),
        ("already over budget: a 70% cheaper offer is taken", job_with(
            budget=0.02, spent=0.07, total_steps=None), [offer_at("x", 0.3)],
         JobView(running_s=3600.0 * 9), True, "x", "cheaper"),
        ("slow spot target would miss the deadline", job_with(deadline_in_h=14),
         [offer_at("slow", 0.2, speed=0.5)], JobView(), False, "slow", "break the deadline"),
        ("at the cap", job_with(), [offer_at("x", 0.5)], JobView(price_moves=10), False, None,
         "the cap is 10"),
        ("spot in an avoided zone is no target", job_with(),
         [offer_at("x", 0.5, zone="bad"), offer_at("y", 0.7, zone="ok")],
         JobView(avoid_zones=frozenset({"local:bad"})), True, "y", "cheaper"),
    ],
)
def test_price_moves(case: str, job_: Job, others: list[Offer], view: JobView, move: bool,
                     target: str | None, reason_part: str) -> None:
    d = decide_move(job_, CUR, [CUR, *others], MovePolicy(), NOW, view=view, costs=COSTS)
    assert d.move is move, (case, d.reason)
    assert (d.target.id if d.target else None) == target, case
    assert reason_part in d.reason, (case, d.reason)
    assert d.decided_at == NOW and d.remaining_work_hours is not None
    if d.target is not None:
        assert d.expected_saving_usd is not None and d.move_cost_usd is not None
        assert d.move == (d.expected_saving_usd > d.move_cost_usd and d.savings >= 0.2
                          and "break" not in d.reason)


def test_every_decision_reports_its_numbers() -> None:
    d = decide_move(job_with(budget=50.0, spent=10.0, deadline_in_h=20), CUR,
                    [CUR, offer_at("x", 0.5)], MovePolicy(), NOW, costs=COSTS)
    assert d.move and d.trigger == Trigger.PRICE
    assert d.current_cost_per_work_hour == 1.0 and d.target_cost_per_work_hour == 0.5
    assert d.savings == pytest.approx(0.5) and d.threshold == 0.2
    assert d.remaining_work_hours == pytest.approx(10.0)
    # The saving starts after the replacement boots (3 min of work at the old price).
    assert d.expected_saving_usd == pytest.approx(0.5 * (10 - 180 / 3600))
    assert d.move_cost_usd == pytest.approx(move_cost_usd(CUR, offer_at("x", 0.5), COSTS, 0))
    assert d.budget_left_usd == pytest.approx(40.0)
    assert d.deadline_slack_s == pytest.approx(10 * 3600)
    assert d.net_saving_usd == pytest.approx(d.expected_saving_usd - d.move_cost_usd)
    assert set(d.numbers()) >= {"remaining_work_hours", "move_cost_usd", "budget_left_usd"}


ON_DEMAND = offer_at("od", 3.06, capacity=Capacity.ON_DEMAND)
SPOT = offer_at("spot", 0.918)


@pytest.mark.parametrize(
    ("case", "job_", "current", "others", "move", "target", "trigger"),
    [
        ("spot gone: move now, even right after a move",
         job_with(last_migration_at=NOW - timedelta(seconds=5)),
         SPOT.with_(available=False), [ON_DEMAND], True, "od", Trigger.CAPACITY),
        ("spot gone, ahead of the uniform-progress line: wait for spot, not on-demand",
         job_with(hours=10, deadline_in_h=40), SPOT.with_(available=False), [ON_DEMAND],
         False, "od", Trigger.PRICE),
        ("spot gone and the deadline needs it: on-demand",
         job_with(hours=10, deadline_in_h=10.1), SPOT.with_(available=False), [ON_DEMAND],
         True, "od", Trigger.CAPACITY),
        ("spot gone, nothing else: stay and say so", job_with(),
         SPOT.with_(available=False), [], False, None, Trigger.PRICE),
        ("spot job whose slack no longer covers a preemption: on-demand",
         job_with(hours=10, deadline_in_h=10.05), SPOT, [ON_DEMAND], True, "od",
         Trigger.DEADLINE),
        ("spot job whose slack covers a preemption and the margin: stays",
         job_with(hours=10, deadline_in_h=10.07), SPOT, [ON_DEMAND], False, "od",
         Trigger.PRICE),
        ("spot job with slack: stays", job_with(hours=10, deadline_in_h=14), SPOT,
         [ON_DEMAND], False, "od", Trigger.PRICE),
        ("on-demand, spot returns, slack ample: back to spot", job_with(deadline_in_h=20),
         ON_DEMAND, [SPOT], True, "spot", Trigger.PRICE),
        ("on-demand, spot returns, slack too thin for a preemption: stay",
         job_with(deadline_in_h=10.08), ON_DEMAND, [SPOT], False, "spot", Trigger.PRICE),
        ("on-demand, spot returns, but the job is nearly done", job_with(step=999),
         ON_DEMAND, [SPOT], False, "spot", Trigger.PRICE),
    ],
)
def test_deadline_and_capacity(case: str, job_: Job, current: Offer, others: list[Offer],
                               move: bool, target: str | None, trigger: str) -> None:
    job_ = replace(job_, offer_id=current.id)
    d = decide_move(job_, current, [current, *others], MovePolicy(), NOW, costs=COSTS)
    assert (d.move, d.target.id if d.target else None, d.trigger) == (move, target, trigger), (
        case, d.reason)


@pytest.mark.parametrize(("spread_s", "move"), [(0.0, False), (60.0, True)])
def test_restarts_measured_slower_than_their_estimate_widen_the_deadline_reserve(
        spread_s: float, move: bool) -> None:
    # 252 s of slack: a preemption (150 s) and the 60 s margin fit, but not
    # once restarts have been seen to run a minute past the estimate.
    job_ = job_with(hours=10, deadline_in_h=10.07)
    costs = replace(COSTS, restart_spread_s=spread_s)
    d = decide_move(job_, SPOT, [SPOT, ON_DEMAND], MovePolicy(), NOW, costs=costs)
    assert (d.move, d.trigger) == (move, Trigger.DEADLINE if move else Trigger.PRICE), d.reason
    if move:
        assert f"margin {60 + spread_s:.0f}s" in d.reason


@pytest.mark.parametrize(
    ("case", "job_", "offers", "view", "expected", "reason_part"),
    [
        ("no deadline: cheapest", job_with(status=JobStatus.SCOUTING),
         [ON_DEMAND, SPOT], JobView(), "spot", "cheapest"),
        ("no deadline, only on-demand: take it", job_with(status=JobStatus.SCOUTING),
         [ON_DEMAND, SPOT.with_(available=False)], JobView(), "od", "cheapest"),
        ("loose deadline: spot", job_with(status=JobStatus.SCOUTING, deadline_in_h=20),
         [ON_DEMAND, SPOT], JobView(), "spot", "room for a preemption"),
        ("tight deadline: on-demand", job_with(status=JobStatus.SCOUTING, deadline_in_h=10.1),
         [ON_DEMAND, SPOT], JobView(), "od", "on-demand"),
        ("spot gone, ahead of the uniform-progress line: wait",
         job_with(status=JobStatus.RECOVERING, deadline_in_h=20, step=500, created_h_ago=5),
         [ON_DEMAND, SPOT.with_(available=False)], JobView(), None, "waiting for spot"),
        ("spot gone, behind the line: on-demand",
         job_with(status=JobStatus.RECOVERING, deadline_in_h=20, step=100, created_h_ago=10),
         [ON_DEMAND, SPOT.with_(available=False)], JobView(), "od", "behind"),
        ("spot only in the zone just reclaimed: treated as gone",
         job_with(status=JobStatus.RECOVERING, deadline_in_h=20, step=100, created_h_ago=10),
         [ON_DEMAND, SPOT], JobView(avoid_zones=frozenset({"local:z"})), "od", "behind"),
        ("budget: the cheapest that fits it", job_with(status=JobStatus.SCOUTING, budget=12),
         [ON_DEMAND, SPOT], JobView(), "spot", "cheapest"),
        ("no offer at all", job_with(status=JobStatus.SCOUTING), [], JobView(), None,
         "no offer fits the job's resources"),
        # a quota or capacity error took the offers out: not "the resources"
        ("every fitting offer out after failed launches", job_with(status=JobStatus.SCOUTING),
         [ON_DEMAND.with_(available=False), SPOT.with_(available=False)], JobView(), None,
         "every offer that fits the job's resources (2) is out for now: 2 unavailable now "
         "(the market, or a launch that failed: see the job's events)"),
        ("spot avoided, on-demand out", job_with(status=JobStatus.SCOUTING),
         [ON_DEMAND.with_(available=False), SPOT], JobView(avoid_zones=frozenset({"local:z"})),
         None, "1 unavailable now (the market, or a launch that failed: see the job's events); "
               "1 spot in a zone avoided after an interruption notice"),
    ],
)
def test_place_job(case: str, job_: Job, offers: list[Offer], view: JobView,
                   expected: str | None, reason_part: str) -> None:
    p = place_job(job_, offers, NOW, view=view, costs=COSTS)
    assert (p.offer.id if p.offer else None) == expected, (case, p.reason)
    assert reason_part in p.reason, (case, p.reason)


SPOT_Y = offer_at("spot-y", 0.918, zone="y")


def on_notice(job_: Job, current: Offer, market: list[Offer]) -> PlacementDecision:
    """place_job as ControlPlane._urgent_move calls it on a preemption notice:
    the current offer left out and passed as ``leaving``, its zone avoided."""
    return place_job(replace(job_, offer_id=current.id),
                     [o for o in market if o.id != current.id], NOW,
                     view=JobView(avoid_zones=frozenset({zone_key(current)})), costs=COSTS,
                     leaving=current)


@pytest.mark.parametrize(
    ("case", "job_", "market", "expected", "reason_part"),
    [
        # 30.5% done against a line of 17.1%: the deadline does not need on-demand.
        ("single zone, ahead of the line: checkpoint and wait for spot",
         job_with(deadline_in_h=16.58, step=305, created_h_ago=3.42),
         [SPOT, ON_DEMAND], None, "waiting for spot"),
        ("single zone, other spot types only in the zone just reclaimed: wait",
         job_with(deadline_in_h=16.58, step=305, created_h_ago=3.42),
         [SPOT, offer_at("spot2", 1.0), ON_DEMAND], None, "waiting for spot"),
        ("single zone, behind the line by more than a restart: on-demand",
         job_with(deadline_in_h=20, step=100, created_h_ago=10),
         [SPOT, ON_DEMAND], "od", "behind the uniform-progress line"),
        ("single zone, ahead of the line but slack down to the margin: on-demand",
         job_with(deadline_in_h=7.05, step=305, created_h_ago=0.5),
         [SPOT, ON_DEMAND], "od", "slack is down to the margin"),
        ("multi-zone: spot in another zone",
         job_with(deadline_in_h=16.58, step=305, created_h_ago=3.42),
         [SPOT, SPOT_Y, ON_DEMAND], "spot-y", "room for a preemption"),
        ("multi-zone, behind the line: still spot in another zone when it has room",
         job_with(deadline_in_h=20, step=100, created_h_ago=10),
         [SPOT, SPOT_Y, ON_DEMAND], "spot-y", "room for a preemption"),
        ("no deadline, single zone: the cheapest other offer",
         job_with(), [SPOT, ON_DEMAND], "od", "cheapest"),
    ],
)
def test_place_job_on_a_preemption_notice(case: str, job_: Job, market: list[Offer],
                                          expected: str | None, reason_part: str) -> None:
    p = on_notice(job_, SPOT, market)
    assert (p.offer.id if p.offer else None) == expected, (case, p.reason)
    assert reason_part in p.reason, (case, p.reason)


def test_the_offer_being_left_is_never_the_target() -> None:
    # Without a deadline the cheapest offer wins, and that is the one being left.
    j = replace(job_with(), offer_id="spot")
    p = place_job(j, [SPOT, ON_DEMAND], NOW, costs=COSTS, leaving=SPOT)
    assert p.offer is not None and p.offer.id == "od", p.reason


def test_uniform_progress_line_and_behind_it() -> None:
    assert uniform_progress_line(job_with(), NOW) is None
    j = job_with(deadline_in_h=10, created_h_ago=10)
    assert uniform_progress_line(j, NOW) == pytest.approx(0.5)


def test_plan_moves_ranks_once_and_decides_as_decide_move() -> None:
    offers = [CUR, *[offer_at(f"o{i}", 0.3 + i / 100) for i in range(50)]]
    jobs = [replace(job_with(), id=f"job-{i}") for i in range(5)]
    views = {"job-3": JobView(price_moves=10)}
    planned = plan_moves(jobs, offers, MovePolicy(), NOW, views=views, costs=COSTS)
    one_by_one = [decide_move(j, CUR, offers, MovePolicy(), NOW, view=views.get(j.id),
                              costs=COSTS) for j in jobs]
    assert planned == one_by_one
    assert [d.move for d in planned] == [True, True, True, False, True]
