"""The JSON shapes of the REST API: one pydantic schema per purpose.

Inputs (``JobCreate``, ``OfferUpdate``, ``MigrateRequest``) forbid unknown
fields and validate every bound, so bad input is a 422 that names the field
before anything is written. Outputs (``*Public``) are built from the domain
values with ``from_domain``; list endpoints answer ``{"data": [...], "count": N}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpuscout.db import Event
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
    OnBudget,
    WorkloadType,
)

# Jobs, input: JobCreate and ResourcesIn live in domain/jobinput.py, the one
# validation of a job, shared with the CLI's job files (submit, plan) and the
# simulator's jobs files.
from gpuscout.domain.jobinput import InputModel as _Input
from gpuscout.domain.jobinput import JobCreate as JobCreate
from gpuscout.domain.jobinput import ResourcesIn as ResourcesIn
from gpuscout.policy import MoveDecision

# --- jobs: output -----------------------------------------------------------


class ResourcesPublic(BaseModel):
    gpus: int
    gpu_type: str | list[str] | None
    cpus: float
    memory_gb: float
    capacity: Capacity | None
    instance_type: str | None
    region: str | None
    zone: str | None


class JobSpecPublic(BaseModel):
    """The spec as submitted, echoed back."""

    name: str
    command: str
    model: str
    dataset_size_gb: float
    workload_type: WorkloadType
    expected_duration_hours: float
    budget_usd: float | None
    on_budget: OnBudget
    deadline: datetime | None
    resources: ResourcesPublic
    workdir: str | None
    setup: str | None
    envs: dict[str, str]
    secrets: list[str] = Field(description="the names of the job's secrets (never values)")
    max_restarts_on_errors: int
    checkpoint_keep: int
    checkpoint_keep_finished: int
    savings_threshold: float | None
    scout_interval_s: float | None

    @classmethod
    def from_domain(cls, spec: JobSpec) -> JobSpecPublic:
        r = spec.resources
        return cls(
            name=spec.name, command=spec.command, model=spec.model,
            dataset_size_gb=spec.dataset_size_gb, workload_type=spec.workload_type,
            expected_duration_hours=spec.expected_duration_hours, budget_usd=spec.budget_usd,
            on_budget=spec.on_budget, deadline=spec.deadline,
            resources=ResourcesPublic(
                gpus=r.gpus, gpu_type=list(r.gpu_types) if r.gpu_types else r.gpu_type,
                cpus=r.cpus, memory_gb=r.memory_gb, capacity=r.capacity,
                instance_type=r.instance_type, region=r.region, zone=r.zone),
            workdir=spec.workdir, setup=spec.setup, envs=dict(spec.envs),
            secrets=list(spec.secret_names),
            max_restarts_on_errors=spec.max_restarts_on_errors,
            checkpoint_keep=spec.checkpoint_keep,
            checkpoint_keep_finished=spec.checkpoint_keep_finished,
            savings_threshold=spec.savings_threshold, scout_interval_s=spec.scout_interval_s,
        )


class ProgressPublic(BaseModel):
    step: int
    total_steps: int | None
    loss: float | None


class JobPublic(BaseModel):
    id: str
    name: str
    status: JobStatus
    offer_id: str | None
    instance_id: str | None
    progress: ProgressPublic
    cost_usd: float
    savings_usd: float = Field(
        description="what the job would have cost on its first offer, less what it cost")
    baseline_cost_usd: float
    endpoint: str = Field(description="the job's stable URL path (the user proxy)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_migration_at: datetime | None
    error: str | None
    restarts: int = Field(description="restarts after the command failed "
                                      "(spec.max_restarts_on_errors)")
    spec: JobSpecPublic

    @classmethod
    def from_domain(cls, job: Job) -> JobPublic:
        p = job.progress
        return cls(
            id=job.id, name=job.spec.name, status=job.status, offer_id=job.offer_id,
            instance_id=job.instance_id,
            progress=ProgressPublic(step=p.step, total_steps=p.total_steps, loss=p.loss),
            cost_usd=job.cost_usd, savings_usd=job.savings_usd,
            baseline_cost_usd=job.baseline_cost_usd, endpoint=endpoint_path(job.id),
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            last_migration_at=job.last_migration_at, error=job.error, restarts=job.restarts,
            spec=JobSpecPublic.from_domain(job.spec),
        )


def endpoint_path(job_id: str) -> str:
    """The job's stable endpoint, served by routing.proxy."""
    return f"/endpoints/{job_id}/"


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


# --- migrations ---------------------------------------------------------------


class MigrateRequest(_Input):
    """The optional body of ``POST /jobs/{id}/migrate``."""

    offer_id: str | None = Field(
        default=None,
        description="target offer; if omitted, the offer that saves most per work hour "
                    "(409 when none saves)")
    confirm_dearer: bool = Field(
        default=False, strict=True,
        description="move to offer_id even though it costs more per work hour "
                    "(409 without it)")


class MigrationPublic(BaseModel):
    id: str
    job_id: str
    status: MigrationStatus
    phase: MigrationPhase
    reason: MigrationReason
    from_instance_id: str
    to_instance_id: str | None
    from_offer_id: str
    to_offer_id: str
    expected_savings: float = Field(description="fraction of the current cost per work hour")
    checkpoint_step: int | None
    resume_step: int | None
    downtime_s: float | None = Field(
        description="last step on the old instance to first step on the new")
    error: str | None
    started_at: datetime | None
    replacement_ready_at: datetime | None
    checkpointed_at: datetime | None
    resumed_at: datetime | None
    switched_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_domain(cls, m: Migration) -> MigrationPublic:
        return cls(
            id=m.id, job_id=m.job_id, status=m.status, phase=m.phase, reason=m.reason,
            from_instance_id=m.from_instance_id, to_instance_id=m.to_instance_id,
            from_offer_id=m.from_offer_id, to_offer_id=m.to_offer_id,
            expected_savings=m.expected_savings, checkpoint_step=m.checkpoint_step,
            resume_step=m.resume_step, downtime_s=m.downtime_s, error=m.error,
            started_at=m.started_at, replacement_ready_at=m.replacement_ready_at,
            checkpointed_at=m.checkpointed_at, resumed_at=m.resumed_at,
            switched_at=m.switched_at, finished_at=m.finished_at,
        )


class MigrationsPublic(BaseModel):
    data: list[MigrationPublic]
    count: int


# --- events and decisions -------------------------------------------------------


class EventPublic(BaseModel):
    id: int
    job_id: str | None
    time: datetime
    kind: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_domain(cls, e: Event) -> EventPublic:
        return cls(id=e.id, job_id=e.job_id, time=e.time, kind=e.kind, message=e.message,
                   data=e.data)


class EventsPublic(BaseModel):
    data: list[EventPublic]
    count: int


class DecisionPublic(BaseModel):
    """One decision of the scout, moving or not, with the numbers behind it:
    a placement (a job without an instance), a price or deadline move, or the
    answer to a preemption notice."""

    job_id: str
    move: bool = Field(description="true: it moves (or, for a placement, launches)")
    trigger: str = Field(description="placement | price | deadline | capacity")
    reason: str
    decided_at: datetime | None
    current_offer_id: str | None
    target_offer_id: str | None
    current_cost_per_work_hour: float | None
    target_cost_per_work_hour: float | None
    savings: float = Field(description="fraction of the current cost per work hour")
    threshold: float | None = Field(description="the savings fraction a price move needs")
    remaining_work_hours: float | None = Field(
        description="work left, in hours on an instance of relative speed 1.0")
    expected_saving_usd: float | None = Field(
        description="what the target saves over the remaining work")
    move_cost_usd: float | None = Field(
        description="boot, checkpoint and restore time billed, and egress")
    budget_left_usd: float | None = Field(description="budget less cost so far")
    deadline_slack_s: float | None = Field(
        description="seconds to spare at the deadline if the job stays (for a placement: "
                    "on the chosen offer)")

    @classmethod
    def from_domain(cls, d: MoveDecision) -> DecisionPublic:
        return cls(
            job_id=d.job_id, move=d.move, trigger=d.trigger, reason=d.reason,
            decided_at=d.decided_at, current_offer_id=d.current_offer_id,
            target_offer_id=d.target.id if d.target else None,
            current_cost_per_work_hour=d.current_cost_per_work_hour,
            target_cost_per_work_hour=d.target_cost_per_work_hour, savings=d.savings,
            threshold=d.threshold, remaining_work_hours=d.remaining_work_hours,
            expected_saving_usd=d.expected_saving_usd, move_cost_usd=d.move_cost_usd,
            budget_left_usd=d.budget_left_usd, deadline_slack_s=d.deadline_slack_s,
        )


class DecisionsPublic(BaseModel):
    data: list[DecisionPublic]
    count: int


# --- offers -------------------------------------------------------------------


class OfferPublic(BaseModel):
    id: str
    provider: str
    region: str
    zone: str
    instance_type: str
    capacity: Capacity
    gpus: int
    gpu_type: str | None
    vcpus: float
    memory_gb: float
    price_per_hour: float
    available: bool
    relative_speed: float
    cost_per_work_hour: float = Field(description="price per hour / relative speed")
    interruptions_per_day: float = Field(
        0.0, description="spot capacity losses per day seen on this offer in the last day")

    @classmethod
    def from_domain(cls, o: Offer) -> OfferPublic:
        return cls(
            id=o.id, provider=o.provider, region=o.region, zone=o.zone,
            instance_type=o.instance_type, capacity=o.capacity, gpus=o.gpus,
            gpu_type=o.gpu_type, vcpus=o.vcpus, memory_gb=o.memory_gb,
            price_per_hour=o.price_per_hour, available=o.available,
            relative_speed=o.relative_speed, cost_per_work_hour=o.cost_per_work_hour,
            interruptions_per_day=o.interruptions_per_day,
        )


class OffersPublic(BaseModel):
    data: list[OfferPublic]
    count: int


MAX_PRICE_PER_HOUR = 1e4  # USD


class OfferUpdate(_Input):
    """The body of ``PATCH /offers/{offer_id}``: at least one field."""

    # What _something_to_change checks, stated in the JSON schema.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["price_per_hour"], "properties": {"price_per_hour": {"type": "number"}}},
        {"required": ["available"], "properties": {"available": {"type": "boolean"}}},
    ]})

    # Bounded so that a price per work hour (price / relative speed) stays
    # finite: the dearest cloud machines cost a few hundred dollars an hour.
    price_per_hour: float | None = Field(default=None, gt=0, le=MAX_PRICE_PER_HOUR)
    available: bool | None = Field(default=None, strict=True)  # not 0/1 or "yes"

    @field_validator("price_per_hour", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # (true would be a price of $1)
            raise ValueError("must be a number, not true/false")
        return value

    @model_validator(mode="after")
    def _something_to_change(self) -> OfferUpdate:
        if self.price_per_hour is None and self.available is None:
            raise ValueError("give price_per_hour and/or available")
        return self


# --- instances -----------------------------------------------------------------


class InstancePublic(BaseModel):
    id: str
    job_id: str
    offer_id: str
    provider: str
    status: InstanceStatus
    address: str | None
    provider_ref: str | None
    created_at: datetime | None
    terminated_at: datetime | None

    @classmethod
    def from_domain(cls, i: Instance) -> InstancePublic:
        return cls(
            id=i.id, job_id=i.job_id, offer_id=i.offer_id, provider=i.provider,
            status=i.status, address=i.address, provider_ref=i.provider_ref,
            created_at=i.created_at, terminated_at=i.terminated_at,
        )


class InstancesPublic(BaseModel):
    data: list[InstancePublic]
    count: int


# --- errors ------------------------------------------------------------------
# The bodies of the error answers (api/errors.py makes them; each operation
# lists the statuses it can answer in the OpenAPI with these models).


class ErrorPublic(BaseModel):
    """Every error answer but a validation error: 400, 401, 404, 409, 500."""

    detail: str = Field(description="one line, for a person")


class FieldErrorPublic(BaseModel):
    loc: list[str | int] = Field(description="where FastAPI found the value, e.g. "
                                             '["body", "resources", "gpus"]')
    field: str = Field(description='the dotted name inside the body or query, e.g. '
                                   '"resources.gpus"')
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    """422: the request is well formed, but a value in it is refused."""

    detail: list[FieldErrorPublic]


# --- system ------------------------------------------------------------------


class Health(BaseModel):
    status: str = Field(description='"ok" when the database answers')
    version: str
    market: str = Field(description="the price feed: manual, trace:PATH, aws")
    manual_market: bool = Field(description="whether PATCH /offers is accepted")
    provider: str
    scout_interval_s: float
    savings_threshold: float
