"""Simulator and scout speed (issue 3).

1. A simulated week of 10,000 jobs on the p3.2xlarge 9-zone availability
   trace (2021 spot price 0.918, on-demand 3.06) under GPU Scout's policy:
   wall time and speedup over real time (target: under 60 s).
2. One scout pass (``plan_moves``) over 1,000 running jobs and 10,000
   offers (target: under 1 s).

    .venv/bin/python bench/sim_speed.py [--jobs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime, timedelta

from gpuscout.domain import Capacity, Job, JobSpec, JobStatus, Offer, Progress, Resources
from gpuscout.market.combined import combined_market
from gpuscout.market.loaders import load_availability_dir, traces_dir
from gpuscout.policy import MovePolicy, plan_moves
from gpuscout.sim import GpuScoutPolicy, SimConfig, SimJob, SimMarket, Simulator

WEEK_S = 7 * 24 * 3600.0


def nine_zone_market() -> SimMarket:
    series = load_availability_dir(traces_dir() / "availability/1-node/aws-02-15-2023")
    rows = combined_market(availability=series, spot_price={"p3.2xlarge": 0.918},
                           ondemand={(s.region, "p3.2xlarge"): 3.06 for s in series})
    return SimMarket(rows)


def week_of_jobs(n: int, start: datetime, seed: int = 1) -> list[SimJob]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        submit = start + timedelta(seconds=rng.uniform(0, WEEK_S * 0.7))
        hours = rng.choice([1, 2, 4, 8, 12, 24])
        deadline = (submit + timedelta(hours=hours * (1 + rng.uniform(0.1, 0.5)) + 0.25)
                    if rng.random() < 0.5 else None)
        jobs.append(SimJob(JobSpec(name=f"job-{i}", command="sim", expected_duration_hours=hours,
                                   deadline=deadline, resources=Resources(gpus=1)), submit))
    return jobs


def bench_week(n_jobs: int, heartbeat_s: float = 1800.0) -> dict[str, float]:
    market = nine_zone_market()
    start = datetime.fromtimestamp(market.start, UTC) + timedelta(days=3)
    jobs = week_of_jobs(n_jobs, start)
    config = SimConfig()
    sim = Simulator(market, config, seed=0)
    t0 = time.perf_counter()
    result = sim.run(jobs, GpuScoutPolicy.for_config(config, heartbeat_s=heartbeat_s))
    wall = time.perf_counter() - t0
    last = max((j.finished_at for j in result.jobs if j.finished_at), default=start)
    simulated_s = (last - start).total_seconds()
    return {"jobs": n_jobs, "wall_s": wall, "simulated_s": simulated_s,
            "speedup": simulated_s / wall, "job_hours_per_s": sum(
                j.spec.expected_duration_hours for j in jobs) / wall,
            "migrations": result.migrations, "deadline_misses": result.deadline_misses}


def bench_scout_pass(n_jobs: int = 1000, n_offers: int = 10_000) -> dict[str, float]:
    rng = random.Random(2)
    offers = []
    for i in range(n_offers):
        cap = Capacity.SPOT if i % 2 else Capacity.ON_DEMAND
        gpus = rng.choice([0, 1, 1, 4, 8])
        offers.append(Offer(
            id=Offer.make_id("aws", f"zone-{i % 50}", f"type-{i // 2}", cap), provider="aws",
            region=f"region-{i % 10}", zone=f"zone-{i % 50}", instance_type=f"type-{i // 2}",
            capacity=cap, gpus=gpus, gpu_type="V100" if gpus else None, vcpus=8,
            memory_gb=64, price_per_hour=rng.uniform(0.2, 4.0), available=rng.random() < 0.8,
            relative_speed=rng.choice([0.25, 0.5, 1.0, 2.0])))
    now = datetime(2023, 2, 20, tzinfo=UTC)
    gpu_offers = [o for o in offers if o.gpus >= 1]
    jobs = []
    for i in range(n_jobs):
        on = rng.choice(gpu_offers)
        jobs.append(Job(
            id=f"job-{i}", status=JobStatus.RUNNING, created_at=now - timedelta(hours=2),
            spec=JobSpec(name=f"job-{i}", command="x", expected_duration_hours=10,
                         budget_usd=100.0 if i % 3 == 0 else None,
                         deadline=now + timedelta(hours=20) if i % 2 == 0 else None,
                         resources=Resources(gpus=1)),
            offer_id=on.id, progress=Progress(step=200, total_steps=1000),
            started_at=now - timedelta(hours=2)))
    t0 = time.perf_counter()
    decisions = plan_moves(jobs, offers, MovePolicy(), now)
    wall = time.perf_counter() - t0
    return {"jobs": n_jobs, "offers": n_offers, "wall_s": wall,
            "moves": sum(d.move for d in decisions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--exact", action="store_true",
                        help="ask the policy at every 2-minute tick, not only when the "
                             "market changes (and every 30 min)")
    args = parser.parse_args()
    week = bench_week(args.jobs, 120.0 if args.exact else 1800.0)
    scout = bench_scout_pass()
    print(f"simulated week: {week['jobs']} jobs in {week['wall_s']:.1f}s "
          f"(target < 60 s); {week['simulated_s'] / 86400:.1f} simulated days, "
          f"{week['speedup']:,.0f}x real time; {week['job_hours_per_s']:,.0f} job-hours/s "
          f"({week['job_hours_per_s'] * 3600:,.0f}x real time per job); "
          f"{week['migrations']} migrations, {week['deadline_misses']} deadline misses")
    print(f"scout pass: {scout['jobs']} running jobs x {scout['offers']} offers in "
          f"{scout['wall_s'] * 1000:.0f} ms (target < 1 s); {scout['moves']} moves")
    if args.json:
        print(json.dumps({"week": week, "scout_pass": scout}))


if __name__ == "__main__":
    main()
