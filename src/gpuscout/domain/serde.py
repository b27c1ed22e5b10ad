"""JobSpec <-> plain dict (stored as JSON, sent to the simulator and CLI)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from gpuscout.domain.models import JobSpec, OnBudget, Resources, WorkloadType


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["workload_type"] = spec.workload_type.value
    data["on_budget"] = spec.on_budget.value
    data["deadline"] = spec.deadline.isoformat() if spec.deadline else None
    # JSON has lists and strings; Resources turns them back into a tuple and a Capacity.
    res = spec.resources
    data["resources"]["gpu_types"] = list(res.gpu_types)
    data["resources"]["capacity"] = res.capacity.value if res.capacity is not None else None
    data["secret_names"] = list(spec.secret_names)
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    fields = dict(data)
    fields["resources"] = Resources(**(fields.get("resources") or {}))
    fields["workload_type"] = WorkloadType(fields.get("workload_type") or "training")
    # Specs stored before on_budget existed warn, as the default does.
    fields["on_budget"] = OnBudget(fields.get("on_budget") or "warn")
    deadline = fields.get("deadline")
    fields["deadline"] = datetime.fromisoformat(deadline) if deadline else None
    fields["envs"] = dict(fields.get("envs") or {})
    fields["secret_names"] = tuple(fields.get("secret_names") or ())
    return JobSpec(**fields)
