"""The control plane: the loops, and the commands the API and CLI call.

Loops (each a thread, each taking its time from the clock):
- reconcile, every ``reconcile_interval_s``: the price feed's due changes,
  one lifecycle step per live job, and every ``reaper_interval_s`` a reaper
  pass (in this thread, so it never races a placement being recorded);
- scout, every second: each running job whose scout interval has passed gets
  a pure move decision; a decision to move starts a migration.
Migrations run in their own threads, at most one per job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gpuscout.agent.protocol import artifacts_prefix
from gpuscout.controllers.context import Conflict, Context, InvalidRequest, log
from gpuscout.controllers.lifecycle import Lifecycle
from gpuscout.controllers.migrator import MigrationExecutor
from gpuscout.controllers.reaper import Reaper
from gpuscout.db import ConcurrentChange, NotFound
from gpuscout.domain import Job, JobSpec, JobStatus, Migration, MigrationReason, Offer
from gpuscout.domain.states import TERMINAL, IllegalTransition
from gpuscout.market.feeds import PriceFeed
from gpuscout.policy import MoveDecision, MovePolicy, Offers, decide_move
from gpuscout.store.base import ObjectNotFound

S = JobStatus


class ManualMarketOnly(Conflict):
    """Offers can be changed by hand only when the market is manual."""


@dataclass(frozen=True, slots=True)
class Intervals:
    reconcile_s: float = 0.5
    scout_s: float = 120.0
    reaper_s: float = 30.0


class ControlPlane:
    def __init__(self, ctx: Context, feed: PriceFeed, policy: MovePolicy,
                 intervals: Intervals = Intervals()) -> None:
        self.ctx = ctx
        self.feed = feed
        self.policy = policy
        self.intervals = intervals
        self.executor = MigrationExecutor(ctx)
        self.lifecycle = Lifecycle(ctx, self._urgent_move)
        self.reaper = Reaper(ctx)
        self.decisions: dict[str, MoveDecision] = {}
        self._last_scouted: dict[str, datetime] = {}
        self._migrations: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_reap: datetime | None = None

    # --- lifecycle of the control plane itself ------------------------------

    def start(self) -> None:
        """Seed the market, repair what a previous run left half done, and
        start the loops."""
        now = self.ctx.clock.now()
        self.feed.start(self.ctx.repo, now)
        self.repair()
        for name, loop in (("reconcile", self._reconcile_loop), ("scout", self._scout_loop)):
            thread = threading.Thread(target=loop, name=f"gpuscout-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        with self._lock:
            running = list(self._migrations.values())
        for thread in running:
            thread.join(timeout_s)

    def repair(self) -> None:
        for address, token in self.ctx.repo.agent_tokens().items():
            self.ctx.agents.set_token(address, token)
        self.executor.repair()
        # Routes live in memory: rebuild them from the jobs' active instances.
        for job in self.ctx.repo.list_jobs([S.RUNNING, S.MIGRATING]):
            if job.instance_id:
                instance = self.ctx.repo.get_instance(job.instance_id)
                self.ctx.router.switch(job.id, instance.address)

    def _loop(self, interval_s: float, body: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                body()
            except Exception:  # a loop must outlive any one bad pass
                log.exception("control loop pass failed")
            self._stop.wait(interval_s)

    def _reconcile_loop(self) -> None:
        self._loop(self.intervals.reconcile_s, self.reconcile_once)

    def _scout_loop(self) -> None:
        self._loop(min(1.0, self.intervals.scout_s), self.scout_once)

    # --- passes (public so tests and the simulator can drive them) ----------

    def reconcile_once(self) -> None:
        now = self.ctx.clock.now()
        self.feed.tick(self.ctx.repo, now)
        jobs = self.ctx.repo.list_jobs([s for s in S if s not in TERMINAL])
        for job in jobs:
            self.lifecycle.reconcile(job)
        if self._last_reap is None or (
            (now - self._last_reap).total_seconds() >= self.intervals.reaper_s
        ):
            self._last_reap = now
            self.reaper.reap()
        self.refresh_gauges()

    def scout_once(self, *, force: bool = False) -> list[MoveDecision]:
        """Decide for every running job whose scout interval has passed."""
        now = self.ctx.clock.now()
        offers = self.ctx.offers()
        by_id = {o.id: o for o in offers}
        decisions = []
        for job in self.ctx.repo.list_jobs([S.RUNNING]):
            interval = job.spec.scout_interval_s or self.intervals.scout_s
            last = self._last_scouted.get(job.id)
            if not force and last is not None and (now - last).total_seconds() < interval:
                continue
            self._last_scouted[job.id] = now
            decision = decide_move(job, by_id.get(job.offer_id or ""), offers, self.policy, now)
            self.decisions[job.id] = decision
            decisions.append(decision)
            if decision.move and decision.target is not None:
                self.ctx.event(job.id, "scout_decision", decision.reason,
                               target=decision.target.id, savings=decision.savings)
                self._start_migration(job, decision.target, MigrationReason.PRICE,
                                      decision.savings)
        self.ctx.metrics.scout_passes.inc()
        return decisions

    # --- commands -------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        job = self.ctx.repo.create_job(spec, self.ctx.clock.now())
        self.ctx.metrics.jobs_submitted.inc()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.ctx.repo.get_job(job_id)
        if job.status.is_terminal():
            raise Conflict(f"job {job_id} is already {job.status.value}")
        job = self.ctx.repo.transition(job_id, S.CANCELLED, finished_at=self.ctx.clock.now())
        self.ctx.router.switch(job_id, None)
        for instance in self.ctx.repo.list_instances(job_id=job_id, live_only=True):
            self.ctx.terminate(instance.id)
        self.lifecycle.bill(job)
        self.ctx.event(job_id, "cancelled", "cancelled; all its instances terminated")
        return self.ctx.repo.get_job(job_id)

    def migrate(self, job_id: str, target_offer_id: str | None = None) -> Migration:
        """A manual move, to ``target_offer_id`` or to the best other offer."""
        job = self.ctx.repo.get_job(job_id)
        if job.status != S.RUNNING:
            raise Conflict(f"job {job_id} is {job.status.value}; only a running job can move")
        offers = self.ctx.offers()
        if target_offer_id is not None:
            try:
                target = next(o for o in offers if o.id == target_offer_id)
            except StopIteration:
                raise InvalidRequest("offer_id", f"no offer {target_offer_id!r}") from None
            if target.id == job.offer_id:
                raise InvalidRequest("offer_id", "the job already runs on this offer")
            if not target.available:
                raise InvalidRequest("offer_id", f"offer {target.id} is not available")
            if not target.satisfies(job.spec.resources):
                raise InvalidRequest("offer_id", f"offer {target.id} does not fit the job's "
                                     "resources")
        else:
            candidate = (Offers(offers).available().compatible(job.spec.resources)
                         .excluding({job.offer_id or ""}).cheapest())
            if candidate is None:
                raise Conflict(f"no other available offer fits job {job_id}")
            target = candidate
        current = next((o for o in offers if o.id == job.offer_id), None)
        savings = (1 - target.cost_per_work_hour / current.cost_per_work_hour
                   if current and current.cost_per_work_hour > 0 else 0.0)
        migration = self._start_migration(job, target, MigrationReason.MANUAL, savings)
        if migration is None:
            raise Conflict(f"job {job_id} is already migrating")
        return migration

    def update_offer(self, offer_id: str, *, price_per_hour: float | None = None,
                     available: bool | None = None) -> Offer:
        if not self.feed.manual:
            raise ManualMarketOnly(
                f"the market is {self.feed.name}; offers change only when it is manual")
        self.ctx.repo.get_offer(offer_id)
        offer = self.ctx.repo.update_offer(offer_id, self.ctx.clock.now(),
                                           price_per_hour=price_per_hour, available=available)
        self.ctx.event(None, "offer_updated",
                       f"{offer_id}: ${offer.price_per_hour}/h, available={offer.available}",
                       offer_id=offer_id)
        return offer

    def artifact(self, job_id: str, name: str) -> bytes:
        self.ctx.repo.get_job(job_id)
        if not name or "/" in name or name.startswith("."):
            raise InvalidRequest("name", f"bad artifact name {name!r}")
        try:
            return self.ctx.store.get(f"{artifacts_prefix(job_id)}/{name}")
        except ObjectNotFound:
            raise NotFound("artifact", f"{job_id}/{name}") from None

    def wait_for_migrations(self, timeout_s: float = 60.0) -> None:
        with self._lock:
            running = list(self._migrations.values())
        for thread in running:
            thread.join(timeout_s)

    # --- internals -------------------------------------------------------------

    def _urgent_move(self, job: Job, reason: MigrationReason) -> None:
        current = self.ctx.repo.get_offer(job.offer_id) if job.offer_id else None
        offers = Offers(self.ctx.offers()).available().compatible(job.spec.resources)
        if current is not None:
            # Capacity in the zone just reclaimed is unlikely to last.
            offers = Offers(o for o in offers if o.zone != current.zone or
                            o.capacity != current.capacity)
        target = offers.excluding({job.offer_id or ""}).cheapest()
        if target is None:
            log.warning("job %s: interruption notice but no offer to move to", job.id)
            return
        self._start_migration(job, target, reason, 0.0)

    def _start_migration(self, job: Job, target: Offer, reason: MigrationReason,
                         savings: float) -> Migration | None:
        with self._lock:
            thread = self._migrations.get(job.id)
            if thread is not None and thread.is_alive():
                return None
            try:
                migration = self.executor.begin(job, target, reason, savings)
            except (ConcurrentChange, IllegalTransition) as err:
                log.info("not migrating %s: %s", job.id, err)
                return None
            thread = threading.Thread(target=self.executor.run, args=(migration.id,),
                                      name=f"gpuscout-migrate-{job.id}", daemon=True)
            self._migrations[job.id] = thread
            thread.start()
            return migration

    def refresh_gauges(self) -> None:
        """Job gauges from the database (each reconcile pass, and each scrape)."""
        jobs = self.ctx.repo.list_jobs()
        counts = {s: 0 for s in S}
        for job in jobs:
            counts[job.status] += 1
        for status, n in counts.items():
            self.ctx.metrics.jobs_by_status.labels(status.value).set(n)
        self.ctx.metrics.cost_usd.set(sum(j.cost_usd for j in jobs))
        self.ctx.metrics.savings_usd.set(sum(j.savings_usd for j in jobs))


__all__ = ["Conflict", "ControlPlane", "Intervals", "InvalidRequest", "ManualMarketOnly",
           "NotFound"]
