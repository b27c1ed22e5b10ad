"""The control plane: the loops, and the commands the API and CLI call.

Loops (each a thread, each taking its time from the clock):
- reconcile, every ``reconcile_interval_s``: the price feed's due changes,
  one lifecycle step per live job, and every ``reaper_interval_s`` a reaper
  pass (in this thread, so it never races a placement being recorded);
- scout, every second: each running job whose scout interval has passed gets
  a pure move decision; a decision to move starts a migration.
Migrations run in their own threads, at most one per job.

The policy is pure; what it needs beyond the Job value is gathered here:
the job's time running and price moves so far (``JobView``), the zones to
avoid after a preemption, and the cost of a move (``MoveCosts``: the
settings' estimates, replaced by the median of the last moves measured).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from gpuscout.agent.protocol import artifacts_prefix
from gpuscout.controllers.context import Conflict, Context, InvalidRequest, log
from gpuscout.controllers.lifecycle import Lifecycle
from gpuscout.controllers.migrator import MigrationExecutor
from gpuscout.controllers.reaper import Reaper
from gpuscout.db import ConcurrentChange, NotFound, Sample, new_id
from gpuscout.domain import (
    Capacity,
    Instance,
    Job,
    JobSpec,
    JobStatus,
    Migration,
    MigrationReason,
    MigrationStatus,
    Offer,
)
from gpuscout.domain.states import TERMINAL, IllegalTransition
from gpuscout.joblog import Segment, read_job_log
from gpuscout.market.feeds import PriceFeed, SyncedFeed
from gpuscout.policy import (
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    Offers,
    PlacementDecision,
    Trigger,
    decide_move,
    fits_catalog,
    measured_move_costs,
    offers_for,
    place_job,
    weigh_move,
    zone_key,
)
from gpuscout.providers.base import InstanceNotFound, InterruptibleProvider
from gpuscout.providers.bootstrap import job_size_problem
from gpuscout.store.base import ObjectNotFound
from gpuscout.workdir import key_of as workdir_key

S = JobStatus

_REASON_OF_TRIGGER = {
    Trigger.PRICE: MigrationReason.PRICE,
    Trigger.DEADLINE: MigrationReason.DEADLINE,
    Trigger.CAPACITY: MigrationReason.PREEMPTION,
}
# A cancel that races the loops' own changes of the job tries this often.
_CANCEL_TRIES = 5
# A live job's history (its charts, ``record_history``): a point whenever
# its offer or the prices it is weighed by move, else one per this when its
# progress or cost moved; the market is read for it at most every
# HISTORY_PASS_S. 30 s: a day's run is under 3,000 points.
HISTORY_SAMPLE_S = 30.0
HISTORY_PASS_S = 5.0
_HISTORY_STATUSES = (S.RUNNING, S.MIGRATING, S.RECOVERING)


def with_setup(costs: MoveCosts, setup_s: float | None) -> MoveCosts:
    """``costs`` for a job whose setup takes ``setup_s`` on a new instance:
    it runs after the boot, before the replacement is ready, so it counts as
    boot time (billed on the replacement while the job trains on the old)."""
    return replace(costs, boot_s=costs.boot_s + setup_s) if setup_s else costs


def _savings(current: Offer | None, target: Offer) -> float:
    """The fraction of the current cost per work hour a move saves
    (negative: the target is dearer)."""
    if current is None or current.cost_per_work_hour <= 0:
        return 0.0
    return 1 - target.cost_per_work_hour / current.cost_per_work_hour


def _saving_phrase(savings: float) -> str:
    """"25.0% cheaper" or "191.0% dearer", never a negative saving."""
    return f"{savings:.1%} cheaper" if savings >= 0 else f"{-savings:.1%} dearer"


def _gist(reason: str) -> str:
    return reason.split(":", 1)[0]


class ManualMarketOnly(Conflict):
    """Offers can be changed by hand only when the market is manual."""


@dataclass(frozen=True, slots=True)
class Intervals:
    reconcile_s: float = 0.5
    scout_s: float = 120.0
    reaper_s: float = 30.0


class ControlPlane:
    def __init__(self, ctx: Context, feed: PriceFeed, policy: MovePolicy,
                 intervals: Intervals = Intervals(), *, costs: MoveCosts | None = None) -> None:
        self.ctx = ctx
        self.feed = feed
        self.policy = policy
        self.intervals = intervals
        self.costs = costs or MoveCosts()
        self.executor = MigrationExecutor(ctx)
        self.lifecycle = Lifecycle(ctx, self._urgent_move, self.placement)
        self.reaper = Reaper(ctx)
        # The latest decision per job (its time is decided_at), moving or
        # not, placements included; decisions that act are also events.
        self.decisions: dict[str, MoveDecision] = {}
        self._last_scouted: dict[str, datetime] = {}
        self._migrations: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_reap: datetime | None = None
        self._last_error: dict[str, str] = {}  # per job, to record each error once
        self._last_history: datetime | None = None
        # Per job: when its last history point was recorded, and what it said.
        self._sampled: dict[str, tuple[datetime, tuple[object, ...]]] = {}

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
                self.ctx.route(job.id, self.ctx.repo.get_instance(job.instance_id))

    def _loop(self, interval_s: float, body: Callable[[], object]) -> None:
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
            # One job's failure must not hold the others back: it is logged
            # and recorded on the job, and the pass goes on.
            with self._isolated(job.id, "reconcile"):
                self.lifecycle.reconcile(job)
        if self._last_reap is None or (
            (now - self._last_reap).total_seconds() >= self.intervals.reaper_s
        ):
            self._last_reap = now
            self.reaper.reap()
            self.ctx.repo.forget_expired(now)  # what the control plane learnt, once expired
        if self._last_history is None or (
            (now - self._last_history).total_seconds() >= HISTORY_PASS_S
        ):
            try:
                self.record_history(now)
            except Exception:  # the charts miss a point; the jobs are not held back
                log.exception("recording the jobs' history failed")
            # The next look in HISTORY_PASS_S, once a job is live to look at.
            self._last_history = now if self._sampled else None
        self.refresh_gauges()

    def record_history(self, now: datetime) -> list[Sample]:
        """A history point for each live job whose offer or prices moved, or
        whose progress or cost moved ``HISTORY_SAMPLE_S`` after its last:
        step, loss, cost so far, and its cost per work hour against the best
        available offer's (as the job sees the market). Returns them."""
        jobs = self.ctx.repo.list_jobs(list(_HISTORY_STATUSES))
        live = {job.id for job in jobs}
        for gone in [j for j in self._sampled if j not in live]:
            del self._sampled[gone]
        if not jobs:
            return []
        markets = self.job_markets(jobs, self.ctx.offers())
        samples = []
        for job in jobs:
            current, best = markets[job.id]
            sample = Sample(
                job_id=job.id, time=now, step=job.progress.step, loss=job.progress.loss,
                cost_usd=job.cost_usd,
                cost_per_work_hour=current.cost_per_work_hour if current else None,
                best_cost_per_work_hour=best.cost_per_work_hour if best else None,
                best_offer_id=best.id if best else None)
            said = (job.offer_id, sample.cost_per_work_hour, sample.best_cost_per_work_hour,
                    sample.step, round(sample.cost_usd, 6))
            last = self._sampled.get(job.id)
            if last is not None and (last[1] == said or (
                    last[1][:3] == said[:3]
                    and (now - last[0]).total_seconds() < HISTORY_SAMPLE_S)):
                continue
            self._sampled[job.id] = (now, said)
            samples.append(sample)
        if samples:
            self.ctx.repo.add_samples(samples)
        return samples

    def job_markets(self, jobs: Sequence[Job], offers: Sequence[Offer]
                    ) -> dict[str, tuple[Offer | None, Offer | None]]:
        """Per job, its offer and the cheapest available offer that fits it,
        as the job sees them (its scope; a CPU job's priced by the hour).
        Jobs with the same needs over the same offers share the work."""
        shared: dict[tuple[object, ...], tuple[dict[str, Offer], Offer | None]] = {}
        out = {}
        for job in jobs:
            mine = self.ctx.scope_offers(job.id, offers)
            key = (job.spec.resources, tuple(o.id for o in mine))
            if key not in shared:
                seen = offers_for(job.spec.resources, mine)
                shared[key] = ({o.id: o for o in seen},
                               seen.available().compatible(job.spec.resources).cheapest())
            by_id, best = shared[key]
            out[job.id] = (by_id.get(job.offer_id or ""), best)
        return out

    def history(self, job_id: str) -> list[Sample]:
        """The job's history points, oldest first; NotFound for an unknown job."""
        self.ctx.repo.get_job(job_id)
        return self.ctx.repo.list_samples(job_id)

    def scout_once(self, *, force: bool = False) -> list[MoveDecision]:
        """Decide for every running job whose scout interval has passed.
        Offers older than the policy's bound (``SyncedFeed``) move no job:
        each decision says how old they are."""
        now = self.ctx.clock.now()
        synced = self.feed.synced_at() if isinstance(self.feed, SyncedFeed) else None
        offers_age_s = (now - synced).total_seconds() if synced is not None else None
        offers = Offers(self.ctx.offers()).ranked()
        by_id = {o.id: o for o in offers}
        due = []
        for job in self.ctx.repo.list_jobs([S.RUNNING]):
            interval = job.spec.scout_interval_s or self.intervals.scout_s
            last = self._last_scouted.get(job.id)
            if force or last is None or (now - last).total_seconds() >= interval:
                due.append(job)
        decisions = []
        costs, avoid, price_moves = self.costs, frozenset[str](), dict[str, int]()
        setups: dict[str, float] = {}
        if due:
            completed = self.ctx.repo.list_migrations(status=MigrationStatus.COMPLETED)
            setups = self.ctx.repo.setup_seconds()
            costs = self.move_costs(completed, setups)
            avoid = self.ctx.avoided_zones()
            for m in completed:
                if m.reason == MigrationReason.PRICE:
                    price_moves[m.job_id] = price_moves.get(m.job_id, 0) + 1
        for job in due:
            self._last_scouted[job.id] = now
            with self._isolated(job.id, "scout"):
                view = self._view(job, now, avoid, price_moves.get(job.id, 0))
                # The offers this job may use (the demo's job: the demo's).
                scoped = Offers(self.ctx.scope_offers(job.id, offers)).ranked()
                decision = decide_move(job, by_id.get(job.offer_id or ""), scoped, self.policy,
                                       now, view=view,
                                       costs=with_setup(costs, setups.get(job.instance_id or "")),
                                       offers_age_s=offers_age_s)
                self.decisions[job.id] = decision
                decisions.append(decision)
                if decision.move and decision.target is not None:
                    self.ctx.event(job.id, "scout_decision", decision.reason,
                                   target=decision.target.id, **decision.numbers())
                    self._start_migration(job, decision.target,
                                          _REASON_OF_TRIGGER.get(decision.trigger,
                                                                 MigrationReason.PRICE),
                                          decision.savings)
        self.ctx.metrics.scout_passes.inc()
        return decisions

    def market(self) -> list[Offer]:
        """The offers as users are shown them (``ctx.offers``): a reserved
        market (the demo's) only while a live job is confined to it; after
        that, or on a control plane started without the demo, its offers
        are frozen rows nobody else may use."""
        offers = self.ctx.offers()
        reserved = {o.provider for o in offers if self.ctx.is_reserved(o)}
        if not reserved:
            return offers
        live = {j.id for j in self.ctx.repo.list_jobs([s for s in S if s not in TERMINAL])}
        shown = {p for p in reserved if live.intersection(self.ctx.confined_jobs(p))}
        return [o for o in offers if o.provider not in reserved or o.provider in shown]

    def placement(self, job: Job) -> PlacementDecision:
        """Where a job without an instance goes now (lifecycle asks)."""
        now = self.ctx.clock.now()
        decision = place_job(job, self.ctx.scope_offers(job.id, self.ctx.offers()), now,
                             policy=self.policy,
                             view=self._view(job, now, self.ctx.avoided_zones(), 0),
                             costs=self._job_costs(job))
        previous = self.decisions.get(job.id)
        self.decisions[job.id] = MoveDecision(
            job_id=job.id, move=decision.offer is not None, reason=decision.reason,
            current_offer_id=None, target=decision.offer,
            target_cost_per_work_hour=(decision.offer.cost_per_work_hour
                                       if decision.offer else None),
            trigger=Trigger.PLACEMENT, decided_at=now,
            remaining_work_hours=decision.remaining_work_hours,
            budget_left_usd=decision.budget_left_usd,
            deadline_slack_s=decision.deadline_slack_s)
        # One event per reason to wait (its numbers change every pass).
        if decision.offer is None and (previous is None or previous.move
                                       or _gist(previous.reason) != _gist(decision.reason)):
            self.ctx.event(job.id, "placement_wait", decision.reason)
        return decision

    def _view(self, job: Job, now: datetime, avoid: frozenset[str], price_moves: int) -> JobView:
        running_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
        return JobView(running_s=running_s, price_moves=price_moves, avoid_zones=avoid)

    def _job_costs(self, job: Job) -> MoveCosts:
        """The estimates for this job: its latest measured setup is part of
        every boot (a placement, a recovery, a move's replacement)."""
        measured = self.ctx.repo.setup_seconds(job.id)
        return with_setup(self.costs, list(measured.values())[-1] if measured else None)

    def move_costs(self, completed: Sequence[Migration] = (),
                   setups: Mapping[str, float] | None = None) -> MoveCosts:
        """The settings' estimates, replaced by what past moves measured
        (``policy.measured_move_costs``)."""
        return measured_move_costs(completed, setups, self.costs)

    # --- commands -------------------------------------------------------------

    def submit(self, spec: JobSpec, secrets: dict[str, str] | None = None, *,
               confine_to: str | None = None) -> Job:
        """Record a job, refusing what can never run (InvalidRequest naming
        the field): resources no offer in the catalog has, values that cannot
        fit in an instance's boot script, a workdir that was never uploaded.
        ``secrets`` are sealed (``ctx.secretbox``); the spec keeps their names.
        ``confine_to``: the provider whose offers alone the job may use, and
        no other job (``Context.confine``; the demo's)."""
        secrets = dict(secrets or {})
        spec = replace(spec, secret_names=tuple(sorted(secrets)))
        self.validate(spec)
        sealed = None
        if secrets:
            if self.ctx.secretbox is None:
                raise InvalidRequest("secrets", "this control plane has no key to seal secrets")
            sealed = self.ctx.secretbox.seal(secrets)
        job_id = new_id("job")
        if confine_to is not None:  # before the job exists: no pass places it elsewhere
            self.ctx.confine(job_id, confine_to)
        job = self.ctx.repo.create_job(spec, self.ctx.clock.now(), secrets_sealed=sealed,
                                       job_id=job_id)
        self.ctx.metrics.jobs_submitted.inc()
        return job

    def validate(self, spec: JobSpec) -> None:
        """InvalidRequest (naming the field) for a job that can never run."""
        why = fits_catalog(spec.resources, self.ctx.repo.list_offers())
        if why is not None:
            raise InvalidRequest("resources", why)
        problem = job_size_problem(spec.command, spec.setup, dict(spec.envs),
                                   spec.secret_names)
        if problem is not None:
            raise InvalidRequest(*problem)
        if spec.workdir is not None:
            try:
                key = workdir_key(spec.workdir)
            except ValueError as err:
                raise InvalidRequest("workdir", str(err)) from None
            if not self.ctx.store.exists(key):
                raise InvalidRequest("workdir", f"{spec.workdir} was never uploaded "
                                     "(POST /api/v1/workdirs first; the CLI does it)")

    def cancel(self, job_id: str) -> Job:
        job = self.ctx.repo.get_job(job_id)
        if job.status.is_terminal():
            raise Conflict(f"job {job_id} is already {job.status.value}")
        # Only from a live status: of two cancels at once, one wins and the
        # other is told the job is already cancelled. A job that moved on
        # meanwhile (running -> migrating) is cancelled from where it is.
        for _ in range(_CANCEL_TRIES):
            try:
                job = self.ctx.repo.transition(
                    job_id, S.CANCELLED, finished_at=self.ctx.clock.now(),
                    expect={s for s in S if s not in TERMINAL})
                break
            except ConcurrentChange:
                current = self.ctx.repo.get_job(job_id)
                if current.status.is_terminal():
                    raise Conflict(f"job {job_id} is already {current.status.value}") from None
        else:
            raise Conflict(f"job {job_id} kept changing; try again")
        self.ctx.router.switch(job_id, None)
        for instance in self.ctx.repo.list_instances(job_id=job_id, live_only=True):
            self.ctx.terminate(instance.id)
        self.lifecycle.bill(job)
        self.ctx.event(job_id, "cancelled", "cancelled; all its instances terminated")
        self.lifecycle.retain_finished(job)
        return self.ctx.repo.get_job(job_id)

    def migrate(self, job_id: str, target_offer_id: str | None = None, *,
                confirm_dearer: bool = False) -> Migration:
        """A manual move. Without a target: to the offer that saves most per
        work hour, and Conflict when no other offer saves. To a named target
        that costs more per work hour only with ``confirm_dearer`` (Conflict
        naming it otherwise), and only if the projected total stays within
        the job's budget (the budget rule, ``budget_allows``)."""
        job = self.ctx.repo.get_job(job_id)
        if job.status != S.RUNNING:
            raise Conflict(f"job {job_id} is {job.status.value}; only a running job can move")
        # As the job sees them (the policy's one place for it): a CPU-only
        # job's offers are priced by the hour.
        every = self.ctx.offers()
        offers = offers_for(job.spec.resources, self.ctx.scope_offers(job.id, every))
        current = next((o for o in offers if o.id == job.offer_id), None)
        if target_offer_id is not None:
            try:
                target = next(o for o in offers if o.id == target_offer_id)
            except StopIteration:
                if any(o.id == target_offer_id for o in every):
                    raise InvalidRequest(
                        "offer_id", f"offer {target_offer_id} is not open to job {job_id} "
                        "(the demo's offers are for the demo's job alone)") from None
                raise InvalidRequest("offer_id", f"no offer {target_offer_id!r}") from None
            if target.id == job.offer_id:
                raise InvalidRequest("offer_id", "the job already runs on this offer")
            if not target.available:
                raise InvalidRequest("offer_id", f"offer {target.id} is not available")
            if (short := target.shortfall(job.spec.resources)) is not None:
                raise InvalidRequest("offer_id", f"offer {target.id} does not fit the job's "
                                     f"resources: {short}")
        else:
            candidate = (offers.available().compatible(job.spec.resources)
                         .excluding({job.offer_id or ""}).cheapest())
            if candidate is None:
                raise Conflict(f"no other available offer fits job {job_id}")
            if current is not None and (candidate.cost_per_work_hour
                                        >= current.cost_per_work_hour - 1e-9):
                raise Conflict(
                    f"no other offer saves: the cheapest, {candidate.id} at "
                    f"${candidate.cost_per_work_hour:.4f} per work hour, is no cheaper "
                    f"than {current.id} at "
                    f"${current.cost_per_work_hour:.4f}; to move anyway, name the target and "
                    "confirm (CLI: --to OFFER --yes; API: offer_id with confirm_dearer)")
            target = candidate
        savings = _savings(current, target)
        if current is not None and savings < -1e-9:
            if not confirm_dearer:
                raise Conflict(
                    f"{target.id} at ${target.cost_per_work_hour:.4f} per work hour is "
                    f"{_saving_phrase(savings)} than {current.id} at "
                    f"${current.cost_per_work_hour:.4f}; send \"confirm_dearer\": true "
                    "to move anyway")
            if job.spec.budget_usd is not None:
                now = self.ctx.clock.now()
                w = weigh_move(job, current, target, now,
                               view=self._view(job, now, frozenset(), 0),
                               costs=self._job_costs(job), policy=self.policy)
                if not w.budget_ok:
                    raise Conflict(
                        f"moving to {target.id} would raise the projected total to "
                        f"${job.cost_usd + w.expected_usd:.4f} (from "
                        f"${job.cost_usd + w.stay_usd:.4f} staying), over the budget of "
                        f"${job.spec.budget_usd:.4f}")
        migration = self._start_migration(job, target, MigrationReason.MANUAL, savings)
        if migration is None:
            raise Conflict(f"job {job_id} is already migrating")
        return migration

    def interrupt(self, instance_id: str) -> Instance:
        """Deliver a spot interruption notice to an instance, as AWS instance
        metadata would (demos, tests); the next reconcile pass answers it.
        NotFound if unknown; Conflict if it is gone or the provider cannot."""
        instance = self.ctx.repo.get_instance(instance_id)
        if instance.status.is_terminal():
            raise Conflict(f"instance {instance_id} is already {instance.status.value}")
        provider = self.ctx.provider
        if not isinstance(provider, InterruptibleProvider):
            raise Conflict(f"the {provider.name} provider cannot deliver "
                           "interruption notices")
        # Recorded before it is delivered: the reconcile loop may answer the
        # notice before this call returns.
        self.ctx.event(instance.job_id, "interruption_requested",
                       f"interruption notice delivered to {instance_id}",
                       instance_id=instance_id)
        try:
            provider.notify_interruption(instance_id)
        except InstanceNotFound:
            raise Conflict(f"instance {instance_id} is gone") from None
        return self.ctx.repo.get_instance(instance_id)

    def update_offer(self, offer_id: str, *, price_per_hour: float | None = None,
                     available: bool | None = None) -> Offer:
        if not self.feed.manual:
            raise ManualMarketOnly(
                f"the market is {self.feed.name}; offers change only when it is manual")
        if self.ctx.is_reserved(self.ctx.repo.get_offer(offer_id)):
            raise ManualMarketOnly(f"{offer_id} is one of the demo's scripted offers; "
                                   "only its script changes it")
        offer = self.ctx.repo.update_offer(offer_id, self.ctx.clock.now(),
                                           price_per_hour=price_per_hour, available=available)
        self.ctx.event(None, "offer_updated",
                       f"{offer_id}: ${offer.price_per_hour}/h, available={offer.available}",
                       offer_id=offer_id)
        return offer

    def artifact(self, job_id: str, name: str) -> bytes:
        self.ctx.repo.get_job(job_id)
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise InvalidRequest("name", f"bad artifact name {name!r}")
        try:
            return self.ctx.store.get(f"{artifacts_prefix(job_id)}/{name}")
        except ObjectNotFound:
            raise NotFound("artifact", f"{job_id}/{name}") from None

    def log_segments(self, job_id: str) -> list[Segment]:
        """The job's instances in launch order, each with the marker line its
        log starts with: where the job was placed, moved or recovered."""
        self.ctx.repo.get_job(job_id)  # NotFound for an unknown job
        moves = {m.to_instance_id: m for m in self.ctx.repo.list_migrations(job_id=job_id)
                 if m.to_instance_id}
        segments = []
        for n, instance in enumerate(self.ctx.repo.list_instances(job_id=job_id)):
            m = moves.get(instance.id)
            where = f"{instance.id} ({instance.offer_id})"
            if m is None:
                marker = f"-- {'placed' if n == 0 else 'recovered'} on {where} --"
            elif m.status == MigrationStatus.COMPLETED:
                marker = (f"-- moved from {m.from_instance_id} to {where} at step "
                          f"{m.checkpoint_step} --")
            elif m.status == MigrationStatus.IN_PROGRESS:
                marker = f"-- moving from {m.from_instance_id} to {where} --"
            else:
                why = (m.error or "failed").splitlines()[0]
                marker = f"-- move from {m.from_instance_id} to {where} rolled back: {why} --"
            segments.append(Segment(instance.id, marker))
        return segments

    def job_log(self, job_id: str, tail: int | None = None) -> list[str]:
        """One continuous log of the job's setup and command output across
        its instances, with a marker line per placement and move."""
        return read_job_log(self.ctx.store, job_id, self.log_segments(job_id), tail=tail)

    def wait_for_migrations(self, timeout_s: float = 60.0) -> None:
        with self._lock:
            running = list(self._migrations.values())
        for thread in running:
            thread.join(timeout_s)

    # --- internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _isolated(self, job_id: str, what: str) -> Iterator[None]:
        """Contain an unexpected error in one job's part of a pass: logged,
        and recorded as an event on the job (once per distinct message)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - isolation is the point
            message = f"{type(err).__name__}: {err}"
            log.exception("job %s: %s failed", job_id, what)
            if self._last_error.get(job_id) != message:
                self._last_error[job_id] = message
                with contextlib.suppress(Exception):
                    self.ctx.event(job_id, "control_error", f"{what} failed: {message}")

    def _urgent_move(self, job: Job, reason: MigrationReason) -> None:
        """A preemption notice: avoid the zone, checkpoint within the notice
        window (the migration's first act), and move make-before-break to
        the best offer elsewhere. With nowhere to go, or when Uniform
        Progress would rather wait for spot than pay for on-demand (the job
        is ahead of its deadline line), the checkpoint alone is taken: the
        job recovers from it when the instance is gone."""
        current = self.ctx.repo.get_offer(job.offer_id) if job.offer_id else None
        # Answered once per notice, a restart of the control plane included.
        first = job.instance_id is None or self.ctx.first_notice(job.instance_id, "answered")
        if current is not None and current.capacity == Capacity.SPOT and first:
            # Capacity in the zone just reclaimed is unlikely to last, and
            # the offer counts as less steady from now on.
            self.ctx.avoid_zone(zone_key(current))
            self.ctx.capacity_lost(current.id)
        if job.status != S.RUNNING:
            # A move is already under way (it checkpoints at its switch);
            # the notice window may close before that: save now as well.
            if first:
                self.ctx.event(job.id, "interruption",
                               f"{job.instance_id} got a spot interruption notice during a move")
                self._emergency_checkpoint(job)
            return
        offers = [o for o in self.ctx.scope_offers(job.id, self.ctx.offers())
                  if o.id != job.offer_id]
        now = self.ctx.clock.now()
        decision = place_job(job, offers, now, policy=self.policy,
                             view=self._view(job, now, self.ctx.avoided_zones(), 0),
                             costs=self._job_costs(job), leaving=current)
        self.decisions[job.id] = MoveDecision(
            job_id=job.id, move=decision.offer is not None,
            reason=f"interruption notice on {job.instance_id}: {decision.reason}",
            current_offer_id=job.offer_id, target=decision.offer,
            current_cost_per_work_hour=current.cost_per_work_hour if current else None,
            target_cost_per_work_hour=(decision.offer.cost_per_work_hour
                                       if decision.offer else None),
            trigger=Trigger.CAPACITY, decided_at=now,
            remaining_work_hours=decision.remaining_work_hours,
            budget_left_usd=decision.budget_left_usd,
            deadline_slack_s=decision.deadline_slack_s)
        if decision.offer is None:
            if first:
                log.warning("job %s: interruption notice but no offer to move to (%s)",
                            job.id, decision.reason)
                self.ctx.event(job.id, "interruption_wait", decision.reason)
                self._emergency_checkpoint(job)
            return
        self._start_migration(job, decision.offer, reason, 0.0)

    def _emergency_checkpoint(self, job: Job) -> None:
        """Checkpoint without pausing, in the background (the notice window
        is short; the reconcile loop must not wait on it)."""
        if not job.instance_id:
            return
        address = self.ctx.repo.get_instance(job.instance_id).address
        if not address:
            return

        def run() -> None:
            try:
                result = self.ctx.agents.checkpoint(address, pause=False,
                                                    timeout_s=self.ctx.timeouts.checkpoint_s)
                self.ctx.event(job.id, "emergency_checkpoint",
                               f"checkpointed step {result.step} after the interruption notice",
                               step=result.step)
            except Exception as err:  # the last verified checkpoint still stands
                log.warning("job %s: emergency checkpoint failed: %s", job.id, err)

        threading.Thread(target=run, name=f"gpuscout-checkpoint-{job.id}", daemon=True).start()

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
