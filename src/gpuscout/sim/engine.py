"""The simulator: a simulated clock and provider over a market trace.

Each job runs on its own timeline (jobs do not compete for capacity, as in
the traces, which record whether one instance could be had), so a run is a
loop over the few instants where something can happen to a job:

- a scout tick (every ``scout_interval_s`` from submission) at which the
  policy is asked; ticks where nothing the policy reads has changed are
  skipped (the policy says when it wants to be asked again, ``wake``), which
  is what makes a simulated week of 10,000 jobs take seconds;
- the current offer losing capacity: a preemption notice, the instance is
  gone ``notice_s`` later; an emergency checkpoint is taken in the notice
  window if ``checkpoint_s`` fits in it, else the work since the last
  periodic checkpoint (every ``checkpoint_period_s`` of training) is lost;
- the phases of a move, make-before-break as the live executor does it: the
  replacement boots (billed) while the old instance trains, then the old
  instance checkpoints and the replacement restores (both billed, neither
  trains), then the old one is terminated;
- the job finishing.

Progress accrues at the instance's relative speed (work is in hours at
speed 1.0); cost accrues at the offer's price as the trace sets it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from gpuscout.domain import Capacity, Offer
from gpuscout.policy import ZONE_BACKOFF_S, offer_for, zone_key
from gpuscout.sim.jobs import SimJob
from gpuscout.sim.market import SimMarket

STOP = "stop"  # a scout action: checkpoint and terminate, wait for a better time


@dataclass(frozen=True, slots=True)
class SimConfig:
    boot_s: float = 180.0
    checkpoint_s: float = 30.0
    restore_s: float = 60.0
    notice_s: float = 120.0  # AWS spot interruption notice
    checkpoint_period_s: float = 1800.0
    emergency_checkpoint: bool = True  # checkpoint in the notice window when it fits
    zone_backoff_s: float = ZONE_BACKOFF_S  # spot in a zone just preempted is avoided this long
    boot_jitter: float = 0.1  # each boot takes boot_s x U(1 - j, 1 + j), seeded
    max_hours: float = 24 * 60.0  # a job not done this long after submission gives up


@dataclass(frozen=True, slots=True)
class JobResult:
    name: str
    cost_usd: float
    migrations: int
    finished_at: datetime | None
    deadline_missed: bool
    budget_missed: bool
    preemptions: int = 0
    work_lost_hours: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "cost_usd": round(self.cost_usd, 6),
                "migrations": self.migrations,
                "finished_at": (self.finished_at.isoformat().replace("+00:00", "Z")
                                if self.finished_at else None),
                "preemptions": self.preemptions,
                "deadline_missed": self.deadline_missed, "budget_missed": self.budget_missed}


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    jobs: tuple[JobResult, ...]

    @property
    def total_cost_usd(self) -> float:
        return sum(j.cost_usd for j in self.jobs)

    @property
    def deadline_misses(self) -> int:
        return sum(j.deadline_missed for j in self.jobs)

    @property
    def budget_misses(self) -> int:
        return sum(j.budget_missed for j in self.jobs)

    @property
    def migrations(self) -> int:
        return sum(j.migrations for j in self.jobs)

    def to_json(self) -> dict[str, object]:
        return {"policy": self.policy, "total_cost_usd": round(self.total_cost_usd, 6),
                "deadline_misses": self.deadline_misses, "budget_misses": self.budget_misses,
                "migrations": self.migrations, "jobs": [j.to_json() for j in self.jobs]}


@dataclass(slots=True)
class JobRun:
    """A job's state on the simulated timeline (times in epoch seconds, work
    in hours at speed 1.0). Policies read it; only the engine writes it."""

    job: SimJob
    market: SimMarket
    submit: float
    deadline: float | None
    total_work: float
    offer_id: str | None = None
    speed: float = 1.0
    bill_from: float = 0.0
    train_start: float = 0.0  # training on the current instance starts (started) here
    work_base: float = 0.0  # work done at train_start (what was restored)
    move: tuple[str, float, str] | None = None  # (target id, started at, trigger)
    spent: float = 0.0  # billed for instances no longer running
    migrations: int = 0
    price_moves: int = 0
    preemptions: int = 0
    work_lost: float = 0.0
    started_at: float | None = None
    last_move_at: float | None = None
    avoid_until: dict[str, float] = field(default_factory=dict)

    def work_at(self, t: float) -> float:
        if self.offer_id is None or t <= self.train_start:
            return self.work_base
        return min(self.total_work, self.work_base + (t - self.train_start) / 3600.0 * self.speed)

    def cost_at(self, t: float) -> float:
        cost = self.spent
        if self.offer_id is not None:
            cost += self.market.cost(self.offer_id, self.bill_from, t)
        if self.move is not None:
            cost += self.market.cost(self.move[0], self.move[1], t)
        return cost

    def avoided_zones(self, t: float) -> frozenset[str]:
        return frozenset(z for z, until in self.avoid_until.items() if until > t)

    @property
    def running(self) -> bool:
        return self.offer_id is not None

    def current(self, t: float) -> Offer | None:
        return self.market.offer(self.offer_id, t) if self.offer_id else None

    def on_capacity(self, capacity: Capacity) -> bool:
        return (self.offer_id is not None
                and self.market.templates[self.offer_id].capacity == capacity)


# A scout action: (target offer, trigger), or (None, STOP) to stop and wait.
Action = tuple[Offer | None, str]


class SimPolicy(Protocol):
    name: str
    scout_interval_s: float

    def place(self, run: JobRun, t: float) -> Offer | None:
        """A job with no instance: where to launch now, or None to wait."""
        ...

    def scout(self, run: JobRun, t: float) -> Action | None:
        """A job training on an instance: move (or stop), or None to stay."""
        ...

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        """The current instance got a preemption notice: where to go now."""
        ...

    def wake(self, run: JobRun, t: float) -> float:
        """The next time to be asked even if the market does not change."""
        ...


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class Simulator:
    def __init__(self, market: SimMarket, config: SimConfig | None = None, seed: int = 0):
        self.market = market
        self.config = config or SimConfig()
        self.seed = seed

    def run(self, jobs: Sequence[SimJob], policy: SimPolicy, first_index: int = 0) -> SimResult:
        """``first_index``: the index of ``jobs[0]`` in the whole job list
        (it seeds each job's randomness), for a slice of it run apart."""
        return SimResult(policy.name, tuple(self.run_job(j, policy, i)
                                            for i, j in enumerate(jobs, first_index)))

    def run_job(self, job: SimJob, policy: SimPolicy, index: int = 0) -> JobResult:
        cfg, market = self.config, self.market
        rng = random.Random(self.seed * 1_000_003 + index)
        submit = job.submit_at.timestamp()
        deadline = job.spec.deadline.timestamp() if job.spec.deadline else None
        run = JobRun(job, market, submit, deadline, job.spec.expected_duration_hours)
        interval = job.spec.scout_interval_s or policy.scout_interval_s
        give_up = submit + cfg.max_hours * 3600.0

        def boot() -> float:
            j = cfg.boot_jitter
            return cfg.boot_s * (1.0 + rng.uniform(-j, j)) if j > 0 else cfg.boot_s

        def tick_after(x: float, t: float) -> float:
            """The first scout tick at or after ``x`` and after ``t``."""
            if x == math.inf:
                return math.inf
            k = math.ceil((max(x, t) - submit) / interval - 1e-9)
            tick = submit + k * interval
            return tick if tick > t else tick + interval

        def launch(offer: Offer, t: float) -> None:
            if not market.available(offer.id, t):
                return  # a capacity error: the job keeps waiting
            restore = cfg.restore_s if run.started_at is not None else 0.0
            # The speed the job's work runs at there (a CPU-only job: 1.0 anywhere).
            speed = offer_for(job.spec.resources, offer).relative_speed
            run.offer_id, run.speed, run.bill_from = offer.id, speed, t
            run.train_start = t + boot() + restore
            run.started_at = run.started_at if run.started_at is not None else t

        def finish_time() -> float:
            if run.offer_id is None or run.speed <= 0:
                return math.inf
            return run.train_start + (run.total_work - run.work_base) / run.speed * 3600.0

        t = submit
        next_consult = submit
        finished: float | None = None
        move_boot = 0.0
        move_boot_s = cfg.boot_s
        while True:
            ev_finish = finish_time()
            ev_move = ev_preempt = math.inf
            if run.move is not None:
                move_boot = run.move[1] + move_boot_s
                ev_move = move_boot + cfg.checkpoint_s + cfg.restore_s
                if ev_finish > move_boot:
                    ev_finish = math.inf  # training on the old instance stops at the checkpoint
            if run.offer_id is not None:
                ev_preempt = market.next_unavailable(run.offer_id, max(t, run.bill_from))
            nxt = min(ev_finish, ev_move, ev_preempt, next_consult, give_up)
            if nxt == math.inf:
                nxt = give_up
            t = max(t, nxt)
            if t >= give_up and t < ev_finish:
                break
            if t == ev_finish:
                finished = t
                break
            if t == ev_preempt:
                kill = t + cfg.notice_s
                if ev_finish <= kill:  # done before the instance is reclaimed
                    finished = ev_finish
                    t = ev_finish
                    break
                self._preempt(run, policy, t, kill, move_boot if run.move else None, launch)
                if run.offer_id is None:
                    next_consult = tick_after(t, t)
                continue
            if t == ev_move:
                assert run.move is not None
                target, started, trigger = run.move
                run.spent += market.cost(run.offer_id or target, run.bill_from, t)
                saved = run.work_at(move_boot)
                run.offer_id, run.bill_from = target, started
                run.speed = offer_for(job.spec.resources, market.templates[target]).relative_speed
                run.train_start, run.work_base = t, saved
                run.move = None
                run.migrations += 1
                run.price_moves += trigger == "price"
                run.last_move_at = t
                next_consult = min(next_consult, tick_after(t, t))
                continue
            # A scout tick.
            if run.offer_id is None:
                offer = policy.place(run, t)
                if offer is not None:
                    launch(offer, t)
            elif run.move is None and t >= run.train_start:
                action = policy.scout(run, t)
                if action is not None:
                    target_offer, trigger = action
                    if target_offer is None and trigger == STOP:
                        # Checkpoint, then terminate; the work is kept.
                        run.spent += market.cost(run.offer_id, run.bill_from,
                                                 t + cfg.checkpoint_s)
                        run.work_base = run.work_at(t)
                        run.offer_id = None
                    elif target_offer is not None:
                        move_boot_s = boot()
                        run.move = (target_offer.id, t, trigger)
            wake = policy.wake(run, t)
            next_consult = tick_after(min(market.next_change(t), wake), t)

        end = finished if finished is not None else t
        cost = run.cost_at(end)
        finished_dt = to_datetime(finished) if finished is not None else None
        deadline_missed = finished is None or (deadline is not None and finished > deadline + 1e-6)
        budget = job.spec.budget_usd
        return JobResult(job.name, cost, run.migrations, finished_dt, deadline_missed,
                         budget is not None and cost > budget + 1e-9, run.preemptions,
                         run.work_lost)

    def _preempt(self, run: JobRun, policy: SimPolicy, t: float, kill: float,
                 move_boot: float | None, launch) -> None:  # type: ignore[no-untyped-def]
        """The current instance got its notice at ``t`` and is gone at ``kill``."""
        cfg, market = self.config, self.market
        assert run.offer_id is not None
        current = market.templates[run.offer_id]
        if run.train_start >= kill:
            saved = run.work_base
        elif cfg.emergency_checkpoint and cfg.checkpoint_s <= cfg.notice_s:
            stop = max(run.train_start, kill - cfg.checkpoint_s)
            saved = run.work_at(min(stop, move_boot) if move_boot is not None else stop)
        else:
            period = cfg.checkpoint_period_s
            last = run.train_start + math.floor((kill - run.train_start) / period) * period
            saved = run.work_at(min(last, move_boot) if move_boot is not None else last)
        run.work_lost += max(0.0, run.work_at(kill) - saved) if move_boot is None else 0.0
        run.preemptions += 1
        if current.capacity == Capacity.SPOT:
            run.avoid_until[zone_key(current)] = t + cfg.zone_backoff_s
        if run.move is not None:
            # The replacement is already booting: it restores what was saved.
            target, started, _ = run.move
            run.spent += market.cost(run.offer_id, run.bill_from, kill)
            run.offer_id, run.bill_from = target, started
            run.speed = offer_for(run.job.spec.resources,
                                  market.templates[target]).relative_speed
            run.train_start = max(move_boot or t, t) + cfg.restore_s
            run.work_base = saved
            run.move = None
            run.migrations += 1
            run.last_move_at = t
            return
        # The policy sees what the emergency checkpoint will hold, not the
        # old instance's training counted twice.
        run.work_base, run.train_start = saved, kill
        replacement = policy.on_notice(run, t)
        run.spent += market.cost(run.offer_id, run.bill_from, kill)
        run.offer_id = None
        if replacement is not None:
            launch(replacement, t)
            if run.offer_id is not None:
                run.migrations += 1
                run.last_move_at = t
