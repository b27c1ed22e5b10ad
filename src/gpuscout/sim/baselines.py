"""Baselines GPU Scout is measured against (BENCHMARKS.md).

Every baseline chooses among the instance types fast enough to finish
the job's remaining work by its deadline (as a user asking SkyPilot for an
accelerator names one that can make it); only when none is, the fastest.

- ``on_demand``: the cheapest on-demand offer, never moves.
- ``naive``: scout every 2 minutes, move when an offer is 20% cheaper per
  unit of work by price alone (no cost of moving counted, no dwell).
- ``skypilot``: SkyPilot managed jobs: the cheapest spot offer at launch,
  spot only; moves only when preempted, to another zone; waits for spot.
- ``uniform_progress``: Can't Be Late (NSDI '24): spot when available; on
  spot's absence, wait while progress is ahead of the line
  work x elapsed / (deadline - submission), on-demand once it is behind;
  back to spot as soon as it returns (an on-demand instance is kept, not
  stopped, while spot is away: stopping it when ahead would pay a restart
  each time the line catches up). With the paper's safety net: once the
  slack left is down to one restart (plus GPU Scout's margin), on-demand to
  the end.
- ``greedy``: Can't Be Late's greedy: spot whenever available, idle when
  not, on-demand (to the end) only when the deadline forces it.

All are ``SimPolicy``; the offline optimum is in ``optimal.py``.
"""

from __future__ import annotations

import math

from gpuscout.domain import Capacity, Offer
from gpuscout.policy import MovePolicy, Offers, offer_for, offers_for
from gpuscout.sim.engine import Action, JobRun, SimConfig


def _fitting(run: JobRun, t: float, avoid: frozenset[str] = frozenset()) -> Offers:
    """The offers the job may take (``Offers.eligible``: compatible,
    available, no spot in the zones ``avoid``), ranked cheapest per work
    hour (as the job sees them: a CPU-only job by the hour)."""
    resources = run.job.spec.resources
    return offers_for(resources, run.market.offers(t)).eligible(resources, avoid)


def _cheapest(run: JobRun, t: float, capacity: Capacity | None = None,
              avoid: frozenset[str] = frozenset(), *, avoid_offer: str | None = None,
              in_time: bool = False) -> Offer | None:
    """The cheapest fitting offer per work hour (not ``avoid_offer``, no
    spot in the zones ``avoid``). ``in_time``: with a deadline, only offers
    fast enough to finish the rest by it (else the fastest of the rest)."""
    fitting = (o for o in _fitting(run, t, avoid)
               if (capacity is None or o.capacity == capacity) and o.id != avoid_offer)
    if not in_time or run.deadline is None:
        return next(fitting, None)
    candidates = list(fitting)
    work_s = (run.total_work - run.work_at(t)) * 3600.0
    fast = [o for o in candidates if t + work_s / o.relative_speed <= run.deadline]
    if fast:
        return fast[0]
    return max(candidates, key=lambda o: o.relative_speed, default=None)


class _Base:
    name = "base"
    scout_interval_s = 120.0

    def wake(self, run: JobRun, t: float) -> float:
        # Price-only rules change their mind only when the market does.
        return t + self.scout_interval_s if run.offer_id is None else math.inf

    def scout(self, run: JobRun, t: float) -> Action | None:
        return None


class OnDemandPolicy(_Base):
    name = "on_demand"

    def place(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, Capacity.ON_DEMAND, in_time=True)

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, Capacity.ON_DEMAND, in_time=True)


class NaivePolicy(_Base):
    name = "naive"

    def __init__(self, threshold: float = 0.20) -> None:
        self.threshold = threshold

    def place(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, in_time=True)

    def scout(self, run: JobRun, t: float) -> Action | None:
        best = _cheapest(run, t, in_time=True)
        current = run.current(t)
        current = offer_for(run.job.spec.resources, current) if current else None
        if best is None or current is None or best.id == current.id:
            return None
        if best.cost_per_work_hour <= (1 - self.threshold) * current.cost_per_work_hour + 1e-12:
            return best, "price"
        return None

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, avoid_offer=run.offer_id, in_time=True)


class SkyPilotPolicy(_Base):
    name = "skypilot"

    def place(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, Capacity.SPOT, run.avoided_zones(t), in_time=True)

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        return _cheapest(run, t, Capacity.SPOT, run.avoided_zones(t), in_time=True)


class UniformProgressPolicy(_Base):
    """Can't Be Late's Uniform Progress (``uniform=True``) or greedy."""

    def __init__(self, config: SimConfig | None = None, *, uniform: bool = True,
                 margin_s: float | None = None) -> None:
        self.config = config or SimConfig()
        self.uniform = uniform
        # The same margin GPU Scout keeps beyond a restart (with 15 minutes
        # it went on-demand from the start whenever the slack was smaller).
        self.margin_s = MovePolicy().deadline_margin_s if margin_s is None else margin_s
        self.name = "uniform_progress" if uniform else "greedy"
        self._forced: set[str] = set()  # jobs that went on-demand for good

    @property
    def restart_s(self) -> float:
        return self.config.boot_s + self.config.restore_s

    def _slack(self, run: JobRun, t: float, speed: float) -> float:
        if run.deadline is None:
            return math.inf
        work = run.total_work - run.work_at(t)
        return run.deadline - t - work / speed * 3600.0

    def _behind(self, run: JobRun, t: float) -> bool:
        if run.deadline is None:
            return True  # no line to stay ahead of: never idle
        span = run.deadline - run.submit
        line = 1.0 if span <= 0 else min(1.0, (t - run.submit) / span)
        return run.work_at(t) < line * run.total_work - 1e-9

    def _forced_now(self, run: JobRun, t: float, od: Offer | None) -> bool:
        if run.job.name in self._forced:
            return True
        if od is None or run.deadline is None:
            return False
        overhead = 0.0 if run.on_capacity(Capacity.ON_DEMAND) else self.restart_s
        if self._slack(run, t, od.relative_speed) - overhead <= self.margin_s + self.restart_s:
            self._forced.add(run.job.name)
            return True
        return False

    def _want(self, run: JobRun, t: float) -> Offer | None:
        """Where the job should be now (None: idle)."""
        od = _cheapest(run, t, Capacity.ON_DEMAND, in_time=True)
        if self._forced_now(run, t, od):
            return od
        spot = _cheapest(run, t, Capacity.SPOT, in_time=True)
        if spot is not None:
            return spot
        if self.uniform and self._behind(run, t):
            return od
        if run.deadline is None:
            return od
        return None

    def place(self, run: JobRun, t: float) -> Offer | None:
        return self._want(run, t)

    def scout(self, run: JobRun, t: float) -> Action | None:
        want = self._want(run, t)
        if run.on_capacity(Capacity.SPOT):
            # On spot: stay while it lasts (a preemption moves it), unless
            # the deadline now forces on-demand.
            if want is not None and want.capacity == Capacity.ON_DEMAND:
                return want, "deadline"
            return None
        # On on-demand: back to spot as soon as it returns. Ahead of the line
        # without spot, it keeps the on-demand instance rather than stop and
        # pay a restart each time it falls behind again (hysteresis).
        if want is not None and want.capacity == Capacity.SPOT:
            return want, "price"
        return None

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        want = self._want(run, t)
        if want is not None and want.id == run.offer_id:
            spot = [o for o in _fitting(run, t) if o.id != run.offer_id]
            return spot[0] if spot else None
        return want

    def wake(self, run: JobRun, t: float) -> float:
        return t + self.scout_interval_s

