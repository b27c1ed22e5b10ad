"""JobSpec <-> plain dict (stored as JSON, sent to the simulator and CLI)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from gpuscout.domain.models import JobSpec, Resources, WorkloadType


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["workload_type"] = spec.workload_type.value
    data["deadline"] = spec.deadline.isoformat() if spec.deadline else None
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    fields = dict(data)
    fields["resources"] = Resources(**(fields.get("resources") or {}))
    fields["workload_type"] = WorkloadType(fields.get("workload_type") or "training")
    deadline = fields.get("deadline")
    fields["deadline"] = datetime.fromisoformat(deadline) if deadline else None
    return JobSpec(**fields)
