"""Table tests of the pure placement and move policy."""

from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Resources
from gpuscout.policy import MovePolicy, choose_offer, decide_move, plan_moves

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
def test_choose_offer(offers: list[Offer], resources: Resources, expected: str | None) -> None:
    placement = choose_offer(resources, offers)
    assert (placement.offer.id if placement else None) == expected


def test_choose_offer_excludes() -> None:
    placement = choose_offer(Resources(gpus=1), [offer("a", 0.1), offer("b", 1.0)],
                             exclude={"a"})
    assert placement is not None and placement.offer.id == "b"


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


def test_plan_moves_covers_running_jobs_only() -> None:
    current = offer("cur", 1.0)
    jobs = [job(), job(status=JobStatus.PENDING)]
    decisions = plan_moves(jobs, [current, offer("x", 0.5)], POLICY, NOW)
    assert [d.move for d in decisions] == [True]
