"""The one validation of a job spec, wherever it enters.

``JobCreate`` is the body of ``POST /api/v1/jobs`` and the keys of every job
a user writes: the CLI's job file (``submit``, checked before anything is
sent, and ``plan``) and each entry of the simulator's jobs file (which adds
its own ``submit_at``). A job that passes here can be run; one that does
not is refused with the field and the problem (``describe``: one line).

Types are strict where YAML's loose typing bites: ``yes``/``no`` are
booleans to YAML, and a boolean is neither a count, a number nor a text.
(A number written as text stays accepted: YAML 1.1 reads ``1e3`` as the
string "1e3".) Numbers must be finite and within bounds a real job can
have; names are one line.

Kept light (pydantic only) so that the CLI's client commands and the
simulator do not import the server to use it.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from gpuscout.domain.models import Capacity, JobSpec, OnBudget, Resources, WorkloadType

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# --- bounds a real job can have -------------------------------------------------
# Generous above what any one machine offers today, so that no real job is
# refused, yet far from the overflows a fuzzer posts (memory_gb: 6e270).
# GPUs per node: 8 on AWS p4d/p5, 16 on the largest nodes sold. The bound
# only stops absurd counts; below it, the control plane's catalog check at
# submit says that no offer has that many (field "resources").
MAX_GPUS = 1024
MAX_CPUS = 1024  # vCPUs: the largest EC2 instances (u7in-32tb) have 896
MAX_MEMORY_GB = 32_768  # 32 TiB: the largest EC2 instances (u7in-32tb)
MAX_DATASET_GB = 1e6  # one petabyte
MAX_HOURS = 8760  # one year of work
MAX_BUDGET_USD = 1e7
MIN_SCOUT_INTERVAL_S = 1.0  # a scout pass asks the market: not more than once a second
MAX_SCOUT_INTERVAL_S = 86_400.0  # at least once a day
MAX_NAME = 200  # characters, as the API has always said
MAX_WORD = 100  # model, GPU type, instance type, region, zone
MAX_GPU_TYPES = 64
# A command and a setup are run as one `sh -c` argument; Linux limits one
# argument to 128 KiB (MAX_ARG_STRLEN). The same for one variable's value.
MAX_SCRIPT = 131_072
MAX_VARIABLES = 1000  # envs, and secrets, each

_BOOL_AS_NUMBER = "must be a number, not true/false (YAML reads yes, no, on and off as booleans)"
_BOOL_AS_TEXT = ("must be text, not true/false (YAML reads yes, no, on and off as booleans: "
                 "quote it)")
# Unicode categories that end or break a line: controls (\n, \t, ESC), U+2028, U+2029.
_LINE_BREAKING = ("Cc", "Zl", "Zp")


# The same rules as JSON Schema (in the OpenAPI, for clients; the validators
# below enforce them, with their own messages).
_BREAK = r"\u0000-\u001f\u007f-\u009f\u2028\u2029"  # _LINE_BREAKING's characters
_ONE_LINE: JsonDict = {"pattern": rf"^[^{_BREAK}]*$"}
_ONE_LINE_NOT_BLANK: JsonDict = {"pattern": rf"^[^{_BREAK}]*[^\s{_BREAK}][^{_BREAK}]*$"}
_SCRIPT: JsonDict = {"pattern": r"^[^\u0000]*$"}
_SCRIPT_NOT_BLANK: JsonDict = {"pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$"}
_VARIABLES: JsonDict = {
    "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$", "not": {"pattern": "^GPUSCOUT_"}},
    "additionalProperties": {"type": "string", "maxLength": MAX_SCRIPT, **_SCRIPT},
}


def _gpu_type_schema(schema: JsonDict) -> None:
    """``gpu_type``'s JSON Schema: one type, or a list of them (the rules its
    validator enforces)."""
    word: JsonDict = {"type": "string", "maxLength": MAX_WORD, **_ONE_LINE}
    schema.pop("anyOf", None)
    schema["anyOf"] = [
        word,
        {"type": "array", "items": {**word, **_ONE_LINE_NOT_BLANK}, "minItems": 1,
         "maxItems": MAX_GPU_TYPES},
        {"type": "null"},
    ]


def _check_text(value: str, *, one_line: bool) -> str:
    for char in value:
        kind = unicodedata.category(char)
        if kind == "Cs":
            raise ValueError("contains a lone surrogate (not valid Unicode text)")
        if char == "\0":
            raise ValueError("contains a NUL character")
        if one_line and kind in _LINE_BREAKING:
            raise ValueError(f"must not contain control characters (found {char!r})")
    return value


def _refuse_bool(value: Any, problem: str) -> Any:
    if isinstance(value, bool):
        raise ValueError(problem)
    return value


class InputModel(BaseModel):
    # Python's JSON parser accepts Infinity and NaN, YAML has .inf and .nan;
    # no price, budget or duration may be either.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ResourcesIn(InputModel):
    gpus: int = Field(default=0, ge=0, le=MAX_GPUS, description="GPUs the job needs (0: CPU only)")
    gpu_type: str | list[str] | None = Field(
        default=None, description="e.g. V100, T4, or a list of types any of which will do; "
                                  "any if omitted", json_schema_extra=_gpu_type_schema)
    cpus: float = Field(default=1, gt=0, le=MAX_CPUS)
    memory_gb: float = Field(default=1, gt=0, le=MAX_MEMORY_GB)
    capacity: Capacity | None = Field(
        default=None, description="spot or on-demand only; GPU Scout chooses if omitted")
    instance_type: str | None = Field(default=None, max_length=MAX_WORD,
                                      description="e.g. g4dn.xlarge", json_schema_extra=_ONE_LINE)
    region: str | None = Field(default=None, max_length=MAX_WORD, json_schema_extra=_ONE_LINE)
    zone: str | None = Field(default=None, max_length=MAX_WORD, json_schema_extra=_ONE_LINE)

    @field_validator("gpus", "cpus", "memory_gb", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        return _refuse_bool(value, _BOOL_AS_NUMBER)

    @field_validator("instance_type", "region", "zone", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _refuse_bool(value, _BOOL_AS_TEXT)

    @field_validator("gpu_type", mode="before")
    @classmethod
    def _type_or_types(cls, value: Any) -> Any:
        # One message for the field, not one per member of the union.
        if isinstance(value, list):
            for item in value:
                _refuse_bool(item, _BOOL_AS_TEXT)
                if not isinstance(item, str):
                    raise ValueError(f"a GPU type must be text, not {type(item).__name__}")
            return value
        _refuse_bool(value, _BOOL_AS_TEXT)
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a GPU type (text) or a list of them")
        return value

    @field_validator("instance_type", "region", "zone")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, one_line=True)

    @field_validator("gpu_type")
    @classmethod
    def _types(cls, value: str | list[str] | None) -> str | list[str] | None:
        for name in [value] if isinstance(value, str) else value or []:
            if len(name) > MAX_WORD:
                raise ValueError(f"a GPU type has at most {MAX_WORD} characters")
            _check_text(name, one_line=True)
        if isinstance(value, list):
            if not value or not all(t.strip() for t in value):
                raise ValueError("a list of GPU types must name at least one, none blank")
            if len(value) > MAX_GPU_TYPES:
                raise ValueError(f"at most {MAX_GPU_TYPES} GPU types")
            return value[0] if len(value) == 1 else value
        return value

    def to_domain(self) -> Resources:
        many = isinstance(self.gpu_type, list)
        return Resources(
            gpus=self.gpus, gpu_type=None if many else self.gpu_type,  # type: ignore[arg-type]
            gpu_types=tuple(self.gpu_type) if many else (),  # type: ignore[arg-type]
            cpus=self.cpus, memory_gb=self.memory_gb, capacity=self.capacity,
            instance_type=self.instance_type, region=self.region, zone=self.zone)


class JobCreate(InputModel):
    """The body of ``POST /api/v1/jobs`` (and the keys of a CLI job file, and
    of each job of a simulator jobs file).

    The deadline must be later than "now": the wall clock, or the time
    given as ``context={"now": datetime, "now_name": str}`` to
    ``model_validate`` (the simulator passes the job's ``submit_at``)."""

    name: str = Field(min_length=1, max_length=MAX_NAME, json_schema_extra=_ONE_LINE_NOT_BLANK)
    command: str = Field(min_length=1, max_length=MAX_SCRIPT,
                         description="shell command run on the instance",
                         json_schema_extra=_SCRIPT_NOT_BLANK)
    model: str = Field(default="", max_length=MAX_WORD, json_schema_extra=_ONE_LINE)
    dataset_size_gb: float = Field(default=0.0, ge=0, le=MAX_DATASET_GB)
    workload_type: WorkloadType = WorkloadType.TRAINING
    expected_duration_hours: float = Field(default=1.0, gt=0, le=MAX_HOURS)
    budget_usd: float | None = Field(default=None, gt=0, le=MAX_BUDGET_USD)
    on_budget: OnBudget = Field(
        default=OnBudget.WARN,
        description="at the budget (projected cost: cost so far + the remaining work at the "
                    "current $/work-hour): warn (events at 80% and 100%) or stop (also "
                    "checkpoint and cancel the job at 100%, keeping its checkpoints)")
    deadline: datetime | None = Field(
        default=None, description="ISO 8601, in the future; without an offset it is UTC")
    resources: ResourcesIn = Field(default_factory=ResourcesIn)
    workdir: str | None = Field(
        default=None, pattern=r"^sha256:[0-9a-f]{64}$",
        description="the packed project folder, as POST /api/v1/workdirs answered "
                    "(\"sha256:<hex>\"); unpacked as the working folder on every instance")
    setup: str | None = Field(
        default=None, max_length=MAX_SCRIPT, json_schema_extra=_SCRIPT,
        description="shell command run once per instance before the command, "
                    "in the working folder (e.g. pip install -r requirements.txt)")
    envs: dict[str, str] = Field(default_factory=dict, max_length=MAX_VARIABLES,
                                 description="environment variables of setup and command",
                                 json_schema_extra=_VARIABLES)
    secrets: dict[str, str] = Field(
        default_factory=dict, max_length=MAX_VARIABLES, json_schema_extra=_VARIABLES,
        description="environment variables whose values are never shown back, logged or "
                    "put in user-data")
    max_restarts_on_errors: int = Field(
        default=0, ge=0, le=100,
        description="restarts from the last checkpoint after the command exits non-zero")
    checkpoint_keep: int = Field(
        default=3, ge=1, le=1000,
        description="verified checkpoints kept while the job runs (older ones are deleted)")
    checkpoint_keep_finished: int = Field(
        default=1, ge=0, le=1000,
        description="checkpoints kept once the job completed, failed or was cancelled")
    # As the control plane's own setting (config.Settings): 0 moves for any saving.
    savings_threshold: float | None = Field(default=None, ge=0, lt=1)
    scout_interval_s: float | None = Field(default=None, ge=MIN_SCOUT_INTERVAL_S,
                                           le=MAX_SCOUT_INTERVAL_S)

    @field_validator("dataset_size_gb", "expected_duration_hours", "budget_usd",
                     "max_restarts_on_errors", "checkpoint_keep", "checkpoint_keep_finished",
                     "savings_threshold", "scout_interval_s", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        return _refuse_bool(value, _BOOL_AS_NUMBER)

    @field_validator("name", "command", "model", "setup", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _refuse_bool(value, _BOOL_AS_TEXT)

    @field_validator("name", "command")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("name", "model")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # A name is a row of `gpuscout jobs`, a line of a log: one line.
        return _check_text(value, one_line=True)

    @field_validator("command")
    @classmethod
    def _a_script(cls, value: str) -> str:
        return _check_text(value, one_line=False)

    @field_validator("setup")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        if value is not None:
            _check_text(value, one_line=False)
        return value if value and value.strip() else None

    @field_validator("envs", "secrets", mode="before")
    @classmethod
    def _numbers_as_text(cls, value: Any) -> Any:
        # YAML reads `EPOCHS: 10` as a number; an environment holds text (as
        # SkyPilot does: str() of the value). Anything else stays an error.
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, bool | int | float) else v
                    for k, v in value.items()}
        return value

    @field_validator("envs", "secrets")
    @classmethod
    def _variable_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name "
                                 "(letters, digits and _, not starting with a digit)")
            if name.startswith("GPUSCOUT_"):
                raise ValueError(f"{name}: GPUSCOUT_* variables are set by GPU Scout")
            if "\0" in text:
                raise ValueError(f"{name}: the value contains a NUL byte")
            if len(text) > MAX_SCRIPT:
                raise ValueError(f"{name}: the value has more than {MAX_SCRIPT} characters")
        return value

    @model_validator(mode="after")
    def _secrets_apart(self) -> JobCreate:
        both = sorted(set(self.envs) & set(self.secrets))
        if both:
            raise ValueError(f"secrets: {', '.join(both)} also given in envs")
        return self

    @field_validator("deadline", mode="before")
    @classmethod
    def _a_time(cls, value: Any) -> Any:
        # pydantic would read a number as seconds since 1970; a deadline is
        # written as a date and time.
        if isinstance(value, bool | int | float):
            raise ValueError("must be an ISO 8601 date and time, e.g. 2030-01-31T18:00:00Z")
        return value

    @field_validator("deadline")
    @classmethod
    def _in_the_future(cls, value: datetime | None,
                       info: ValidationInfo) -> datetime | None:
        # The deadline is a wall-clock promise to a user, so it is checked
        # against the wall clock, not the control plane's (possibly simulated)
        # one; a simulated job's against its submit_at.
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        context = info.context if isinstance(info.context, dict) else {}
        now = context.get("now")
        if isinstance(now, datetime):
            if value <= now:
                raise ValueError(f"must be after {context.get('now_name', 'the submission')}")
        elif value <= datetime.now(UTC):
            raise ValueError("must be in the future")
        return value

    def to_spec(self) -> JobSpec:
        return JobSpec(
            name=self.name, command=self.command, model=self.model,
            dataset_size_gb=self.dataset_size_gb, workload_type=self.workload_type,
            expected_duration_hours=self.expected_duration_hours, budget_usd=self.budget_usd,
            on_budget=self.on_budget,
            deadline=self.deadline, resources=self.resources.to_domain(),
            workdir=self.workdir, setup=self.setup, envs=dict(self.envs),
            secret_names=tuple(sorted(self.secrets)),
            max_restarts_on_errors=self.max_restarts_on_errors,
            checkpoint_keep=self.checkpoint_keep,
            checkpoint_keep_finished=self.checkpoint_keep_finished,
            savings_threshold=self.savings_threshold, scout_interval_s=self.scout_interval_s,
        )


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so that it stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe(error: ValidationError) -> str:
    """One line for a user: ``field.path: problem`` for each error, ``; ``
    between them (a job-wide problem without its field name)."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        problem = str(e["msg"]).removeprefix("Value error, ")
        given = e.get("input")
        if e["type"] in ("enum", "literal_error") and isinstance(given, str) and len(given) < 60:
            problem += f" (got {given!r})"  # a misspelling is seen at once
        parts.append(_printable(f"{where}: {problem}" if where else problem))
    return "; ".join(parts)
