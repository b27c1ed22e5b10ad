"""Tiny hand-made markets for the simulator tests (helpers, no tests here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gpuscout.domain import Capacity, JobSpec, Resources
from gpuscout.market.trace import TraceRow
from gpuscout.sim import SimConfig, SimJob, SimMarket

T0 = datetime(2023, 1, 1, tzinfo=UTC)
EXACT = SimConfig(boot_jitter=0.0)  # boot 180 s, checkpoint 30 s, restore 60 s, notice 120 s


def row(at_s: float, zone: str, capacity: str, price: float, available: bool = True,
        itype: str = "p3.2xlarge") -> TraceRow:
    return TraceRow(T0 + timedelta(seconds=at_s), "aws", "us-east-1", zone, itype,
                    Capacity(capacity), price, available)


def market(*rows: TraceRow) -> SimMarket:
    return SimMarket(list(rows))


def job(name: str = "j", hours: float = 2.0, *, submit_s: float = 0.0,
        deadline_s: float | None = None, budget: float | None = None) -> SimJob:
    deadline = T0 + timedelta(seconds=deadline_s) if deadline_s is not None else None
    spec = JobSpec(name=name, command="sim", expected_duration_hours=hours, deadline=deadline,
                   budget_usd=budget, resources=Resources(gpus=1))
    return SimJob(spec, T0 + timedelta(seconds=submit_s))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)
