"""The offline optimum: the cheapest way to run one job with full knowledge
of the trace, by dynamic programming over a discretized timeline.

The timeline is cut into steps of ``step_s`` (the scout interval, 2
minutes); in each step the job is idle or on one offer that has capacity
for the step (an instance runs through its 2-minute notice, so capacity
that ends within ``notice_s`` of the step's end still counts). State: (step,
offer or idle, work done in units of 30 s of work). A step on offer o costs
the trace's price for that step and does ``speed_o x step`` of work.
Arriving on an offer costs what the simulator bills: a launch bills the
whole step and trains after the boot (and the restore, when there is work
to restore); a make-before-break move keeps training on the old offer while
the replacement boots, then bills both for checkpoint + restore. Offers
with the same speed, prices and capacity over time are one choice.

Known approximations (each within a step per move; the bench checks that
no policy that meets its deadline beats the bound): arrivals and stops sit
on the step grid; a job finishing during an arrival step is billed to the
end of it.

With a deadline, the answer is the cheapest finish by the deadline (or, if
none is possible, the earliest finish); without one, the cheapest finish
within ``horizon``.
"""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np

from gpuscout.domain import Offer
from gpuscout.policy import offer_for
from gpuscout.sim.engine import JobResult, SimConfig, to_datetime
from gpuscout.sim.jobs import SimJob
from gpuscout.sim.market import SimMarket

# Work units per job, at most (more when a step of the slowest offer's work
# is already finer).
_MAX_UNITS = 6000
_UNIT_S = 30.0


def _distinct(offers: list[Offer], market: SimMarket, start: float,
              end: float) -> list[Offer]:
    """One offer per class of offers that are interchangeable for the bound
    between ``start`` and ``end`` (same speed, same price and capacity over
    that time): on-demand in nine zones is one choice, not nine."""
    seen: dict[tuple[object, ...], Offer] = {}
    for o in sorted(offers, key=lambda o: o.id):
        s = market.series[o.id]
        lo, hi = bisect_right(s.times, start), bisect_right(s.times, end)
        changes = tuple((s.times[i], s.prices[i], s.available[i]) for i in range(lo, hi))
        key = (o.relative_speed, market.price(o.id, start), market.available(o.id, start),
               changes)
        seen.setdefault(key, o)
    return list(seen.values())


def _undominated(offers: list[Offer], market: SimMarket, start: float,
                 end: float) -> list[Offer]:
    """Leave out an offer with a steady price and capacity over the window
    when another steady, always available one is at least as fast and no
    dearer per unit of work: any schedule on the first does better on the
    second (same work, sooner, for less)."""
    def steady(o: Offer) -> bool:
        s = market.series[o.id]
        return (bisect_right(s.times, end) == bisect_right(s.times, start)
                and market.available(o.id, start))

    fixed = [o.with_(price_per_hour=market.price(o.id, start)) for o in offers if steady(o)]
    keep = []
    for o in offers:
        if steady(o):
            mine = market.price(o.id, start) / o.relative_speed
            if any(b.id != o.id and b.relative_speed >= o.relative_speed
                   and (b.cost_per_work_hour, -b.relative_speed, b.id)
                   < (mine, -o.relative_speed, o.id) for b in fixed):
                continue
        keep.append(o)
    return keep


class OptimalPolicy:
    """Not a scout: ``solve`` a job offline."""

    name = "optimal"

    def __init__(self, config: SimConfig | None = None, step_s: float = 120.0,
                 horizon_factor: float = 2.0) -> None:
        self.config = config or SimConfig()
        self.step_s = step_s
        self.horizon_factor = horizon_factor

    def solve(self, job: SimJob, market: SimMarket) -> JobResult:
        cfg, dt = self.config, self.step_s
        submit = job.submit_at.timestamp()
        deadline = job.spec.deadline.timestamp() if job.spec.deadline else None
        offers = [offer_for(job.spec.resources, o) for o in market.templates.values()
                  if o.satisfies(job.spec.resources)]
        if not offers:
            return JobResult(job.name, 0.0, 0, None, True, False)
        total = job.spec.expected_duration_hours
        fastest_h = total / max(o.relative_speed for o in offers)
        horizon = fastest_h * 3600.0 * self.horizon_factor + 12 * 3600.0
        if deadline is not None:
            horizon = max(horizon, deadline - submit)
        horizon = min(horizon, cfg.max_hours * 3600.0)
        n_steps = max(1, math.ceil(horizon / dt))
        offers = _undominated(_distinct(offers, market, submit, submit + n_steps * dt), market,
                              submit, submit + n_steps * dt)
        speeds = np.array([o.relative_speed for o in offers])
        base = float(speeds.min())
        # A unit is 1/m of a step's work at the slowest speed (m steps of
        # about _UNIT_S each), so a move's downtime is counted to within a
        # unit, and every offer's work per step is a whole number of units
        # when speeds are multiples of the slowest (V100 1, T4 0.5, K80 0.25).
        step_units = total / (base * dt / 3600.0)  # steps of work at the slowest speed
        m = int(max(1, min(round(dt / _UNIT_S), _MAX_UNITS // max(1.0, step_units))))
        unit_h = base * dt / 3600.0 / m
        n_units = math.ceil(total / unit_h - 1e-9)
        per_step = np.maximum(1, np.rint(speeds / base * m)).astype(int)
        k_deadline = (math.floor((deadline - submit) / dt + 1e-9) if deadline is not None
                      else n_steps)

        n = len(offers)
        idle = n
        inf = math.inf
        cost = np.full((n + 1, n_units), inf)
        moves = np.zeros((n + 1, n_units))
        cost[idle, 0] = 0.0
        best: tuple[float, float, float | None] = (inf, 0.0, None)
        # The shortest boot the simulator can draw: the bound must not be beaten by luck.
        boot_s = cfg.boot_s * (1.0 - cfg.boot_jitter)
        down_s = cfg.checkpoint_s + cfg.restore_s
        ids = [o.id for o in offers]
        notice = cfg.notice_s
        w_index = np.arange(n_units)
        nonzero = w_index > 0

        def push(dst: np.ndarray, dst_m: np.ndarray, src: np.ndarray, src_m: np.ndarray,
                 u: int, t0: float, used: float) -> None:
            """States ``src`` advanced by ``u`` units into ``dst``; those that
            finish record a candidate (billed for the whole step: ``used``
            is the cost of it, already in ``src``)."""
            nonlocal best
            if u < n_units:
                seg, tgt = src[: n_units - u], dst[u:]
                better = seg < tgt
                dst[u:] = np.where(better, seg, tgt)
                dst_m[u:] = np.where(better, src_m[: n_units - u], dst_m[u:])
            lo = max(0, n_units - u)
            tail = src[lo:]
            if u > 0 and np.isfinite(tail).any():
                i = int(np.argmin(tail))
                frac = min(1.0, max(0.0, (total / unit_h - (lo + i)) / u))
                done = float(tail[i]) - used * (1.0 - frac)
                if done < best[0]:
                    best = (done, float(src_m[lo + i]), t0 + dt * frac)

        for k in range(n_steps):
            t0 = submit + k * dt
            t1 = t0 + dt
            # An instance runs through its 2-minute notice: capacity that
            # ends within notice_s of the step's end still serves the step.
            avail = [market.available(i, t0) and market.next_unavailable(i, t0) + notice >= t1
                     for i in ids]
            step_cost = [market.cost(i, t0, t1) for i in ids]
            price_now = np.array([market.price(i, t0) for i in ids])
            new = np.full_like(cost, inf)
            new_moves = np.zeros_like(moves)
            # Stop (checkpoint, terminate) at the step boundary, or stay idle.
            running_best = cost[:n].min(axis=0)
            arg = cost[:n].argmin(axis=0)
            stop_better = running_best < cost[idle]
            idle_cost = np.where(stop_better, running_best, cost[idle])
            idle_moves = np.where(stop_better, moves[arg, w_index], moves[idle])
            new[idle], new_moves[idle] = idle_cost, idle_moves
            # Leaving a running offer (make-before-break): it trains while the
            # replacement boots, then both are billed for checkpoint + restore.
            leave = cost[:n] + price_now[:, None] * (boot_s + down_s) / 3600.0
            leave_best = leave.min(axis=0)
            leave_moves = moves[leave.argmin(axis=0), w_index] + 1
            for j in range(n):
                if not avail[j]:
                    continue
                u = int(per_step[j])
                c = step_cost[j]
                # Run a step on j.
                push(new[j], new_moves[j], cost[j] + c, moves[j], u, t0, c)
                # Arrive from idle: boot (and restore if there is work to restore).
                fresh = np.full(n_units, inf)
                fresh[0] = idle_cost[0] + c
                push(new[j], new_moves[j], fresh, idle_moves, int(u * max(0.0, dt - boot_s) / dt),
                     t0, 0.0)
                again = np.where(nonzero, idle_cost + c, inf)
                push(new[j], new_moves[j], again, idle_moves + nonzero,
                     int(u * max(0.0, dt - boot_s - cfg.restore_s) / dt), t0, 0.0)
                # Arrive from another running offer.
                push(new[j], new_moves[j], leave_best + c, leave_moves,
                     int(u * max(0.0, dt - down_s) / dt), t0, 0.0)
            cost, moves = new, new_moves
            if k + 1 >= k_deadline and best[2] is not None:
                break
        total_cost, n_moves, finish = best
        if finish is None:
            return JobResult(job.name, 0.0, 0, None, True, False)
        missed = deadline is not None and finish > deadline + 1e-6
        budget = job.spec.budget_usd
        return JobResult(job.name, total_cost, int(n_moves), to_datetime(finish), missed,
                         budget is not None and total_cost > budget + 1e-9)
