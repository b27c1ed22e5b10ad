"""The words of GPU Scout as frozen values (see DESIGN.md, "Words").

Everything here is immutable and free of I/O: controllers read snapshots of
these values, hand them to the pure policy, and persist the results.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gpuscout.domain.states import JobStatus


class Capacity(enum.StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class OnBudget(enum.StrEnum):
    """What happens when a job's projected cost reaches its budget."""

    WARN = "warn"  # an event at 80% and at 100%, and the job runs on
    STOP = "stop"  # at 100% it is checkpointed and cancelled, its checkpoints kept


class WorkloadType(enum.StrEnum):
    TRAINING = "training"
    FINE_TUNING = "fine-tuning"
    INFERENCE = "inference"


class InstanceStatus(enum.StrEnum):
    PROVISIONING = "provisioning"  # asked of the provider, not yet healthy
    RUNNING = "running"  # the agent answers its health check
    TERMINATING = "terminating"  # terminate asked, not yet confirmed gone
    TERMINATED = "terminated"  # gone; nothing left running or billed
    FAILED = "failed"  # never became healthy, or died; terminated too

    def is_terminal(self) -> bool:
        return self in (InstanceStatus.TERMINATED, InstanceStatus.FAILED)


class MigrationStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class MigrationPhase(enum.StrEnum):
    """Phases of a make-before-break move, in the order they run.

    The executor persists the phase *before* doing its side effect, so a
    control plane restarted mid-move knows which side effects may have
    happened. Phases before SWITCHING roll back (the job stays on the old
    instance); SWITCHING and later roll forward.
    """

    LAUNCHING = "launching"  # replacement asked of the provider
    BOOTING = "booting"  # waiting for the replacement's agent, in standby
    CHECKPOINTING = "checkpointing"  # old instance checkpoints and pauses
    RESTORING = "restoring"  # replacement restores and runs its first step
    SWITCHING = "switching"  # the job's route points at the replacement
    TERMINATING = "terminating"  # the old instance is terminated
    DONE = "done"
    ROLLED_BACK = "rolled_back"

    @property
    def rolls_forward(self) -> bool:
        return self in (
            MigrationPhase.SWITCHING,
            MigrationPhase.TERMINATING,
            MigrationPhase.DONE,
        )


class MigrationReason(enum.StrEnum):
    PRICE = "price"  # the scout found a cheaper placement
    MANUAL = "manual"  # a user asked for the move
    PREEMPTION = "preemption"  # the provider reclaimed the instance (or will: a notice)
    DEADLINE = "deadline"  # spot no longer leaves room for the deadline: on-demand


@dataclass(frozen=True, slots=True)
class Resources:
    """What a job needs of an offer; every constraint given must hold
    (``Offer.shortfall`` checks them, in this order). Names of GPU types,
    instance types, regions and zones match case-insensitively."""

    gpus: int = 0
    gpu_type: str | None = None  # exactly this GPU type
    cpus: float = 1
    memory_gb: float = 1
    gpu_types: tuple[str, ...] = ()  # any one of these GPU types (with gpu_type: both hold)
    capacity: Capacity | None = None  # spot only or on-demand only; None: the policy chooses
    instance_type: str | None = None
    region: str | None = None
    zone: str | None = None

    def __post_init__(self) -> None:
        # Values read from JSON or YAML: a list (or one name) of GPU types, a
        # capacity by its value ("spot", "on-demand"; "on_demand" accepted).
        types = self.gpu_types
        if not isinstance(types, tuple):
            types = (types,) if isinstance(types, str) else tuple(types)
            object.__setattr__(self, "gpu_types", tuple(str(t) for t in types))
        if self.capacity is not None and not isinstance(self.capacity, Capacity):
            object.__setattr__(self, "capacity",
                               Capacity(str(self.capacity).strip().lower().replace("_", "-")))

    @property
    def asks_for_gpu(self) -> bool:
        """True when the job needs a GPU: a GPU count, or a GPU type named."""
        return self.gpus > 0 or bool(self.gpu_type) or bool(self.gpu_types)


@dataclass(frozen=True, slots=True)
class PriceHistory:
    """How an offer's price has moved in a trailing window (a day), as a
    scout saw it. A *hold* is a stretch at one price, from one change to
    the next."""

    since: datetime  # when the current price was first seen
    holds_s: tuple[float, ...]  # how long each price that ended in the window held
    hold_prices: tuple[float, ...]  # and at what price, in the same order
    # Time-weighted mean price while the offer could be had.
    mean_price_per_hour: float
    # Lag-one correlation of consecutive holds' prices around that mean,
    # in [-1, 1]: -1 a price that flips between two levels, 0 one whose
    # next price does not depend on this one, 1 one that drifts and stays.
    correlation: float


@dataclass(frozen=True, slots=True)
class Offer:
    """One purchasable capacity at one moment."""

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
    available: bool = True
    # Throughput of this instance type relative to a reference of 1.0; the
    # policy compares cost per unit of work, not per hour.
    relative_speed: float = 1.0
    # Spot capacity losses (interruptions, capacity errors) per day seen on
    # this offer recently (``market.history``); 0.0 when none were seen. Of
    # two offers at the same cost per work hour, the steadier one is taken.
    interruptions_per_day: float = 0.0
    # How this offer's price has moved lately (``market.history``); None
    # when it has not changed in a while: it is taken to hold. The move
    # policy forecasts a price that keeps changing from it
    # (``policy.migration.expected_price``).
    price_history: PriceHistory | None = None

    @staticmethod
    def make_id(provider: str, zone: str, instance_type: str, capacity: Capacity | str) -> str:
        return f"{provider}:{zone}:{instance_type}:{Capacity(capacity).value}"

    def satisfies(self, resources: Resources) -> bool:
        """True if this offer meets every requirement of ``resources``."""
        return self.shortfall(resources) is None

    def shortfall(self, resources: Resources) -> str | None:
        """The first requirement of ``resources`` this offer does not meet, as
        a phrase ("0 GPUs, needs 1", "spot, needs on-demand"); None if it
        meets them all. The one place offer eligibility is decided:
        ``satisfies`` and the CLI's reasons for excluding an offer use it."""
        r = resources
        if self.gpus < r.gpus:
            return f"{self.gpus} GPUs, needs {r.gpus}"
        if r.gpu_type and (self.gpu_type or "").lower() != r.gpu_type.lower():
            return f"GPU {self.gpu_type or 'none'}, needs {r.gpu_type}"
        if r.gpu_types and (self.gpu_type or "").lower() not in (t.lower() for t in r.gpu_types):
            return f"GPU {self.gpu_type or 'none'}, needs one of {', '.join(r.gpu_types)}"
        if self.vcpus < r.cpus:
            return f"{self.vcpus:g} vCPUs, needs {r.cpus:g}"
        if self.memory_gb < r.memory_gb:
            return f"{self.memory_gb:g} GB memory, needs {r.memory_gb:g}"
        if r.capacity is not None and self.capacity != r.capacity:
            return f"{self.capacity.value}, needs {r.capacity.value}"
        if r.instance_type and self.instance_type.lower() != r.instance_type.lower():
            return f"instance type {self.instance_type}, needs {r.instance_type}"
        if r.region and self.region.lower() != r.region.lower():
            return f"region {self.region}, needs {r.region}"
        if r.zone and self.zone.lower() != r.zone.lower():
            return f"zone {self.zone}, needs {r.zone}"
        return None

    @property
    def cost_per_work_hour(self) -> float:
        """Dollars per hour of work at relative speed 1.0."""
        return self.price_per_hour / self.relative_speed

    def with_(self, **changes: Any) -> Offer:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a user submits (validated at the edge by the API schema)."""

    name: str
    command: str
    model: str = ""
    dataset_size_gb: float = 0.0
    workload_type: WorkloadType = WorkloadType.TRAINING
    expected_duration_hours: float = 1.0
    budget_usd: float | None = None
    on_budget: OnBudget = OnBudget.WARN
    deadline: datetime | None = None
    resources: Resources = field(default_factory=Resources)
    # The user's project folder, packed and stored content-addressed
    # ("sha256:<hex>", gpuscout.workdir); unpacked as the working folder of
    # setup and command on every instance. None: an empty working folder.
    workdir: str | None = None
    setup: str | None = None  # run once per instance before the command
    envs: dict[str, str] = field(default_factory=dict)  # shown by the API
    # Names only: the values are sealed apart (gpuscout.secretbox) and reach
    # the agent after boot over its authenticated channel.
    secret_names: tuple[str, ...] = ()
    max_restarts_on_errors: int = 0  # SkyPilot's name: restarts after a non-zero exit
    # Verified checkpoints kept while the job runs, and once it has ended
    # (0: none); older ones are deleted from the store.
    checkpoint_keep: int = 3
    checkpoint_keep_finished: int = 1
    savings_threshold: float | None = None
    scout_interval_s: float | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    spec: JobSpec
    status: JobStatus
    created_at: datetime
    offer_id: str | None = None
    instance_id: str | None = None
    progress: Progress = field(default_factory=Progress)
    cost_usd: float = 0.0
    # What the job would have cost on the offer it was first placed on.
    baseline_cost_usd: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_migration_at: datetime | None = None
    error: str | None = None
    restarts: int = 0  # restarts after the command failed (max_restarts_on_errors)

    @property
    def savings_usd(self) -> float:
        return max(0.0, self.baseline_cost_usd - self.cost_usd)


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    job_id: str
    offer_id: str
    provider: str
    status: InstanceStatus
    address: str | None = None  # "host:port" of the agent
    provider_ref: str | None = None  # the provider's own id (pid, EC2 id)
    created_at: datetime | None = None
    terminated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    job_id: str
    step: int
    key: str  # object-store prefix of this checkpoint
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Migration:
    id: str
    job_id: str
    status: MigrationStatus
    phase: MigrationPhase
    reason: MigrationReason
    from_instance_id: str
    from_offer_id: str
    to_offer_id: str
    to_instance_id: str | None = None
    expected_savings: float = 0.0  # fraction of the current cost per work hour
    checkpoint_step: int | None = None
    resume_step: int | None = None
    downtime_s: float | None = None
    error: str | None = None
    started_at: datetime | None = None
    replacement_ready_at: datetime | None = None
    checkpointed_at: datetime | None = None
    resumed_at: datetime | None = None
    switched_at: datetime | None = None
    finished_at: datetime | None = None
