"""Should a running job move, where, and why. Pure.

A job moves when the best available compatible offer is at least
``threshold`` cheaper per unit of work than the offer it runs on. The
decision is returned whether or not it moves, with its reason and numbers,
so that every pass of the scout can be explained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuscout.domain import Job, JobStatus, Offer
from gpuscout.policy.placement import Offers

# Prices are decimals in binary floats: 1 - 0.8/1.0 is 0.19999999999999996.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class MovePolicy:
    savings_threshold: float = 0.20
    # A job that just moved stays put this long (no ping-pong).
    min_dwell_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MoveDecision:
    job_id: str
    move: bool
    reason: str
    current_offer_id: str | None
    target: Offer | None = None
    current_cost_per_work_hour: float | None = None
    target_cost_per_work_hour: float | None = None
    savings: float = 0.0  # fraction of the current cost per work hour


def decide_move(
    job: Job, current: Offer | None, offers: Iterable[Offer], policy: MovePolicy, now: datetime
) -> MoveDecision:
    """Decide for one job. ``current`` is the offer the job runs on."""
    threshold = (
        job.spec.savings_threshold
        if job.spec.savings_threshold is not None
        else policy.savings_threshold
    )

    def stay(reason: str, **numbers: object) -> MoveDecision:
        return MoveDecision(job_id=job.id, move=False, reason=reason,
                            current_offer_id=current.id if current else None, **numbers)  # type: ignore[arg-type]

    if job.status != JobStatus.RUNNING:
        return stay(f"job is {job.status.value}, only running jobs move")
    if current is None:
        return stay("the job's current offer is unknown")
    if job.last_migration_at is not None and policy.min_dwell_s > 0:
        dwell = (now - job.last_migration_at).total_seconds()
        if dwell < policy.min_dwell_s:
            return stay(f"moved {dwell:.0f}s ago, minimum dwell is {policy.min_dwell_s:.0f}s")

    best = (
        Offers(offers).available().compatible(job.spec.resources).excluding({current.id}).cheapest()
    )
    current_cost = current.cost_per_work_hour
    if best is None:
        return stay("no other available compatible offer", current_cost_per_work_hour=current_cost)
    savings = 1.0 - best.cost_per_work_hour / current_cost if current_cost > 0 else 0.0
    numbers = {
        "current_cost_per_work_hour": current_cost,
        "target_cost_per_work_hour": best.cost_per_work_hour,
        "savings": savings,
    }
    if savings < threshold - _EPS:
        return MoveDecision(
            job_id=job.id, move=False, current_offer_id=current.id, target=best,
            reason=(
                f"best offer {best.id} saves {savings:.1%} per work hour, "
                f"below the {threshold:.0%} threshold"
            ),
            **numbers,  # type: ignore[arg-type]
        )
    return MoveDecision(
        job_id=job.id, move=True, current_offer_id=current.id, target=best,
        reason=(
            f"{best.id} at ${best.cost_per_work_hour:.4f} per work hour is {savings:.1%} "
            f"cheaper than {current.id} at ${current_cost:.4f} (threshold {threshold:.0%})"
        ),
        **numbers,  # type: ignore[arg-type]
    )


def plan_moves(
    jobs: Iterable[Job], offers: Iterable[Offer], policy: MovePolicy, now: datetime
) -> list[MoveDecision]:
    """One scout pass: a decision for every running job."""
    snapshot = tuple(offers)
    by_id = {o.id: o for o in snapshot}
    return [
        decide_move(job, by_id.get(job.offer_id or ""), snapshot, policy, now)
        for job in jobs
        if job.status == JobStatus.RUNNING
    ]
