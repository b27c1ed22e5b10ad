"""The simulator's jobs file: a YAML list of job specs (DESIGN.md), each with
``submit_at`` (ISO 8601 UTC). ``expected_duration_hours`` is the work on an
instance of relative speed 1.0."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from gpuscout.domain import JobSpec, Resources, WorkloadType
from gpuscout.market.trace import parse_timestamp


class JobsFileError(ValueError):
    """A jobs file that cannot be read; the message names the file and field."""


@dataclass(frozen=True, slots=True)
class SimJob:
    spec: JobSpec
    submit_at: datetime

    @property
    def name(self) -> str:
        return self.spec.name


_SPEC_FIELDS = {"name", "command", "model", "dataset_size_gb", "workload_type",
                "expected_duration_hours", "budget_usd", "deadline", "resources", "workdir",
                "savings_threshold", "scout_interval_s"}


def job_from_dict(data: dict[str, Any], where: str = "job") -> SimJob:
    if not isinstance(data, dict):
        raise JobsFileError(f"{where}: a job must be a mapping, got {type(data).__name__}")
    unknown = set(data) - _SPEC_FIELDS - {"submit_at"}
    if unknown:
        raise JobsFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for required in ("name", "submit_at", "expected_duration_hours"):
        if data.get(required) in (None, ""):
            raise JobsFileError(f"{where}: {required} is required")
    try:
        submit = parse_timestamp(str(data["submit_at"]))
    except ValueError as err:
        raise JobsFileError(f"{where}: submit_at: {err}") from None
    fields = {k: v for k, v in data.items() if k in _SPEC_FIELDS}
    fields.setdefault("command", "sim")
    try:
        # Resources takes gpu_types as a list and capacity as "spot" | "on-demand".
        fields["resources"] = Resources(**(fields.get("resources") or {}))
    except (TypeError, ValueError) as err:  # an unknown field, a capacity misspelt
        raise JobsFileError(f"{where}: resources: {err}") from None
    try:
        fields["workload_type"] = WorkloadType(fields.get("workload_type") or "training")
    except ValueError as err:
        raise JobsFileError(f"{where}: workload_type: {err}") from None
    if fields.get("deadline") is not None:
        try:
            fields["deadline"] = parse_timestamp(str(fields["deadline"]))
        except ValueError as err:
            raise JobsFileError(f"{where}: deadline: {err}") from None
    for key in ("expected_duration_hours", "budget_usd", "dataset_size_gb"):
        if fields.get(key) is not None:
            try:
                fields[key] = float(fields[key])
            except (TypeError, ValueError):
                raise JobsFileError(f"{where}: {key} must be a number") from None
    if fields["expected_duration_hours"] <= 0:
        raise JobsFileError(f"{where}: expected_duration_hours must be positive")
    fields["name"] = str(fields["name"])
    return SimJob(JobSpec(**fields), submit)


def load_jobs(path: str | Path) -> list[SimJob]:
    path = Path(path)
    if not path.exists():
        raise JobsFileError(f"{path}: no such jobs file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise JobsFileError(f"{path}: not valid YAML{at}") from None
    if isinstance(data, dict) and "jobs" in data:
        data = data["jobs"]
    if not isinstance(data, list) or not data:
        raise JobsFileError(f"{path}: expected a non-empty YAML list of jobs")
    return [job_from_dict(d, f"{path}: job {i + 1}") for i, d in enumerate(data)]
