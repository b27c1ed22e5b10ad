"""The demo of `make run`: a real training job that the scout moves.

The demo has a market of its own, beside the control plane's: the catalog's
p3.2xlarge and g4dn.xlarge offers under the provider "demo", replayed from
``market/data/demo_trace.csv`` in real time. At the start no g4dn.xlarge
spot capacity is available in any of its zones (capacity comes and goes, as
the availability traces in shared/traces show), so the job starts on the
best available offer, p3.2xlarge spot ($0.918/h, $0.918 per V100-hour of
work). 45 seconds in, g4dn.xlarge spot capacity returns in us-east-1b
($0.1578/h at half a V100's speed: $0.316 per work hour, 66% cheaper), and
the next scout pass (every 15 s for the demo's job) moves the job there,
live. Prices are the 2021 us-east-1 list and spot prices.

The demo leaves a user's jobs alone: its offers are for its own job only
(``Context.confine``), its job uses no other offer, and the market the
user's jobs see is the control plane's own. The demo's job is submitted
once per home: a later `gpuscout up --demo` finds it (running, or ended:
Ctrl-C cancels it) and submits no other; the demo's script goes on from
where it was, it does not start over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gpuscout.db import NotFound, Repository
from gpuscout.domain import Job, JobSpec, Offer, Resources, WorkloadType
from gpuscout.market.catalog import default_local_catalog
from gpuscout.market.feeds import PriceFeed, SyncedFeed, TraceFeed
from gpuscout.market.trace import TraceRow, read_trace

if TYPE_CHECKING:
    from gpuscout.service import Service

DEMO_TRACE = Path(__file__).parent / "market" / "data" / "demo_trace.csv"
DEMO_PROVIDER = "demo"  # the demo's offers: "demo:us-east-1b:g4dn.xlarge:spot"
DEMO_TYPES = ("p3.2xlarge", "g4dn.xlarge")
DEMO_SCOUT_INTERVAL_S = 15.0
DEMO_STEPS = 2400
DEMO_STEP_SLEEP_S = 0.1
# Where the demo's script started in this home (plane_memory kind, name).
_STARTED = ("demo_market", "started_at")


def demo_offers() -> list[Offer]:
    """The demo's own offers: the catalog's offers of ``DEMO_TYPES``, spot
    and on-demand in each zone, under the provider "demo"."""
    return [o.with_(id=Offer.make_id(DEMO_PROVIDER, o.zone, o.instance_type, o.capacity),
                    provider=DEMO_PROVIDER)
            for o in default_local_catalog() if o.instance_type in DEMO_TYPES]


def demo_rows(path: Path = DEMO_TRACE) -> list[TraceRow]:
    """The demo's script: the trace's rows, about the demo's offers."""
    return [dataclasses.replace(r, provider=DEMO_PROVIDER) for r in read_trace(path)]


class DemoFeed:
    """The control plane's own market (``inner``, untouched) and, beside
    it, the demo's offers changed by the demo's script (``rows``, at
    ``speed``x real time) from when the demo first started in this home: a
    restart finds the script where it is now, it does not replay it."""

    def __init__(self, inner: PriceFeed, rows: Sequence[TraceRow] | None = None,
                 speed: float = 1.0) -> None:
        self.inner = inner
        self.name = f"{inner.name} + demo"
        self.manual = inner.manual  # for the control plane's offers; never the demo's
        self.script = TraceFeed(demo_offers(), demo_rows() if rows is None else rows, speed,
                                name="demo")

    def start(self, repo: Repository, now: datetime) -> None:
        self.inner.start(repo, now)
        started = next((datetime.fromisoformat(m.value) for m in repo.recall(now, _STARTED[0])
                        if m.name == _STARTED[1] and m.value), None)
        if started is None:
            started = now
            repo.remember(*_STARTED, now, value=now.isoformat())
        self.script.start(repo, started)
        self.script.tick(repo, now)  # what came due while no control plane ran

    def tick(self, repo: Repository, now: datetime) -> int:
        return self.inner.tick(repo, now) + self.script.tick(repo, now)

    def synced_at(self) -> datetime | None:
        """The older of the two markets' syncs (``SyncedFeed``; a manual
        inner market is always current)."""
        times = [f.synced_at() for f in (self.inner, self.script) if isinstance(f, SyncedFeed)]
        if any(t is None for t in times):
            return None
        return min((t for t in times if t is not None), default=None)


def enable_demo(service: Service, *, rows: Sequence[TraceRow] | None = None,
                speed: float = 1.0) -> None:
    """Add the demo's market to a control plane not started yet; its offers
    are reserved for the demo's job from now on (after restarts too)."""
    service.ctx.reserve(DEMO_PROVIDER)
    service.plane.feed = DemoFeed(service.plane.feed, rows, speed)


def demo_jobs(service: Service) -> list[Job]:
    """The demo's jobs in this home, oldest first (one, once submitted)."""
    jobs = []
    for job_id in service.ctx.confined_jobs(DEMO_PROVIDER):
        try:
            jobs.append(service.repo.get_job(job_id))
        except NotFound:  # its submit failed after it was confined
            continue
    return sorted(jobs, key=lambda j: j.created_at)


def submit_demo(service: Service) -> tuple[Job, bool]:
    """The demo's job, and whether it was submitted now: once per home; a
    later start finds it, running or ended, and submits no other."""
    jobs = demo_jobs(service)
    if jobs:
        return jobs[-1], False
    return service.plane.submit(demo_job_spec(), confine_to=DEMO_PROVIDER), True


def cancel_demo(service: Service) -> list[Job]:
    """Cancel the demo's live jobs (none other); the jobs cancelled."""
    live = [j for j in demo_jobs(service) if not j.status.is_terminal()]
    return [service.plane.cancel(j.id) for j in live]


def demo_job_spec(steps: int = DEMO_STEPS, step_sleep_s: float = DEMO_STEP_SLEEP_S) -> JobSpec:
    return JobSpec(
        name="demo-linreg",
        model="linear-regression",
        dataset_size_gb=0.001,
        workload_type=WorkloadType.TRAINING,
        expected_duration_hours=steps * step_sleep_s / 3600,
        budget_usd=5.0,
        resources=Resources(gpus=1, cpus=1, memory_gb=1),
        # The demo's own scout interval: the control plane's stays as set.
        scout_interval_s=DEMO_SCOUT_INTERVAL_S,
        # Plain `python`: the job's PATH starts with the Python environment
        # GPU Scout runs in, on every instance.
        command=(
            f"python -m gpuscout.examples.linreg --steps {steps} "
            f"--step-sleep {step_sleep_s} --seed 7"
        ),
    )
