"""Which offers fit a job (``Resources``, ``Offer.shortfall``, ``fits_catalog``)
and what a unit of its work costs (``offers_for``: a job that asks for no GPU
is priced by the hour)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.cli.main import why_excluded
from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Progress, Resources
from gpuscout.domain.serde import spec_from_dict, spec_to_dict
from gpuscout.market.catalog import default_local_catalog
from gpuscout.policy import (
    JobView,
    MovePolicy,
    Offers,
    decide_move,
    eligible,
    fits_catalog,
    in_avoided_zone,
    offer_for,
    offers_for,
    place_job,
    plan_moves,
    pricing,
    why_ineligible,
)
from gpuscout.policy.eligibility import AVOIDED_ZONE
from gpuscout.sim import GpuScoutPolicy, SimJob, Simulator
from gpuscout.sim.baselines import OnDemandPolicy
from gpuscout.sim.jobs import JobsFileError, job_from_dict
from tests.unit.test_sim_helpers import EXACT, T0, at, market, row

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CPU = Resources(cpus=4, memory_gb=8)
GPU = Resources(gpus=1)


def scouting(resources: Resources, **spec: object) -> Job:
    return Job(id="j", spec=JobSpec(name="j", command="x", resources=resources, **spec),  # type: ignore[arg-type]
               status=JobStatus.SCOUTING, created_at=NOW)


def running(resources: Resources, offer_id: str) -> Job:
    return Job(id="j", spec=JobSpec(name="j", command="x", resources=resources,
                                    expected_duration_hours=10),
               status=JobStatus.RUNNING, created_at=NOW - timedelta(hours=1),
               offer_id=offer_id, instance_id="i-1", started_at=NOW - timedelta(hours=1),
               progress=Progress(step=1, total_steps=10))


def catalog_offer(offer_id: str) -> Offer:
    return next(o for o in default_local_catalog() if o.id == offer_id)


G4_SPOT = "local:us-east-1a:g4dn.xlarge:spot"
C5_SPOT = "local:us-east-1b:c5.xlarge:spot"  # 0.0686 $/h, the cheapest c5.xlarge zone


# --- Task 1: a job that asks for no GPU is priced by CPU work ($/h) -------------------


@pytest.mark.parametrize(
    ("resources", "expected", "per_work_hour"),
    [
        # A CPU job: c5.xlarge at 0.0686 $/h, not g4dn.xlarge at 0.1578 $/h.
        (CPU, C5_SPOT, 0.0686),
        (Resources(), C5_SPOT, 0.0686),
        (Resources(cpus=4, memory_gb=16), "local:us-east-1b:m5.xlarge:spot", 0.0739),
        # A GPU job is unchanged: the T4 at 0.1578 / speed 0.5 beats the V100 at 0.918.
        (GPU, G4_SPOT, 0.3156),
        (Resources(gpus=1, gpu_type="V100"), "local:us-east-1a:p3.2xlarge:spot", 0.918),
    ],
)
def test_place_job_prices_a_cpu_job_by_the_hour(resources: Resources, expected: str,
                                                per_work_hour: float) -> None:
    decision = place_job(scouting(resources), default_local_catalog(), NOW)
    assert decision.offer is not None and decision.offer.id == expected
    assert decision.offer.cost_per_work_hour == pytest.approx(per_work_hour)
    cheapest = offers_for(resources, default_local_catalog()).eligible(resources).cheapest()
    assert cheapest is not None and cheapest.id == expected


def test_a_cpu_job_with_a_deadline_goes_to_c5_too() -> None:
    job = scouting(CPU, expected_duration_hours=2, deadline=NOW + timedelta(hours=6))
    decision = place_job(job, default_local_catalog(), NOW)
    assert decision.offer is not None and decision.offer.id == C5_SPOT
    # Two hours of work at speed 1.0 (not 0.02: 100 hours) leave the slack.
    assert decision.deadline_slack_s == pytest.approx(4 * 3600 - 240, abs=1)


def test_offers_as_a_job_sees_them() -> None:
    offers = Offers(default_local_catalog()).ranked()
    assert offers_for(GPU, offers) is offers  # a GPU job: the snapshot as it is, still ranked
    seen = offers_for(CPU, offers)
    assert {o.relative_speed for o in seen} == {1.0}
    assert all(o.cost_per_work_hour == o.price_per_hour for o in seen)
    assert offers_for(CPU, seen) is seen  # nothing left to change: not copied again
    g4 = catalog_offer(G4_SPOT)
    assert offer_for(GPU, g4) is g4 and offer_for(CPU, g4).relative_speed == 1.0
    # A GPU type named without a count is a GPU job.
    assert offer_for(Resources(gpu_type="T4"), g4).relative_speed == 0.5
    assert pricing(GPU) == "GPU work (V100 = 1.0)"
    assert pricing(CPU) == "CPU work (no GPU asked; $/h)"


def test_decide_move_takes_a_cpu_job_off_a_gpu_instance() -> None:
    offers = default_local_catalog()
    d = decide_move(running(CPU, G4_SPOT), catalog_offer(G4_SPOT), offers, MovePolicy(), NOW)
    assert d.move and d.target is not None and d.target.id == C5_SPOT
    assert d.current_cost_per_work_hour == pytest.approx(0.1578)  # $/h, not / 0.5
    assert d.target_cost_per_work_hour == pytest.approx(0.0686)
    assert d.savings == pytest.approx(1 - 0.0686 / 0.1578)


def test_decide_move_leaves_a_gpu_job_where_it_is() -> None:
    offers = default_local_catalog()
    d = decide_move(running(GPU, G4_SPOT), catalog_offer(G4_SPOT), offers, MovePolicy(), NOW)
    assert not d.move
    assert d.current_cost_per_work_hour == pytest.approx(0.3156)


def test_plan_moves_ranks_for_cpu_and_gpu_jobs_in_one_pass() -> None:
    cpu = replace(running(CPU, G4_SPOT), id="cpu")
    gpu = replace(running(GPU, G4_SPOT), id="gpu")
    by_job = {d.job_id: d for d in plan_moves([cpu, gpu], default_local_catalog(),
                                              MovePolicy(), NOW)}
    assert by_job["cpu"].move and by_job["cpu"].target.id == C5_SPOT  # type: ignore[union-attr]
    assert not by_job["gpu"].move


def test_the_simulator_runs_a_cpu_job_at_speed_one_on_a_gpu_type() -> None:
    m = market(row(0, "us-east-1a", "on-demand", 1.0, itype="g4dn.xlarge"))  # GPU speed 0.5
    sim_job = SimJob(JobSpec(name="c", command="x", expected_duration_hours=2), T0)
    for policy in (OnDemandPolicy(), GpuScoutPolicy()):
        r = Simulator(m, EXACT).run_job(sim_job, policy)
        assert r.finished_at == at(180 + 2 * 3600)  # 2 h of work at 1.0, not 4 h at 0.5


# --- Task 2: constraints, one eligibility check ----------------------------------------


def offer(oid: str, *, gpus: int = 1, gpu_type: str | None = "V100", vcpus: float = 8,
          memory_gb: float = 61, capacity: Capacity = Capacity.SPOT,
          itype: str = "p3.2xlarge", region: str = "us-east-1", zone: str = "us-east-1a",
          available: bool = True) -> Offer:
    return Offer(id=oid, provider="aws", region=region, zone=zone, instance_type=itype,
                 capacity=capacity, gpus=gpus, gpu_type=gpu_type, vcpus=vcpus,
                 memory_gb=memory_gb, price_per_hour=1.0, available=available)


OFFERS = [
    offer("v100-spot"),
    offer("v100-od", capacity=Capacity.ON_DEMAND),
    offer("t4", gpu_type="T4", itype="g4dn.xlarge", vcpus=4, memory_gb=16, zone="us-east-1b"),
    offer("a100x8", gpus=8, gpu_type="A100", itype="p4d.24xlarge", vcpus=96, memory_gb=1152,
          region="us-west-2", zone="us-west-2a"),
    offer("c5", gpus=0, gpu_type=None, itype="c5.xlarge", vcpus=4, memory_gb=8),
]


@pytest.mark.parametrize(
    ("resources", "fitting"),
    [
        (Resources(), {"v100-spot", "v100-od", "t4", "a100x8", "c5"}),
        (Resources(gpus=1), {"v100-spot", "v100-od", "t4", "a100x8"}),
        (Resources(gpus=2), {"a100x8"}),
        (Resources(gpu_type="t4"), {"t4"}),
        (Resources(gpu_types=("a100", "T4")), {"t4", "a100x8"}),
        (Resources(gpu_types=("H100",)), set()),
        # Both given: both hold.
        (Resources(gpu_type="V100", gpu_types=("V100", "T4")), {"v100-spot", "v100-od"}),
        (Resources(gpu_type="V100", gpu_types=("T4",)), set()),
        (Resources(capacity=Capacity.SPOT), {"v100-spot", "t4", "a100x8", "c5"}),
        (Resources(capacity=Capacity.ON_DEMAND), {"v100-od"}),
        (Resources(capacity=None), {"v100-spot", "v100-od", "t4", "a100x8", "c5"}),
        (Resources(instance_type="G4DN.xlarge"), {"t4"}),
        (Resources(region="us-west-2"), {"a100x8"}),
        (Resources(zone="us-east-1b"), {"t4"}),
        (Resources(region="us-east-1", zone="us-west-2a"), set()),
        (Resources(gpus=1, cpus=8, memory_gb=32, capacity=Capacity.SPOT, region="us-east-1"),
         {"v100-spot"}),
    ],
)
def test_each_constraint_includes_and_excludes(resources: Resources, fitting: set[str]) -> None:
    assert {o.id for o in OFFERS if o.satisfies(resources)} == fitting
    # One check: shortfall is None exactly where satisfies holds, and the CLI says the same.
    for o in OFFERS:
        assert (o.shortfall(resources) is None) == (o.id in fitting)
        assert why_excluded(o, resources) == o.shortfall(resources)


@pytest.mark.parametrize(
    ("offer_id", "resources", "reason"),
    [
        ("c5", Resources(gpus=1), "0 GPUs, needs 1"),
        ("t4", Resources(gpu_type="V100"), "GPU T4, needs V100"),
        ("c5", Resources(gpu_types=("A100", "V100")), "GPU none, needs one of A100, V100"),
        ("t4", Resources(cpus=8), "4 vCPUs, needs 8"),
        ("c5", Resources(memory_gb=16), "8 GB memory, needs 16"),
        ("v100-spot", Resources(capacity=Capacity.ON_DEMAND), "spot, needs on-demand"),
        ("v100-od", Resources(capacity=Capacity.SPOT), "on-demand, needs spot"),
        ("t4", Resources(instance_type="p3.2xlarge"),
         "instance type g4dn.xlarge, needs p3.2xlarge"),
        ("a100x8", Resources(region="us-east-1"), "region us-west-2, needs us-east-1"),
        ("t4", Resources(zone="us-east-1a"), "zone us-east-1b, needs us-east-1a"),
        # The first unmet requirement, in order.
        ("c5", Resources(gpus=1, region="eu-west-1"), "0 GPUs, needs 1"),
    ],
)
def test_why_excluded_names_the_first_unmet_requirement(offer_id: str, resources: Resources,
                                                        reason: str) -> None:
    o = next(o for o in OFFERS if o.id == offer_id)
    assert o.shortfall(resources) == reason
    assert why_excluded(o, resources) == reason


def test_why_excluded_without_capacity() -> None:
    assert why_excluded(offer("x", available=False), Resources()) == "no capacity now"
    assert why_excluded(offer("x", available=False), Resources(gpus=2)) == "1 GPUs, needs 2"


@pytest.mark.parametrize(
    ("resources", "reason"),
    [
        (Resources(), None),
        (Resources(gpus=8, gpu_type="a100", region="us-west-2"), None),
        (Resources(gpus=1000), "no offer has 1000 GPUs (the most: 8 x A100 on p4d.24xlarge)"),
        (Resources(gpus=1, gpu_type="H100"),
         "no offer has GPU type H100 (types: A100, T4, V100)"),
        (Resources(gpu_types=("H100", "L4")),
         "no offer has GPU type H100 or L4 (types: A100, T4, V100)"),
        # Each requirement alone is met somewhere, not together: the closest miss.
        (Resources(gpus=8, gpu_type="T4"), "no offer with 8 GPUs has GPU type T4 (types: A100)"),
        (Resources(gpu_type="V100", cpus=16),
         "no offer with GPU type V100 has 16 vCPUs (the most: 8 on p3.2xlarge)"),
        (Resources(cpus=200), "no offer has 200 vCPUs (the most: 96 on p4d.24xlarge)"),
        (Resources(memory_gb=4096),
         "no offer has 4096 GB memory (the most: 1152 GB on p4d.24xlarge)"),
        (Resources(gpu_type="T4", capacity=Capacity.ON_DEMAND),
         "no offer with GPU type T4 is on-demand (capacities: spot)"),
        (Resources(instance_type="c5.9xlarge"),
         "no offer is a c5.9xlarge (types: c5.xlarge, g4dn.xlarge, p3.2xlarge, p4d.24xlarge)"),
        (Resources(region="eu-west-1"), "no offer is in region eu-west-1 "
                                        "(regions: us-east-1, us-west-2)"),
        (Resources(gpu_type="A100", zone="us-east-1a"),
         "no offer with GPU type A100 is in zone us-east-1a (zones: us-west-2a)"),
    ],
)
def test_fits_catalog_names_the_closest_miss(resources: Resources, reason: str | None) -> None:
    assert fits_catalog(resources, OFFERS) == reason


def test_fits_catalog_ignores_availability() -> None:
    gone = [replace(o, available=False) for o in OFFERS]
    assert fits_catalog(Resources(gpus=8), gone) is None
    assert fits_catalog(Resources(), []) == "the catalog has no offers"


def test_fits_catalog_over_the_local_catalog() -> None:
    catalog = default_local_catalog()
    assert fits_catalog(CPU, catalog) is None
    assert fits_catalog(Resources(gpus=1, gpu_type="H100"), catalog) == (
        "no offer has GPU type H100 (types: K80, M60, T4, V100)")


# --- Resources from JSON and YAML --------------------------------------------------------


def test_resources_take_lists_and_capacity_names() -> None:
    r = Resources(gpu_types=["A100", "V100"], capacity="on_demand")  # type: ignore[arg-type]
    assert r.gpu_types == ("A100", "V100") and r.capacity is Capacity.ON_DEMAND
    assert Resources(gpu_types="T4").gpu_types == ("T4",)  # type: ignore[arg-type]
    assert Resources(capacity="spot").capacity is Capacity.SPOT  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spott"):
        Resources(capacity="spott")  # type: ignore[arg-type]
    assert Resources(gpu_types=["T4"]) == Resources(gpu_types=("T4",))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "resources",
    [
        Resources(),
        Resources(gpus=2, gpu_type="A100", cpus=8, memory_gb=64),
        Resources(gpus=1, gpu_types=("A100", "H100"), capacity=Capacity.ON_DEMAND,
                  instance_type="p4d.24xlarge", region="us-east-1", zone="us-east-1a"),
        Resources(capacity=Capacity.SPOT),
    ],
)
def test_serde_round_trip_through_json(resources: Resources) -> None:
    spec = JobSpec(name="j", command="x", resources=resources)
    data = spec_to_dict(spec)
    assert data["resources"]["gpu_types"] == list(resources.gpu_types)
    assert data["resources"]["capacity"] == (resources.capacity.value if resources.capacity
                                             else None)
    back = spec_from_dict(json.loads(json.dumps(data)))
    assert back == spec and back.resources == resources
    assert isinstance(back.resources.gpu_types, tuple)


def test_the_simulator_reads_the_new_constraints() -> None:
    sim_job = job_from_dict({
        "name": "j", "submit_at": "2023-01-01T00:00:00Z", "expected_duration_hours": 1,
        "resources": {"gpus": 1, "gpu_types": ["V100", "T4"], "capacity": "spot",
                      "instance_type": "p3.2xlarge", "region": "us-east-1",
                      "zone": "us-east-1a"}})
    assert sim_job.spec.resources == Resources(
        gpus=1, gpu_types=("V100", "T4"), capacity=Capacity.SPOT, instance_type="p3.2xlarge",
        region="us-east-1", zone="us-east-1a")
    with pytest.raises(JobsFileError, match=r"resources\.capacity: .*spott"):
        job_from_dict({"name": "j", "submit_at": "2023-01-01T00:00:00Z",
                       "expected_duration_hours": 1, "resources": {"capacity": "spott"}})


# --- One eligibility filter: placement, moves, the baselines and `gpuscout plan` -------

AVOID_A = frozenset({"aws:us-east-1a"})


@pytest.mark.parametrize(
    ("case", "the_offer", "resources", "avoid", "avoided", "reason"),
    [
        ("fits, available, no zone avoided", offer("x"), GPU, frozenset(), False, None),
        ("fits, available, another zone avoided", offer("x"), GPU,
         frozenset({"aws:us-east-1b"}), False, None),
        ("spot in an avoided zone", offer("x"), GPU, AVOID_A, True, AVOIDED_ZONE),
        ("on-demand in an avoided zone is not avoided",
         offer("x", capacity=Capacity.ON_DEMAND), GPU, AVOID_A, False, None),
        ("the same zone at another provider", offer("x"), GPU,
         frozenset({"local:us-east-1a"}), False, None),
        ("unavailable", offer("x", available=False), GPU, frozenset(), False,
         "no capacity now"),
        ("unavailable, and in an avoided zone: unavailable is said first",
         offer("x", available=False), GPU, AVOID_A, True, "no capacity now"),
        ("a shortfall is said before anything else", offer("x", available=False),
         Resources(gpus=2), AVOID_A, True, "1 GPUs, needs 2"),
        ("a job asking for no GPU on a GPU offer", offer("x"), CPU, frozenset(), False, None),
    ],
)
def test_the_one_eligibility_filter(case: str, the_offer: Offer, resources: Resources,
                                    avoid: frozenset[str], avoided: bool,
                                    reason: str | None) -> None:
    assert AVOIDED_ZONE == "spot in a zone avoided after an interruption notice"
    assert why_ineligible(the_offer, resources, avoid) == reason, case
    assert eligible(the_offer, resources, avoid) is (reason is None), case
    assert in_avoided_zone(the_offer, avoid) is avoided, case
    assert [o.id for o in Offers([the_offer]).eligible(resources, avoid)] == (
        [] if reason else ["x"]), case
    # `gpuscout plan` (a new job avoids no zone) says what the filter says.
    assert why_excluded(the_offer, resources) == why_ineligible(the_offer, resources), case


def test_placement_moves_and_the_baselines_leave_out_the_same_offers() -> None:
    # The cheapest spot is in the avoided zone: every user of the filter skips it.
    market_ = [offer("spot-a"), offer("spot-b", zone="us-east-1b"),
               offer("od-a", capacity=Capacity.ON_DEMAND)]
    cheap = {"spot-a": 0.3, "spot-b": 0.5, "od-a": 2.0}
    market_ = [o.with_(price_per_hour=cheap[o.id]) for o in market_]
    view = JobView(avoid_zones=AVOID_A)
    placed = place_job(scouting(GPU), market_, NOW, view=view)
    assert placed.offer is not None and placed.offer.id == "spot-b"
    moved = decide_move(running(GPU, "od-a"), market_[2], market_, MovePolicy(), NOW,
                        view=view)
    assert moved.move and moved.target is not None and moved.target.id == "spot-b"
    assert [o.id for o in Offers(market_).ranked().eligible(GPU, AVOID_A)] == ["spot-b", "od-a"]
