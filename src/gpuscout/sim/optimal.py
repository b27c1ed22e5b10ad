"""The offline optimum: the cheapest way to run one job with full knowledge
of the trace, by dynamic programming over a discretized timeline.

The timeline is cut into steps of ``step_s``; in each step the job is idle
or on one offer that has capacity for the whole step (knowing the future,
it is never preempted). State: (step, offer or idle, work done in units).
A step on offer o costs the trace's price for that step and does
``speed_o x step`` of work. Arriving on an offer (launch, restart, move)
costs the same dollars the simulator bills for it (boot on the new
instance; checkpoint and restore on both for a move from a running one)
and one step without progress. That step is at least as long as a restart
(``step_s >= boot + restore``), so the bound is exact in dollars and
pessimistic in time by at most one step per move; ``step_s`` of 5 minutes
against a 4-minute restart keeps that small.

With a deadline, the answer is the cheapest finish by the deadline (or, if
none is possible, the earliest finish); without one, the cheapest finish
within ``horizon``.
"""

from __future__ import annotations

import math

import numpy as np

from gpuscout.sim.engine import JobResult, SimConfig, to_datetime
from gpuscout.sim.jobs import SimJob
from gpuscout.sim.market import SimMarket

# Work units are refined so that every offer's work per step is a whole
# number of units; above this many units per job they are coarsened.
_MAX_UNITS = 4000


class OptimalPolicy:
    """Not a scout: ``solve`` a job offline."""

    name = "optimal"

    def __init__(self, config: SimConfig | None = None, step_s: float = 300.0,
                 horizon_factor: float = 2.0) -> None:
        self.config = config or SimConfig()
        self.step_s = step_s
        self.horizon_factor = horizon_factor

    def solve(self, job: SimJob, market: SimMarket) -> JobResult:
        cfg, dt = self.config, self.step_s
        submit = job.submit_at.timestamp()
        deadline = job.spec.deadline.timestamp() if job.spec.deadline else None
        offers = [o for o in market.templates.values() if o.satisfies(job.spec.resources)]
        if not offers:
            return JobResult(job.name, 0.0, 0, None, True, False)
        total = job.spec.expected_duration_hours
        speeds = np.array([o.relative_speed for o in offers])
        base = float(speeds.min())
        unit_h = base * dt / 3600.0  # work per unit
        per_step = np.maximum(1, np.rint(speeds / base)).astype(int)
        n_units = math.ceil(total / unit_h - 1e-9)
        if n_units > _MAX_UNITS:
            scale = math.ceil(n_units / _MAX_UNITS)
            unit_h *= scale
            per_step = np.maximum(1, np.rint(speeds * dt / 3600.0 / unit_h)).astype(int)
            n_units = math.ceil(total / unit_h - 1e-9)
        fastest_h = total / float(speeds.max())
        horizon = fastest_h * 3600.0 * self.horizon_factor + 12 * 3600.0
        if deadline is not None:
            horizon = max(horizon, deadline - submit)
        horizon = min(horizon, cfg.max_hours * 3600.0)
        n_steps = max(1, math.ceil(horizon / dt))
        k_deadline = (math.floor((deadline - submit) / dt + 1e-9) if deadline is not None
                      else n_steps)

        n = len(offers)
        idle = n
        inf = math.inf
        cost = np.full((n + 1, n_units), inf)
        moves = np.zeros((n + 1, n_units))
        cost[idle, 0] = 0.0
        best = (inf, 0.0, None)  # (cost, moves, finish time)
        boot_h, down_h = cfg.boot_s / 3600.0, (cfg.checkpoint_s + cfg.restore_s) / 3600.0
        restore_h = cfg.restore_s / 3600.0
        ids = [o.id for o in offers]
        w_index = np.arange(n_units)
        for k in range(n_steps):
            t0 = submit + k * dt
            t1 = t0 + dt
            avail = [market.next_unavailable(i, t0) >= t1 for i in ids]
            step_cost = [market.cost(i, t0, t1) for i in ids]
            price_now = [market.price(i, t0) for i in ids]
            new = np.full_like(cost, inf)
            new_moves = np.zeros_like(moves)
            # Stop (checkpoint, terminate) at the step boundary: free in the bound.
            running_best = cost[:n].min(axis=0)
            stop_better = running_best < cost[idle]
            arg = cost[:n].argmin(axis=0)
            idle_cost = np.where(stop_better, running_best, cost[idle])
            idle_moves = np.where(stop_better, moves[arg, w_index], moves[idle])
            new[idle], new_moves[idle] = idle_cost, idle_moves
            # Leaving a running offer for another: its checkpoint + restore.
            leave = cost[:n] + np.array(price_now)[:, None] * down_h
            leave_best = leave.min(axis=0)
            leave_arg = leave.argmin(axis=0)
            from_running = leave_best < idle_cost
            arrive_base = np.where(from_running, leave_best, idle_cost)
            arrive_moves = np.where(from_running, moves[leave_arg, w_index] + 1,
                                    idle_moves + (w_index > 0))
            for j in range(n):
                if not avail[j]:
                    continue
                p = price_now[j]
                extra = np.where(from_running, boot_h + down_h,
                                 np.where(w_index > 0, boot_h + restore_h, boot_h)) * p
                arrive = arrive_base + extra
                better = arrive < new[j]
                new[j] = np.where(better, arrive, new[j])
                new_moves[j] = np.where(better, arrive_moves, new_moves[j])
                # Run a step on j (it was already there).
                u = int(per_step[j])
                c = cost[j] + step_cost[j]
                if u < n_units:
                    seg = c[: n_units - u]
                    tgt = new[j, u:]
                    better = seg < tgt
                    new[j, u:] = np.where(better, seg, tgt)
                    new_moves[j, u:] = np.where(better, moves[j, : n_units - u],
                                                new_moves[j, u:])
                # Finishing within this step: bill the part of it used.
                lo = max(0, n_units - u)
                if np.isfinite(cost[j, lo:]).any():
                    remaining = (total / unit_h - w_index[lo:]).clip(min=0)
                    frac = np.minimum(1.0, remaining / u)
                    done = cost[j, lo:] + step_cost[j] * frac
                    i = int(np.argmin(done))
                    if done[i] < best[0]:
                        finish = t0 + dt * float(frac[i])
                        best = (float(done[i]), float(moves[j, lo + i]), finish)
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
