"""The adapter between the simulator and GPU Scout's own policy.

The simulator asks the same pure functions the live control plane does,
with the same arguments it builds (``ControlPlane.scout_once``,
``ControlPlane.placement``, ``ControlPlane._urgent_move``):

- a job with no instance: ``place_job`` over the current offers;
- a running job at a scout tick: ``decide_move`` with the ranked snapshot,
  the job's current offer looked up in it, a ``JobView`` (time running,
  price moves so far, zones avoided after a preemption) and ``MoveCosts``;
- a preemption notice: ``place_job`` over the offers other than the current
  one, with the zone just reclaimed avoided and the current offer passed as
  ``leaving`` (so a job ahead of the line waits for spot there).
"""

from __future__ import annotations

import math
from datetime import datetime

from gpuscout.domain import Job, JobStatus, Offer, Progress
from gpuscout.policy import (
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    PlacementDecision,
    decide_move,
    dwell_s,
    place_job,
)
from gpuscout.sim.engine import Action, JobRun, SimConfig, to_datetime

# Progress is handed to the policy as steps of this many per job, as an
# agent reports step / total_steps.
TOTAL_STEPS = 1_000_000


def job_value(run: JobRun, t: float, status: JobStatus) -> Job:
    """The Job value the live control plane would hold for ``run`` at ``t``."""
    done = run.work_at(t) / run.total_work if run.total_work > 0 else 1.0
    return Job(
        id=run.job.name, spec=run.job.spec, status=status, created_at=run.job.submit_at,
        offer_id=run.offer_id, instance_id=run.offer_id and f"sim-{run.job.name}",
        progress=Progress(step=int(done * TOTAL_STEPS), total_steps=TOTAL_STEPS),
        cost_usd=run.cost_at(t),
        started_at=to_datetime(run.started_at) if run.started_at is not None else None,
        last_migration_at=to_datetime(run.last_move_at) if run.last_move_at else None,
    )


def job_view(run: JobRun, t: float, *, price_moves: int | None = None) -> JobView:
    running_s = t - run.started_at if run.started_at is not None else 0.0
    return JobView(running_s=running_s,
                   price_moves=run.price_moves if price_moves is None else price_moves,
                   avoid_zones=run.avoided_zones(t))


class GpuScoutPolicy:
    """GPU Scout's policy (``gpuscout.policy``), as the live scout calls it.

    ``heartbeat_s``: a running job whose market has not changed is asked
    again at least this often (between market changes a decision can only
    change through time: dwell expiry, which is woken for exactly, the
    remaining work shrinking, which only makes moves pay less, and prices
    that keep changing growing older, which changes how long they are
    expected to last (``expected_price``): this heartbeat catches that). Set
    it to ``scout_interval_s`` to ask at every tick, as the live scout does
    (``bench/policy.py`` does).
    """

    name = "gpuscout"

    def __init__(self, policy: MovePolicy | None = None, costs: MoveCosts | None = None, *,
                 scout_interval_s: float = 120.0, heartbeat_s: float = 1800.0) -> None:
        self.policy = policy or MovePolicy()
        self.costs = costs or MoveCosts()
        self.scout_interval_s = scout_interval_s
        self.heartbeat_s = max(heartbeat_s, scout_interval_s)
        self.decisions: list[MoveDecision | PlacementDecision] = []
        self.record = False  # keep every decision (tests)

    @classmethod
    def for_config(cls, config: SimConfig, **kwargs: float) -> GpuScoutPolicy:
        costs = MoveCosts(boot_s=config.boot_s, checkpoint_s=config.checkpoint_s,
                          restore_s=config.restore_s, notice_s=config.notice_s)
        interval = kwargs.get("scout_interval_s", 120.0)
        return cls(MovePolicy(recheck_s=interval), costs=costs, **kwargs)  # type: ignore[arg-type]

    def _now(self, t: float) -> datetime:
        return to_datetime(t)

    def place(self, run: JobRun, t: float) -> Offer | None:
        status = JobStatus.RECOVERING if run.started_at is not None else JobStatus.SCOUTING
        decision = place_job(job_value(run, t, status), run.market.offers(t), self._now(t),
                             policy=self.policy, view=job_view(run, t, price_moves=0),
                             costs=self.costs)
        if self.record:
            self.decisions.append(decision)
        return decision.offer

    def scout(self, run: JobRun, t: float) -> Action | None:
        offers = run.market.offers(t)
        current = next((o for o in offers if o.id == run.offer_id), None)
        decision = decide_move(job_value(run, t, JobStatus.RUNNING), current, offers,
                               self.policy, self._now(t), view=job_view(run, t),
                               costs=self.costs)
        if self.record:
            self.decisions.append(decision)
        if decision.move and decision.target is not None:
            return decision.target, decision.trigger
        return None

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        snapshot = run.market.offers(t)
        leaving = next((o for o in snapshot if o.id == run.offer_id),
                       run.market.templates.get(run.offer_id or ""))
        offers = [o for o in snapshot if o.id != run.offer_id]
        decision = place_job(job_value(run, t, JobStatus.RUNNING), offers, self._now(t),
                             policy=self.policy, view=job_view(run, t, price_moves=0),
                             costs=self.costs, leaving=leaving)
        if self.record:
            self.decisions.append(decision)
        return decision.offer

    def wake(self, run: JobRun, t: float) -> float:
        if run.offer_id is None:
            return t + self.scout_interval_s
        wake = t + self.heartbeat_s
        if run.last_move_at is not None:
            until = run.last_move_at + dwell_s(self.policy, run.price_moves)
            if until > t:
                wake = min(wake, until)
        zones = [u for u in run.avoid_until.values() if u > t]
        if zones:
            wake = min(wake, min(zones))
        return wake if wake > t else math.inf
