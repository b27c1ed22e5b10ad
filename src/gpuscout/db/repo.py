"""The data layer: domain values in, domain values out. No HTTP here.

Every write is its own short transaction, so a state change is durable
before the caller performs the side effect it announces. Job status changes
are compare-and-set (``transition``), so two controllers racing on one job
(a cancel and a migration, say) cannot both win.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gpuscout.clock import utc
from gpuscout.db.tables import (
    EventRow,
    InstanceRow,
    JobRow,
    MemoryRow,
    MigrationRow,
    OfferRow,
    SampleRow,
)
from gpuscout.domain import (
    Capacity,
    Instance,
    InstanceStatus,
    Job,
    JobSpec,
    JobStatus,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    Offer,
    Progress,
    check_transition,
)
from gpuscout.domain.serde import spec_from_dict, spec_to_dict


class NotFound(LookupError):
    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident} not found")
        self.kind = kind
        self.ident = ident


class ConcurrentChange(RuntimeError):
    """The row changed between read and write (a lost compare-and-set)."""


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    job_id: str | None
    time: datetime
    kind: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Sample:
    """A point of a job's history (``job_samples``): at ``time``, ``step``
    steps done, its loss, its cost so far (USD), its offer's cost per work
    hour and the best available offer's (USD per work hour)."""

    job_id: str
    time: datetime
    step: int
    loss: float | None
    cost_usd: float
    cost_per_work_hour: float | None
    best_cost_per_work_hour: float | None
    best_offer_id: str | None


_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))


@dataclass(frozen=True, slots=True)
class Memory:
    """One thing the control plane learnt (``Repository.remember``)."""

    kind: str
    name: str
    value: str | None
    until: datetime | None  # forgotten from then on; None: kept
    created_at: datetime


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- row <-> value ---------------------------------------------------------


# The Offer fields the offers table keeps (the others are seen, not stored:
# interruptions per day, the price's recent moves): a field added to both
# needs no mapping here.
_OFFER_COLUMNS = tuple(f.name for f in dataclasses.fields(Offer)
                       if f.name in OfferRow.__table__.columns)


def _offer(row: OfferRow) -> Offer:
    values = {name: getattr(row, name) for name in _OFFER_COLUMNS}
    return Offer(**{**values, "capacity": Capacity(row.capacity)})


def _job(row: JobRow) -> Job:
    return Job(
        id=row.id, spec=spec_from_dict(row.spec), status=JobStatus(row.status),
        created_at=utc(row.created_at),  # type: ignore[arg-type]
        offer_id=row.offer_id, instance_id=row.instance_id,
        progress=Progress(step=row.step, total_steps=row.total_steps, loss=row.loss),
        cost_usd=row.cost_usd, baseline_cost_usd=row.baseline_cost_usd,
        started_at=utc(row.started_at), finished_at=utc(row.finished_at),
        last_migration_at=utc(row.last_migration_at), error=row.error,
        restarts=row.restarts or 0,
    )


def _instance(row: InstanceRow) -> Instance:
    return Instance(
        id=row.id, job_id=row.job_id, offer_id=row.offer_id, provider=row.provider,
        status=InstanceStatus(row.status), address=row.address, provider_ref=row.provider_ref,
        created_at=utc(row.created_at), terminated_at=utc(row.terminated_at),
    )


def _migration(row: MigrationRow) -> Migration:
    return Migration(
        id=row.id, job_id=row.job_id, status=MigrationStatus(row.status),
        phase=MigrationPhase(row.phase), reason=MigrationReason(row.reason),
        from_instance_id=row.from_instance_id, from_offer_id=row.from_offer_id,
        to_offer_id=row.to_offer_id, to_instance_id=row.to_instance_id,
        expected_savings=row.expected_savings, checkpoint_step=row.checkpoint_step,
        resume_step=row.resume_step, downtime_s=row.downtime_s, error=row.error,
        started_at=utc(row.started_at), replacement_ready_at=utc(row.replacement_ready_at),
        checkpointed_at=utc(row.checkpointed_at), resumed_at=utc(row.resumed_at),
        switched_at=utc(row.switched_at), finished_at=utc(row.finished_at),
    )


class Repository:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- offers ------------------------------------------------------------

    def seed_offers(self, offers: Iterable[Offer], now: datetime, *, overwrite: bool) -> None:
        """Insert offers that are missing; with ``overwrite`` also refresh
        existing ones (a price feed). A manual market seeds without overwrite
        so that prices a user set survive a restart."""
        with self.session() as s:
            for offer in offers:
                row = s.get(OfferRow, offer.id)
                if row is None:
                    s.add(OfferRow(**_offer_fields(offer), updated_at=now))
                elif overwrite:
                    for key, value in _offer_fields(offer).items():
                        setattr(row, key, value)
                    row.updated_at = now

    def list_offers(self) -> list[Offer]:
        with self.session() as s:
            return [_offer(r) for r in s.scalars(select(OfferRow).order_by(OfferRow.id))]

    def get_offer(self, offer_id: str) -> Offer:
        with self.session() as s:
            row = s.get(OfferRow, offer_id)
            if row is None:
                raise NotFound("offer", offer_id)
            return _offer(row)

    def update_offer(
        self, offer_id: str, now: datetime, *, price_per_hour: float | None = None,
        available: bool | None = None,
    ) -> Offer:
        with self.session() as s:
            row = s.get(OfferRow, offer_id)
            if row is None:
                raise NotFound("offer", offer_id)
            if price_per_hour is not None:
                row.price_per_hour = price_per_hour
            if available is not None:
                row.available = available
            row.updated_at = now
            return _offer(row)

    # --- jobs --------------------------------------------------------------

    def create_job(self, spec: JobSpec, now: datetime, *,
                   secrets_sealed: str | None = None, job_id: str | None = None) -> Job:
        """Record a submitted job (and its sealed secrets, in the same write)."""
        job_id = job_id or new_id("job")
        with self.session() as s:
            s.add(JobRow(id=job_id, name=spec.name, spec=spec_to_dict(spec),
                         status=JobStatus.PENDING.value, created_at=now,
                         secrets_sealed=secrets_sealed))
            s.add(EventRow(job_id=job_id, time=now, kind="submitted",
                           message=f"job {spec.name!r} submitted", data=None))
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound("job", job_id)
            return _job(row)

    def list_jobs(self, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        query = select(JobRow).order_by(JobRow.created_at, JobRow.id)
        if statuses is not None:
            query = query.where(JobRow.status.in_([s.value for s in statuses]))
        with self.session() as s:
            return [_job(r) for r in s.scalars(query)]

    def transition(
        self, job_id: str, target: JobStatus, *, expect: Iterable[JobStatus] | None = None,
        **fields: Any,
    ) -> Job:
        """Move a job to ``target`` if legal (and, with ``expect``, only from
        one of those states), setting ``fields`` in the same write."""
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound("job", job_id)
            current = JobStatus(row.status)
            if expect is not None and current not in set(expect):
                raise ConcurrentChange(
                    f"job {job_id} is {current.value}, expected one of "
                    f"{sorted(e.value for e in expect)}"
                )
            if current != target:
                check_transition(current, target)
            result = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == current.value)
                .values(status=target.value, **fields)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise ConcurrentChange(f"job {job_id} changed while moving to {target.value}")
        return self.get_job(job_id)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set non-status fields (progress, cost) of a job."""
        if "status" in fields:
            raise ValueError("use transition() to change a job's status")
        with self.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**fields))

    def job_row_fields(self, job_id: str, *names: str) -> dict[str, Any]:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound("job", job_id)
            return {n: getattr(row, n) for n in names}

    # --- instances ---------------------------------------------------------

    def add_instance(self, instance: Instance, price_per_hour: float, now: datetime,
                     agent_token: str | None = None) -> None:
        with self.session() as s:
            s.add(InstanceRow(
                id=instance.id, job_id=instance.job_id, offer_id=instance.offer_id,
                provider=instance.provider, status=instance.status.value,
                address=instance.address, provider_ref=instance.provider_ref,
                price_per_hour=price_per_hour, created_at=now, billed_until=now,
                agent_token=agent_token,
            ))

    def agent_tokens(self) -> dict[str, str]:
        """address -> agent token of every live instance."""
        dead = [InstanceStatus.TERMINATED.value, InstanceStatus.FAILED.value]
        query = select(InstanceRow.address, InstanceRow.agent_token).where(
            InstanceRow.status.not_in(dead))
        with self.session() as s:
            return {a: t for a, t in s.execute(query) if a and t}

    def update_instance(self, instance_id: str, **fields: Any) -> None:
        if isinstance(fields.get("status"), InstanceStatus):
            fields["status"] = fields["status"].value
        with self.session() as s:
            s.execute(update(InstanceRow).where(InstanceRow.id == instance_id).values(**fields))

    def bill_instance(self, instance_id: str, now: datetime) -> None:
        """Accrue a live instance's cost up to ``now`` at its offer's current
        price (spot prices move while it runs)."""
        with self.session() as s:
            row = s.get(InstanceRow, instance_id)
            if row is None or InstanceStatus(row.status).is_terminal():
                return
            since = utc(row.billed_until) or utc(row.created_at)
            assert since is not None
            offer = s.get(OfferRow, row.offer_id)
            price = offer.price_per_hour if offer is not None else row.price_per_hour
            hours = max(0.0, (now - since).total_seconds()) / 3600.0
            row.cost_usd = (row.cost_usd or 0.0) + price * hours
            row.billed_until = now

    def job_instance_cost(self, job_id: str) -> float:
        with self.session() as s:
            rows = s.scalars(select(InstanceRow.cost_usd).where(InstanceRow.job_id == job_id))
            return float(sum(c or 0.0 for c in rows))

    def setup_seconds(self, job_id: str | None = None) -> dict[str, float]:
        """How long the job's setup ran on each instance that measured it
        (instance id -> seconds), in launch order."""
        query = (select(InstanceRow.id, InstanceRow.setup_s)
                 .where(InstanceRow.setup_s.is_not(None))
                 .order_by(InstanceRow.created_at, InstanceRow.id))
        if job_id is not None:
            query = query.where(InstanceRow.job_id == job_id)
        with self.session() as s:
            return {row.id: float(row.setup_s) for row in s.execute(query)}

    def get_instance(self, instance_id: str) -> Instance:
        with self.session() as s:
            row = s.get(InstanceRow, instance_id)
            if row is None:
                raise NotFound("instance", instance_id)
            return _instance(row)

    def instance_price(self, instance_id: str) -> float:
        with self.session() as s:
            row = s.get(InstanceRow, instance_id)
            if row is None:
                raise NotFound("instance", instance_id)
            return row.price_per_hour

    def list_instances(
        self, *, job_id: str | None = None, live_only: bool = False
    ) -> list[Instance]:
        query = select(InstanceRow).order_by(InstanceRow.created_at, InstanceRow.id)
        if job_id is not None:
            query = query.where(InstanceRow.job_id == job_id)
        if live_only:
            dead = [InstanceStatus.TERMINATED.value, InstanceStatus.FAILED.value]
            query = query.where(InstanceRow.status.not_in(dead))
        with self.session() as s:
            return [_instance(r) for r in s.scalars(query)]

    # --- migrations --------------------------------------------------------

    def add_migration(self, migration: Migration) -> None:
        with self.session() as s:
            s.add(MigrationRow(
                id=migration.id, job_id=migration.job_id, status=migration.status.value,
                phase=migration.phase.value, reason=migration.reason.value,
                from_instance_id=migration.from_instance_id,
                to_instance_id=migration.to_instance_id,
                from_offer_id=migration.from_offer_id, to_offer_id=migration.to_offer_id,
                expected_savings=migration.expected_savings, started_at=migration.started_at,
            ))

    def update_migration(self, migration_id: str, **fields: Any) -> Migration:
        for key in ("status", "phase"):
            if hasattr(fields.get(key), "value"):
                fields[key] = fields[key].value
        with self.session() as s:
            s.execute(update(MigrationRow).where(MigrationRow.id == migration_id).values(**fields))
        return self.get_migration(migration_id)

    def get_migration(self, migration_id: str) -> Migration:
        with self.session() as s:
            row = s.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound("migration", migration_id)
            return _migration(row)

    def list_migrations(
        self, *, job_id: str | None = None, status: MigrationStatus | None = None
    ) -> list[Migration]:
        query = select(MigrationRow).order_by(MigrationRow.started_at, MigrationRow.id)
        if job_id is not None:
            query = query.where(MigrationRow.job_id == job_id)
        if status is not None:
            query = query.where(MigrationRow.status == status.value)
        with self.session() as s:
            return [_migration(r) for r in s.scalars(query)]

    # --- events ------------------------------------------------------------

    def add_event(
        self, job_id: str | None, kind: str, message: str, now: datetime,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.session() as s:
            s.add(EventRow(job_id=job_id, time=now, kind=kind, message=message, data=data))

    def add_samples(self, samples: Iterable[Sample]) -> None:
        with self.session() as s:
            s.add_all(SampleRow(**{name: getattr(x, name) for name in _SAMPLE_FIELDS})
                      for x in samples)

    def list_samples(self, job_id: str, limit: int = 5000) -> list[Sample]:
        """The job's history, oldest first (the newest ``limit`` points)."""
        query = (select(SampleRow).where(SampleRow.job_id == job_id)
                 .order_by(SampleRow.id.desc()).limit(limit))
        with self.session() as s:
            rows = list(s.scalars(query))
        return [Sample(**{**{name: getattr(r, name) for name in _SAMPLE_FIELDS},
                          "time": utc(r.time)}) for r in reversed(rows)]

    def list_events(self, job_id: str | None = None, limit: int = 500,
                    kind: str | None = None) -> list[Event]:
        query = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
        if job_id is not None:
            query = query.where(EventRow.job_id == job_id)
        if kind is not None:
            query = query.where(EventRow.kind == kind)
        with self.session() as s:
            rows = list(s.scalars(query))
        return [
            Event(id=r.id, job_id=r.job_id, time=utc(r.time),  # type: ignore[arg-type]
                  kind=r.kind, message=r.message, data=r.data)
            for r in reversed(rows)
        ]

    # --- what the control plane learnt --------------------------------------------

    def remember(self, kind: str, name: str, now: datetime, *, until: datetime | None = None,
                 value: str | None = None) -> None:
        """Record (or replace) what the control plane learnt about ``name``;
        ``until``: when it is forgotten (None: kept)."""
        for attempt in range(2):
            try:
                with self.session() as s:
                    row = s.get(MemoryRow, (kind, name))
                    if row is None:
                        s.add(MemoryRow(kind=kind, name=name, value=value, until=until,
                                        created_at=now))
                    else:
                        row.value, row.until = value, until
                return
            except IntegrityError:  # inserted meanwhile by another thread: update it
                if attempt:
                    raise

    def recall(self, now: datetime, kind: str | None = None) -> list[Memory]:
        """What is still remembered at ``now`` (of ``kind``, or all)."""
        query = select(MemoryRow).order_by(MemoryRow.kind, MemoryRow.name)
        if kind is not None:
            query = query.where(MemoryRow.kind == kind)
        with self.session() as s:
            rows = [Memory(kind=r.kind, name=r.name, value=r.value, until=utc(r.until),
                           created_at=utc(r.created_at))  # type: ignore[arg-type]
                    for r in s.scalars(query)]
        return [m for m in rows if m.until is None or m.until > now]

    def forget_expired(self, now: datetime) -> int:
        """Delete what expired by ``now``; how many were deleted. (Compared
        here, not in SQL: SQLite keeps these times without their zone.)"""
        with self.session() as s:
            expired = [(r.kind, r.name) for r in s.scalars(
                select(MemoryRow).where(MemoryRow.until.is_not(None)))
                if (utc(r.until) or now) <= now]
            for kind, name in expired:
                s.execute(delete(MemoryRow).where(MemoryRow.kind == kind,
                                                  MemoryRow.name == name))
        return len(expired)


def _offer_fields(offer: Offer) -> dict[str, Any]:
    values = {name: getattr(offer, name) for name in _OFFER_COLUMNS}
    return {**values, "capacity": offer.capacity.value}
