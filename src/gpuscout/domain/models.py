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
    gpus: int = 0
    gpu_type: str | None = None
    cpus: float = 1
    memory_gb: float = 1


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

    @staticmethod
    def make_id(provider: str, zone: str, instance_type: str, capacity: Capacity | str) -> str:
        return f"{provider}:{zone}:{instance_type}:{Capacity(capacity).value}"

    def satisfies(self, resources: Resources) -> bool:
        """True if this offer's hardware is enough for ``resources``."""
        if self.gpus < resources.gpus:
            return False
        if resources.gpu_type and (self.gpu_type or "").lower() != resources.gpu_type.lower():
            return False
        return self.vcpus >= resources.cpus and self.memory_gb >= resources.memory_gb

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
    deadline: datetime | None = None
    resources: Resources = field(default_factory=Resources)
    workdir: str | None = None
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
