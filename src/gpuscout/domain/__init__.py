from gpuscout.domain.models import (
    Capacity,
    Checkpoint,
    Instance,
    InstanceStatus,
    Job,
    JobSpec,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    Offer,
    OnBudget,
    PriceHistory,
    Progress,
    Resources,
    WorkloadType,
)
from gpuscout.domain.states import IllegalTransition, JobStatus, can_transition, check_transition

__all__ = [
    "Capacity", "Checkpoint", "IllegalTransition", "Instance", "InstanceStatus", "Job",
    "JobSpec", "JobStatus", "Migration", "MigrationPhase", "MigrationReason",
    "MigrationStatus", "Offer", "OnBudget", "PriceHistory", "Progress", "Resources",
    "WorkloadType",
    "can_transition", "check_transition",
]
