"""SQLAlchemy 2 tables. The schema itself is owned by the Alembic migrations
in ``db/migrations``; these classes must match them (a test checks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class OfferRow(Base):
    __tablename__ = "offers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider: Mapped[str] = mapped_column(String(40))
    region: Mapped[str] = mapped_column(String(60))
    zone: Mapped[str] = mapped_column(String(60))
    instance_type: Mapped[str] = mapped_column(String(60))
    capacity: Mapped[str] = mapped_column(String(20))
    gpus: Mapped[int] = mapped_column(Integer)
    gpu_type: Mapped[str | None] = mapped_column(String(40))
    vcpus: Mapped[float] = mapped_column(Float)
    memory_gb: Mapped[float] = mapped_column(Float)
    price_per_hour: Mapped[float] = mapped_column(Float)
    available: Mapped[bool] = mapped_column(Boolean)
    relative_speed: Mapped[float] = mapped_column(Float, default=1.0)
    updated_at: Mapped[datetime]


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), index=True)
    offer_id: Mapped[str | None] = mapped_column(String(200))
    instance_id: Mapped[str | None] = mapped_column(String(40))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    baseline_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    baseline_price_per_hour: Mapped[float | None] = mapped_column(Float)
    cost_updated_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    last_migration_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    launch_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The secret values, sealed (gpuscout.secretbox); never in clear text.
    secrets_sealed: Mapped[str | None] = mapped_column(Text)


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    offer_id: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), index=True)
    address: Mapped[str | None] = mapped_column(String(200))
    provider_ref: Mapped[str | None] = mapped_column(String(200))
    # The instance's own bearer token for its agent's API (never shown).
    agent_token: Mapped[str | None] = mapped_column(String(100))
    price_per_hour: Mapped[float] = mapped_column(Float)  # at launch
    # Billing accrues at the offer's current price (spot prices move).
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    billed_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    ready_at: Mapped[datetime | None]
    terminated_at: Mapped[datetime | None]
    # How long the job's setup ran here, before the agent was ready (seconds).
    setup_s: Mapped[float | None] = mapped_column(Float)


class MigrationRow(Base):
    __tablename__ = "migrations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    phase: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(String(20))
    from_instance_id: Mapped[str] = mapped_column(String(40))
    to_instance_id: Mapped[str | None] = mapped_column(String(40))
    from_offer_id: Mapped[str] = mapped_column(String(200))
    to_offer_id: Mapped[str] = mapped_column(String(200))
    expected_savings: Mapped[float] = mapped_column(Float, default=0.0)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    resume_step: Mapped[int | None] = mapped_column(Integer)
    downtime_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime]
    replacement_ready_at: Mapped[datetime | None]
    checkpointed_at: Mapped[datetime | None]
    resumed_at: Mapped[datetime | None]
    switched_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_time", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(40))
    time: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class SampleRow(Base):
    """A point of a live job's history, for its charts: progress, cost, and
    its cost per work hour against the best available offer's, recorded by
    the control plane when they move (``ControlPlane.record_history``)."""

    __tablename__ = "job_samples"
    __table_args__ = (Index("ix_job_samples_job_time", "job_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40))
    time: Mapped[datetime]
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)
    cost_per_work_hour: Mapped[float | None] = mapped_column(Float)
    best_cost_per_work_hour: Mapped[float | None] = mapped_column(Float)
    best_offer_id: Mapped[str | None] = mapped_column(String(200))


class MemoryRow(Base):
    """What the control plane learnt that must outlive its process (read
    back at start, ``Context.load_memory``): a zone or offer to avoid until a
    time, an interruption notice already answered, the offers a job is
    confined to. ``kind`` says which; ``name`` is what it is about (a zone
    key, an offer, an instance, a job); ``until`` is when it is forgotten
    (None: kept)."""

    __tablename__ = "plane_memory"

    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text)
    until: Mapped[datetime | None]
    created_at: Mapped[datetime]
