"""What changed, for the dashboard's live stream (``GET /api/v1/stream``).

The control plane has no change notifier: its loops, the migration threads
and the API all write to the database. So one ``LiveFeed`` per app reads the
cheapest true sources every ``tick_s`` (0.5 s) while at least one page is
subscribed (and ``LINGER_S`` after the last one leaves):

- jobs: one narrow select of the columns that change (status, placement,
  progress, cost, error); only the jobs whose columns changed are read whole;
- migrations: the repository's list (a handful per job), compared by value;
- events: the events table after the last id seen (ids only grow, so they
  are also the stream's ``Last-Event-ID``);
- offers: ``ctx.offers()``, the market as the scout sees it (what
  ``GET /offers`` answers), compared by price, availability and loss rate;
- decisions: the scout's latest decision per job, kept in memory.

Each tick's changes go to every subscriber as a few batched messages (one
per kind), so 500 jobs changing at once are one message, not 500. The feed
also keeps, in memory, each live job's recent history (step, loss, cost, its
cost per work hour and the best available offer's) at a finer grain than the
points the control plane records for the whole run (``record_history``,
every 30 s or on a price move): the job page charts both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from gpuscout.api.schemas import (
    DecisionPublic,
    EventPublic,
    JobPublic,
    MigrationPublic,
    OfferPublic,
)
from gpuscout.clock import utc
from gpuscout.db import Event
from gpuscout.db.tables import EventRow, JobRow
from gpuscout.domain import Job, JobStatus, Migration, Offer
from gpuscout.policy import MoveDecision
from gpuscout.service import Service

log = logging.getLogger("gpuscout.api.live")

TICK_S = 0.5
LINGER_S = 60.0  # the feed keeps reading this long after the last page left
HISTORY_POINTS = 3000  # per job, oldest dropped first
MAX_TRACKED_JOBS = 2000  # beyond: the histories updated longest ago are dropped
SAMPLE_S = 1.0  # at most one history point per job per this, unless its price moved
QUEUE_SIZE = 1000  # messages a slow page may fall behind by before it is dropped
REPLAY_EVENTS = 500  # events sent again after a reconnect with Last-Event-ID

# The columns of a job that change while it lives.
_JOB_COLUMNS = (JobRow.id, JobRow.status, JobRow.offer_id, JobRow.instance_id, JobRow.step,
                JobRow.total_steps, JobRow.loss, JobRow.cost_usd, JobRow.baseline_cost_usd,
                JobRow.error, JobRow.restarts, JobRow.started_at, JobRow.finished_at,
                JobRow.last_migration_at)
_LIVE = frozenset(s for s in JobStatus if not s.is_terminal())


@dataclass
class Message:
    """One server-sent event: its type, a JSON-able body, and for events
    the id a reconnecting page sends back (Last-Event-ID)."""

    event: str
    data: Any
    id: str | None = None


@dataclass
class _Track:
    """One job's history for its charts."""

    points: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    last_sample: float = 0.0
    last_key: tuple[Any, ...] | None = None


def event_json(e: Event) -> dict[str, Any]:
    return EventPublic.from_domain(e).model_dump(mode="json")


class LiveFeed:
    """Reads what changed and fans it out to the subscribed pages' queues.
    All its state is touched by one tick at a time (``_tick`` runs in a
    worker thread, awaited by the one reading task)."""

    def __init__(self, service: Service, tick_s: float = TICK_S) -> None:
        self.service = service
        self.tick_s = tick_s
        self._subscribers: set[asyncio.Queue[Message | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()
        self._jobs: dict[str, tuple[Any, ...]] = {}
        self._specs: dict[str, Job] = {}
        self._migrations: dict[str, Migration] = {}
        self._offers: dict[str, tuple[Any, ...]] = {}
        self._decisions: dict[str, MoveDecision] = {}
        self._last_event_id = 0
        self._tracks: dict[str, _Track] = {}
        self._tracks_lock = threading.Lock()  # history() reads from other threads
        self.last_event_id = 0  # as of the latest tick, for the hello message

    # --- subscribers ------------------------------------------------------------

    async def subscribe(self) -> asyncio.Queue[Message | None]:
        """A queue of the changes from now on. The first subscriber starts
        the reading task, after a first read that sets what "changed" means,
        so that a page that loads the lists after subscribing misses
        nothing."""
        async with self._started:
            if self._task is None or self._task.done():
                await run_in_threadpool(self._baseline)
                self._task = asyncio.create_task(self._run(), name="gpuscout-live-feed")
        queue: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message | None]) -> None:
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def _run(self) -> None:
        idle_since: float | None = None
        while True:
            await asyncio.sleep(self.tick_s)
            if self._subscribers:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > LINGER_S:
                return  # the next subscriber starts afresh (a new baseline)
            try:
                messages = await run_in_threadpool(self._tick)
            except Exception:  # a database hiccup: say so, try again next tick
                log.exception("live feed: reading the changes failed")
                continue
            for queue in list(self._subscribers):
                for message in messages:
                    try:
                        queue.put_nowait(message)
                    except asyncio.QueueFull:
                        # A page that does not read: drop it (None ends its
                        # stream once it reads again); its EventSource
                        # reconnects and reloads.
                        self._subscribers.discard(queue)
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.get_nowait()
                            queue.put_nowait(None)
                        break

    # --- reading --------------------------------------------------------------------

    def _baseline(self) -> None:
        self._jobs = self._job_columns()
        self._specs = {j.id: j for j in self.service.repo.list_jobs(list(_LIVE))}
        self._migrations = {m.id: m for m in self.service.repo.list_migrations()}
        self._offers = {o.id: _offer_key(o) for o in self.service.plane.ctx.offers()}
        self._decisions = dict(self.service.plane.decisions)
        with self.service.repo.session() as s:
            last = s.scalar(select(EventRow.id).order_by(EventRow.id.desc()).limit(1))
        self._last_event_id = self.last_event_id = last or 0

    def _job_columns(self) -> dict[str, tuple[Any, ...]]:
        with self.service.repo.session() as s:
            return {row[0]: tuple(row) for row in s.execute(select(*_JOB_COLUMNS))}

    def _tick(self) -> list[Message]:
        messages: list[Message] = []
        repo, plane = self.service.repo, self.service.plane

        # Jobs: the narrow columns first, the changed jobs whole.
        columns = self._job_columns()
        changed = [i for i, key in columns.items() if self._jobs.get(i) != key]
        self._jobs = columns
        jobs: list[Job] = []
        if len(changed) > 50:
            wanted = set(changed)
            jobs = [j for j in repo.list_jobs() if j.id in wanted]
        else:
            for job_id in changed:
                with contextlib.suppress(Exception):  # deleted meanwhile
                    jobs.append(repo.get_job(job_id))
        for job in jobs:
            if job.status.is_terminal():
                self._specs.pop(job.id, None)
            else:
                self._specs[job.id] = job
        if jobs:
            messages.append(Message("jobs", [JobPublic.from_domain(j).model_dump(mode="json")
                                             for j in jobs]))

        # Migrations: few, compared by value.
        migrations = {m.id: m for m in repo.list_migrations()}
        moved = [m for i, m in migrations.items() if self._migrations.get(i) != m]
        self._migrations = migrations
        if moved:
            messages.append(Message("migrations", [
                MigrationPublic.from_domain(m).model_dump(mode="json") for m in moved]))

        # Events: after the last id seen.
        events = self.events_after(self._last_event_id, limit=REPLAY_EVENTS)
        if events:
            self._last_event_id = self.last_event_id = events[-1]["id"]
            messages.append(Message("events", events, id=str(self._last_event_id)))

        # Offers, as GET /offers shows them.
        offers = plane.ctx.offers()
        keys = {o.id: _offer_key(o) for o in offers}
        repriced = [o for o in offers if self._offers.get(o.id) != keys[o.id]]
        self._offers = keys
        if repriced:
            messages.append(Message("offers", [OfferPublic.from_domain(o).model_dump(mode="json")
                                               for o in repriced]))

        # The scout's decisions (replaced each pass; compared by identity).
        decisions = dict(plane.decisions)
        decided = [d for j, d in decisions.items() if self._decisions.get(j) is not d]
        self._decisions = decisions
        if decided:
            messages.append(Message("decisions", [
                DecisionPublic.from_domain(d).model_dump(mode="json") for d in decided]))

        samples = self._sample(offers, market_moved=bool(repriced))
        if samples:
            messages.append(Message("samples", samples))
        return messages

    def events_after(self, after_id: int, limit: int = REPLAY_EVENTS) -> list[dict[str, Any]]:
        with self.service.repo.session() as s:
            rows = list(s.scalars(select(EventRow).where(EventRow.id > after_id)
                                  .order_by(EventRow.id).limit(limit)))
            events = [Event(id=r.id, job_id=r.job_id, time=utc(r.time),  # type: ignore[arg-type]
                            kind=r.kind,
                            message=r.message, data=r.data) for r in rows]
        return [event_json(e) for e in events]

    # --- history --------------------------------------------------------------------

    def _sample(self, offers: list[Offer], *, market_moved: bool) -> list[dict[str, Any]]:
        """A point for each live job whose progress, cost or prices moved
        (at most one per SAMPLE_S for progress alone)."""
        now = time.time()
        live = [job for job in self._specs.values()
                if job.status in (JobStatus.RUNNING, JobStatus.MIGRATING, JobStatus.RECOVERING)
                and job.id in self._jobs]
        markets = self.service.plane.job_markets(live, offers)
        out = []
        for job in live:
            job_id, columns = job.id, self._jobs[job.id]
            current, best = markets[job_id]
            point = {
                "t": round(now, 3), "step": columns[4], "loss": columns[6],
                "cost_usd": columns[7],
                "cost_per_work_hour": current.cost_per_work_hour if current else None,
                "best_cost_per_work_hour": best.cost_per_work_hour if best else None,
                "best_offer_id": best.id if best else None,
            }
            seen_as = (point["step"], point["cost_usd"], point["cost_per_work_hour"],
                       point["best_cost_per_work_hour"], job.offer_id)
            with self._tracks_lock:
                track = self._tracks.get(job_id)
                if track is None:
                    if len(self._tracks) >= MAX_TRACKED_JOBS:
                        stale = min(self._tracks, key=lambda j: self._tracks[j].last_sample)
                        del self._tracks[stale]
                    track = self._tracks[job_id] = _Track()
            if seen_as == track.last_key:
                continue
            prices_moved = (track.last_key is None or market_moved
                            or track.last_key[2:] != seen_as[2:])
            if not prices_moved and now - track.last_sample < SAMPLE_S:
                continue
            track.last_key, track.last_sample = seen_as, now
            with self._tracks_lock:
                track.points.append(point)
            out.append({"job_id": job_id, **point})
        return out

    def history(self, job_id: str) -> list[dict[str, Any]]:
        with self._tracks_lock:
            track = self._tracks.get(job_id)
            return list(track.points) if track else []


def _offer_key(o: Offer) -> tuple[Any, ...]:
    return (o.price_per_hour, o.available, o.interruptions_per_day, o.relative_speed)
