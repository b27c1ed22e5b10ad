"""Where a job that has no instance goes (first placement, recovery). Pure.

Without a deadline: the cheapest eligible offer (``eligible``: compatible,
available, not spot in an avoided zone) per unit of work. With a
deadline, Can't Be Late's Uniform Progress:

- spot is taken when one is available and the slack left after it leaves
  room for one preemption (``spot_reserve_s``: a preemption there would
  still make it); of spot offers at the same cost, the one whose capacity
  has been steadier lately (``Offer.interruptions_per_day``);
- otherwise on-demand is taken if progress is behind the uniform line
  (work done / total work < time since submission / (deadline - submission),
  by more than one restart's worth of work) or the slack would fall below
  margin (``margin_s``) after one more scout interval of waiting;
- otherwise the job waits for spot (it is ahead of the line), and the
  decision says so.

On a preemption notice the caller passes the offer the job is ``leaving``:
it is not a target, but it is spot the job fits, so a job ahead of the line
takes its emergency checkpoint and waits for spot (in a single-zone market
there is no other spot to go to) instead of going to on-demand because
"no spot offer fits".

A budget is respected where it can be: among the offers that keep the
deadline, one whose projected cost fits the budget left is preferred. A
deadline that no offer can keep gets the offer that finishes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuscout.domain import Capacity, Job, Offer
from gpuscout.policy.eligibility import AVOIDED_ZONE, in_avoided_zone
from gpuscout.policy.migration import (
    JobView,
    MoveCosts,
    MovePolicy,
    behind_uniform_progress,
    budget_left,
    deadline_slack_s,
    remaining_work_hours,
    spot_reserve_s,
    uniform_progress_line,
    wait_reserve_s,
)
from gpuscout.policy.placement import offers_for


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    offer: Offer | None  # None: wait (nothing fits, or waiting for spot)
    reason: str
    remaining_work_hours: float = 0.0
    projected_cost_usd: float | None = None  # the remaining work on ``offer``
    budget_left_usd: float | None = None
    deadline_slack_s: float | None = None  # on ``offer``, after its restart
    progress: float | None = None  # fraction of the work done
    uniform_line: float | None = None  # the fraction Uniform Progress asks for now


def why_none(compatible: list[Offer], avoid_zones: frozenset[str] | set[str],
             gone: str | None) -> str:
    """Why no offer can take the job now, from the offers that fit its
    resources (available or not): none fits at all, or those that fit are
    unavailable (the market, or a launch that failed: a quota or capacity
    error is named in the job's events), or spot in zones being avoided
    after a notice."""
    if not compatible:
        return "no offer fits the job's resources"
    unavailable = sum(1 for o in compatible if not o.available)
    avoided = sum(1 for o in compatible if o.available and in_avoided_zone(o, avoid_zones))
    parts = []
    if unavailable:
        parts.append(f"{unavailable} unavailable now (the market, or a launch that failed: "
                     "see the job's events)")
    if avoided:
        parts.append(f"{avoided} {AVOIDED_ZONE}")
    if gone is not None and any(o.id == gone for o in compatible):
        parts.append("1 being reclaimed")
    return (f"every offer that fits the job's resources ({len(compatible)}) is out for now: "
            + "; ".join(parts))


def place_job(
    job: Job, offers: Iterable[Offer], now: datetime, *, policy: MovePolicy | None = None,
    view: JobView | None = None, costs: MoveCosts | None = None, leaving: Offer | None = None,
) -> PlacementDecision:
    """Where ``job`` goes now, or whether it waits. ``leaving``: the offer a
    preemption notice is taking away (never a target; spot there shows that
    spot fits the job, so Uniform Progress may wait for it)."""
    policy = policy or MovePolicy()
    view = view or JobView()
    costs = costs or MoveCosts()
    work = remaining_work_hours(job, now, view)
    left = budget_left(job)
    total = job.spec.expected_duration_hours
    progress = 1.0 - work / total if total > 0 else 1.0
    line = uniform_progress_line(job, now)
    gone = leaving.id if leaving is not None else None
    # Offers as this job sees them: a CPU-only job is priced by the hour.
    compatible = offers_for(job.spec.resources, offers).compatible(job.spec.resources).ranked()
    candidates = [o for o in compatible.eligible(job.spec.resources, view.avoid_zones)
                  if o.id != gone]

    def projected(o: Offer) -> float:
        return (costs.restart_s / 3600.0 * o.price_per_hour) + work * o.cost_per_work_hour

    def slack(o: Offer) -> float | None:
        return deadline_slack_s(job, now, work, o.relative_speed, costs.restart_s)

    def decide(o: Offer | None, reason: str) -> PlacementDecision:
        return PlacementDecision(
            offer=o, reason=reason, remaining_work_hours=work,
            projected_cost_usd=projected(o) if o else None, budget_left_usd=left,
            deadline_slack_s=slack(o) if o else None, progress=progress, uniform_line=line)

    def fits_budget(o: Offer) -> bool:
        return left is None or projected(o) <= left

    if not candidates:
        return decide(None, why_none(list(compatible), view.avoid_zones, gone))

    if job.spec.deadline is None:
        in_budget = [o for o in candidates if fits_budget(o)]
        pick = (in_budget or candidates)[0]
        note = "" if in_budget or left is None else (
            f"; projected ${projected(pick):.2f} exceeds the ${left:.2f} budget left")
        return decide(pick, f"cheapest available compatible offer: {pick.id} at "
                            f"${pick.price_per_hour:.4f}/h (${pick.cost_per_work_hour:.4f} "
                            f"per work hour){note}")

    guard = spot_reserve_s(policy, costs)
    spot_ok = [o for o in candidates if o.capacity == Capacity.SPOT
               and (slack(o) or 0.0) >= guard]
    od_ok = [o for o in candidates if o.capacity == Capacity.ON_DEMAND
             and (slack(o) or 0.0) >= 0.0]
    if spot_ok:
        pick = next((o for o in spot_ok if fits_budget(o)), spot_ok[0])
        return decide(pick, f"spot with room for a preemption before the deadline: {pick.id} "
                            f"at ${pick.cost_per_work_hour:.4f} per work hour")
    cheapest_od = next((o for o in od_ok if fits_budget(o)), od_ok[0] if od_ok else None)
    behind = behind_uniform_progress(job, now, work, costs)
    tight = (cheapest_od is not None
             and (slack(cheapest_od) or 0.0) < wait_reserve_s(policy, costs))
    spot_now = any(o.capacity == Capacity.SPOT for o in candidates)
    spot_exists = any(o.capacity == Capacity.SPOT for o in compatible) or (
        leaving is not None and leaving.capacity == Capacity.SPOT
        and leaving.satisfies(job.spec.resources))
    if cheapest_od is not None and (behind or tight or spot_now or not spot_exists):
        why = ("behind the uniform-progress line" if behind else
               "deadline slack is down to the margin" if tight else
               "spot is too slow for the deadline" if spot_now else "no spot offer fits")
        return decide(cheapest_od, f"on-demand {cheapest_od.id}: {why} "
                                   f"(done {progress:.1%}, line {line or 0:.1%})")
    if cheapest_od is not None:
        return decide(None, f"waiting for spot: done {progress:.1%} is ahead of the "
                            f"uniform-progress line {line or 0:.1%}")
    # Nothing keeps the deadline: finish as early as possible.
    fastest = min(candidates, key=lambda o: (-o.relative_speed, o.capacity == Capacity.SPOT,
                                             o.cost_per_work_hour, o.id))
    return decide(fastest, f"no offer keeps the deadline; {fastest.id} finishes first")
