"""The JSON shapes of the REST API: one pydantic schema per purpose.

Inputs (``JobCreate``, ``OfferUpdate``, ``MigrateRequest``) forbid unknown
fields and validate every bound, so bad input is a 422 that names the field
before anything is written. Outputs (``*Public``) are built from the domain
values by ``Public.from_domain``, which reads the value's attributes
(``from_attributes``): a field added to a domain value and to its schema
here needs no mapping; where a name differs, the field says where it comes
from (``validation_alias``). List endpoints answer ``{"data": [...], "count": N}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import (
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from gpuscout.domain import (
    Capacity,
    InstanceStatus,
    JobStatus,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    OnBudget,
    Resources,
    WorkloadType,
)

# Jobs, input: JobCreate and ResourcesIn live in domain/jobinput.py, the one
# validation of a job, shared with the CLI's job files (submit, plan) and the
# simulator's jobs files.
from gpuscout.domain.jobinput import InputModel as _Input
from gpuscout.domain.jobinput import JobCreate as JobCreate
from gpuscout.domain.jobinput import ResourcesIn as ResourcesIn

# --- outputs --------------------------------------------------------------------


class Public(BaseModel):
    """An output, read from a domain value's attributes."""

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def from_domain(cls, value: object) -> Self:
        return cls.model_validate(value)


# --- jobs: output -----------------------------------------------------------


class ResourcesPublic(Public):
    gpus: int
    gpu_type: str | list[str] | None
    cpus: float
    memory_gb: float
    capacity: Capacity | None
    instance_type: str | None
    region: str | None
    zone: str | None

    @model_validator(mode="before")
    @classmethod
    def _one_gpu_type_field(cls, value: Any) -> Any:
        """``gpu_type`` answers the list of types when the job accepts any of several."""
        if isinstance(value, Resources) and value.gpu_types:
            return {**{name: getattr(value, name) for name in cls.model_fields},
                    "gpu_type": list(value.gpu_types)}
        return value


class JobSpecPublic(Public):
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
    secrets: list[str] = Field(validation_alias="secret_names",
                               description="the names of the job's secrets (never values)")
    max_restarts_on_errors: int
    checkpoint_keep: int
    checkpoint_keep_finished: int
    savings_threshold: float | None
    scout_interval_s: float | None


class ProgressPublic(Public):
    step: int
    total_steps: int | None
    loss: float | None


class JobPublic(Public):
    id: str
    name: str = Field(validation_alias=AliasPath("spec", "name"))
    status: JobStatus
    offer_id: str | None
    instance_id: str | None
    progress: ProgressPublic
    cost_usd: float
    savings_usd: float = Field(
        description="what the job would have cost on its first offer, less what it cost")
    baseline_cost_usd: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_migration_at: datetime | None
    error: str | None
    restarts: int = Field(description="restarts after the command failed "
                                      "(spec.max_restarts_on_errors)")
    spec: JobSpecPublic

    @computed_field(description="the job's stable URL path (the user proxy)")  # type: ignore[prop-decorator]
    @property
    def endpoint(self) -> str:
        return endpoint_path(self.id)


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


class MigrationPublic(Public):
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


class MigrationsPublic(BaseModel):
    data: list[MigrationPublic]
    count: int


# --- events and decisions -------------------------------------------------------


class EventPublic(Public):
    id: int
    job_id: str | None
    time: datetime
    kind: str
    message: str
    data: dict[str, Any] | None


class EventsPublic(BaseModel):
    data: list[EventPublic]
    count: int


class DecisionPublic(Public):
    """One decision of the scout, moving or not, with the numbers behind it:
    a placement (a job without an instance), a price or deadline move, or the
    answer to a preemption notice."""

    job_id: str
    move: bool = Field(description="true: it moves (or, for a placement, launches)")
    trigger: str = Field(description="placement | price | deadline | capacity")
    reason: str
    decided_at: datetime | None
    current_offer_id: str | None
    target_offer_id: str | None = Field(None, validation_alias=AliasPath("target", "id"))
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


class DecisionsPublic(BaseModel):
    data: list[DecisionPublic]
    count: int


# --- offers -------------------------------------------------------------------


class OfferPublic(Public):
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


class InstancePublic(Public):
    id: str
    job_id: str
    offer_id: str
    provider: str
    status: InstanceStatus
    address: str | None
    provider_ref: str | None
    created_at: datetime | None
    terminated_at: datetime | None


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
