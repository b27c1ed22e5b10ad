"""The simulator's jobs file: a YAML list of job specs (DESIGN.md), each with
``submit_at`` (ISO 8601 UTC). ``expected_duration_hours`` is the work on an
instance of relative speed 1.0. Each job is validated as the API validates
a submitted one (``JobCreate``); its deadline must be after its submit_at."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from gpuscout.domain import JobSpec
from gpuscout.domain.jobinput import JobCreate, describe
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


# The job's fields are JobCreate's, validated by it (the one validation of a
# job: the API's, the CLI's); submit_at is the jobs file's own.
_FIELDS = set(JobCreate.model_fields) | {"submit_at"}


def job_from_dict(data: dict[str, Any], where: str = "job") -> SimJob:
    if not isinstance(data, dict):
        raise JobsFileError(f"{where}: a job must be a mapping, got {type(data).__name__}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise JobsFileError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for required in ("name", "submit_at", "expected_duration_hours"):
        if data.get(required) is None:
            raise JobsFileError(f"{where}: {required} is required")
    try:
        submit = parse_timestamp(str(data["submit_at"]))
    except ValueError as err:
        raise JobsFileError(f"{where}: submit_at: {err}") from None
    fields = {k: v for k, v in data.items() if k != "submit_at"}
    fields.setdefault("command", "sim")
    resources = fields.get("resources")
    if isinstance(resources, dict) and "gpu_types" in resources:
        # The simulator's older spelling of a list of GPU types.
        resources = dict(resources)
        if resources.get("gpu_type") is not None:
            raise JobsFileError(f"{where}: resources: give gpu_type or gpu_types, not both")
        resources["gpu_type"] = resources.pop("gpu_types")
        fields["resources"] = resources
    try:
        spec = JobCreate.model_validate(
            fields, context={"now": submit, "now_name": "submit_at"}).to_spec()
    except ValidationError as err:
        raise JobsFileError(f"{where}: {describe(err)}") from None
    if spec.deadline is not None:
        spec = replace(spec, deadline=spec.deadline.astimezone(UTC))
    return SimJob(spec, submit)


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
