"""One validation for a job, wherever it enters (domain/jobinput.JobCreate):
the API, `gpuscout submit` (before any server), `plan`, `simulate` and its
jobs file refuse the same inputs, each with a one-line message naming the
field; the API with a 422 naming it."""

from __future__ import annotations

import io
import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError
from rich.console import Console
from typer.testing import CliRunner

from gpuscout.api.schemas import MAX_PRICE_PER_HOUR
from gpuscout.cli import render
from gpuscout.cli.main import app
from gpuscout.domain import JobSpec
from gpuscout.domain.jobinput import JobCreate
from gpuscout.market import catalog
from gpuscout.market.trace import write_trace
from gpuscout.server import ServerThread
from gpuscout.service import Service
from gpuscout.sim import JobsFileError, load_jobs
from tests.api_fixtures import (
    AUTH,
    P3_SPOT_A,
    TOKEN,
    TestClient,
    address_for,
    close_service,
    make_service,
)
from tests.unit.test_sim_helpers import row

# What the tester fed `simulate`, `submit` and the API, as YAML lines of a job
# file, and the field each must be refused for.
BAD: list[tuple[str, str]] = [
    ("expected_duration_hours: .nan", "expected_duration_hours"),
    ("expected_duration_hours: .inf", "expected_duration_hours"),
    ("budget_usd: .nan", "budget_usd"),
    ("savings_threshold: abc", "savings_threshold"),
    ("resources: {gpus: -1}", "resources.gpus"),
    ("budget_usd: -5", "budget_usd"),
    ("dataset_size_gb: -1", "dataset_size_gb"),
    ("savings_threshold: 5", "savings_threshold"),
    ("scout_interval_s: 0", "scout_interval_s"),
    (f"name: {'n' * 201}", "name"),
    ("name: '   '", "name"),
    ("name: no", "name"),  # YAML: false
    ('name: "two\\nlines"', "name"),
    ('name: "tab\\there"', "name"),
    ("resources: {gpus: yes}", "resources.gpus"),  # YAML: true, not 1 GPU
    ("resources: {gpus: 1.5}", "resources.gpus"),
    ("max_restarts_on_errors: on", "max_restarts_on_errors"),
    # schemathesis's numbers (YAML 1.1 wants the dot and the exponent's sign)
    ("resources: {memory_gb: 6.0e+270}", "resources.memory_gb"),
    ("resources: {cpus: 1.6e+296}", "resources.cpus"),
    ("scout_interval_s: 2.0e-43", "scout_interval_s"),
    ("dataset_size_gb: 1.7e+24", "dataset_size_gb"),
    ("expected_duration_hours: 8761", "expected_duration_hours"),
    ("budget_usd: 1.0e+8", "budget_usd"),
    ("resources: {gpus: 100000}", "resources.gpus"),
    ("resources: {gpu_type: [V100, yes]}", "resources.gpu_type"),
    ("model: \"a\\nb\"", "model"),
]
IDS = [line[:40] for line, _ in BAD]


def job_yaml(line: str, *, sim: bool = False) -> str:
    """A valid job with ``line`` replacing (or adding) one of its keys."""
    key = line.split(":", 1)[0]
    base = {"name": "name: fine", "command": "command: python train.py",
            "expected_duration_hours": "expected_duration_hours: 2"}
    if sim:
        base["submit_at"] = "submit_at: 2023-01-01T00:00:00Z"
    base[key] = line
    lines = list(base.values())
    if sim:
        return "- " + "\n  ".join(lines) + "\n"
    return "\n".join(lines) + "\n"


def one_error_line(result: Any, field: str) -> str:
    """The run failed with one line on stderr, naming ``field``, no traceback."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert f"{field}: " in lines[0], lines[0]
    return str(lines[0])


# --- the schema itself ------------------------------------------------------------


@pytest.mark.parametrize(("line", "field"), BAD, ids=IDS)
def test_the_schema_refuses_each_input_naming_its_field(line: str, field: str) -> None:
    body = yaml.safe_load(job_yaml(line))
    with pytest.raises(ValidationError) as raised:
        JobCreate.model_validate(body)
    fields = {".".join(str(p) for p in e["loc"]) for e in raised.value.errors()}
    assert {f.split(".str")[0].split(".list[")[0] for f in fields} == {field}


def test_bounds_a_real_job_can_have_are_accepted() -> None:
    spec = JobCreate.model_validate(yaml.safe_load(
        "name: big-but-real\ncommand: python train.py\nexpected_duration_hours: 8760\n"
        "budget_usd: 1.0e+7\ndataset_size_gb: 1.0e+6\nsavings_threshold: 0\n"
        "scout_interval_s: 86400\nresources: {gpus: 16, cpus: 896, memory_gb: 32768}\n"
    )).to_spec()
    assert (spec.resources.gpus, spec.resources.cpus, spec.expected_duration_hours) == (
        16, 896, 8760)
    # YAML 1.1 reads 1e3 (no dot) as the text "1e3": still a number.
    body = yaml.safe_load("name: n\ncommand: c\nexpected_duration_hours: 1e3\n")
    assert body["expected_duration_hours"] == "1e3"
    assert JobCreate.model_validate(body).expected_duration_hours == 1000


# --- the API -------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "field"), BAD, ids=IDS)
def test_the_api_answers_422_naming_the_field(client: TestClient, service: Service,
                                              line: str, field: str) -> None:
    body = yaml.safe_load(job_yaml(line))
    raw = json.dumps(body).encode()  # NaN and Infinity as Python's JSON writes them
    response = client.post("/api/v1/jobs", content=raw,
                           headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    named = {e["field"].split(".str")[0].split(".list[")[0]
             for e in response.json()["detail"]}
    assert named == {field}
    assert service.repo.list_jobs() == []


@pytest.mark.parametrize("price", [1.1e308, MAX_PRICE_PER_HOUR * 1.01, 0, -1, True])
def test_an_offer_price_is_finite_and_bounded(client: TestClient, service: Service,
                                              price: float) -> None:
    response = client.patch(f"/api/v1/offers/{P3_SPOT_A}", json={"price_per_hour": price},
                            headers=AUTH)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["detail"]] == ["price_per_hour"]
    assert service.repo.get_offer(P3_SPOT_A).price_per_hour == pytest.approx(0.918)


def test_get_offers_answers_a_finite_cost_at_the_highest_price(client: TestClient) -> None:
    slowest = min(t.relative_speed for t in catalog.INSTANCE_TYPES)
    assert math.isfinite(MAX_PRICE_PER_HOUR / slowest)
    offers = client.get("/api/v1/offers").json()["data"]
    for offer in offers:
        response = client.patch(f"/api/v1/offers/{offer['id']}",
                                json={"price_per_hour": MAX_PRICE_PER_HOUR}, headers=AUTH)
        assert response.status_code == 200, response.text
    for offer in client.get("/api/v1/offers").json()["data"]:
        assert isinstance(offer["cost_per_work_hour"], float)
        assert math.isfinite(offer["cost_per_work_hour"])


# --- the CLI: submit (before any server), plan, simulate ------------------------------


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[CliRunner]:
    """A CLI whose API URL answers nothing: a job refused here was refused
    before it was sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPUSCOUT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GPUSCOUT_API_TOKEN", TOKEN)
    monkeypatch.setenv("GPUSCOUT_HOME", str(tmp_path / "client-home"))
    yield CliRunner()


@pytest.mark.parametrize(("line", "field"), BAD, ids=IDS)
def test_submit_refuses_before_reaching_a_server(nowhere: CliRunner, tmp_path: Path,
                                                 line: str, field: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(job_yaml(line))
    result = nowhere.invoke(app, ["submit", str(path)])
    message = one_error_line(result, field)
    assert "invalid job" in message and "cannot reach" not in message.lower()


@pytest.mark.parametrize(("flags", "field"), [
    (["--expected-hours", "nan"], "expected_duration_hours"),
    (["--budget", "inf"], "budget_usd"),
    (["--gpus", "-1"], "resources.gpus"),
    (["--memory-gb", "1e300"], "resources.memory_gb"),
    (["--name", "two\nlines"], "name"),
])
def test_submit_flags_go_through_the_same_schema(nowhere: CliRunner, flags: list[str],
                                                 field: str) -> None:
    result = nowhere.invoke(app, ["submit", "--name", "n", "--command", "c", *flags])
    one_error_line(result, field)


def test_market_set_refuses_a_price_json_cannot_carry(nowhere: CliRunner) -> None:
    result = nowhere.invoke(app, ["market", "set", P3_SPOT_A, "--price", "nan"])
    one_error_line(result, "--price")


@pytest.mark.parametrize(("line", "field"), BAD, ids=IDS)
def test_plan_refuses_each_input_in_one_line(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(job_yaml(line))
    one_error_line(CliRunner().invoke(app, ["plan", str(path)]), field)


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    write_trace(path, [row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1a", "on-demand", 3.0),
                       row(4380, "us-east-1a", "spot", 1.0, available=False)])
    return path


def simulate(trace: Path, jobs: Path) -> Any:
    return CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--policy", "gpuscout",
                                    "--jobs", str(jobs)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("line", "field"), BAD, ids=IDS)
def test_simulate_refuses_each_input_in_one_line(trace: Path, tmp_path: Path, line: str,
                                                 field: str) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(job_yaml(line, sim=True))
    message = one_error_line(simulate(trace, jobs), field)
    assert "job 1" in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "words"), [
    ("  deadline: 2022-12-31T23:00:00Z\n", "deadline: must be after submit_at"),
    ("  resources: {gpu_type: V100, gpu_types: [T4]}\n", "gpu_type or gpu_types"),
    ("  workdir: /home/me/project\n", "workdir: "),
    ("  resources: {capacity: spott}\n", "resources.capacity: "),
])
def test_the_jobs_file_adds_only_submit_at(trace: Path, tmp_path: Path, text: str,
                                           words: str) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(job_yaml("name: x", sim=True) + text)
    result = simulate(trace, jobs)
    assert result.exit_code == 1 and words in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_simulated_deadline_is_checked_against_submit_at_not_the_wall_clock(
        tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(job_yaml("name: x", sim=True) + "  deadline: 2023-01-01T05:00:00+02:00\n"
                    "  resources: {gpu_types: [V100, T4]}\n")
    (job,) = load_jobs(jobs)
    assert job.spec.deadline is not None and job.spec.deadline.hour == 3  # UTC
    assert job.spec.resources.gpu_types == ("V100", "T4")
    jobs.write_text(job_yaml("name: no", sim=True))
    with pytest.raises(JobsFileError, match="name: must be text"):
        load_jobs(jobs)


# --- `gpuscout jobs`: a name cannot break its row ---------------------------------------


def test_a_name_with_control_characters_keeps_its_row_whole() -> None:
    console = Console(file=io.StringIO(), width=200)
    console.print(render.jobs_table([{
        "id": "job-1", "name": "evil\nrow [/bold] [red]x", "status": "running",
        "progress": {"step": 3}, "cost_usd": 1.0, "savings_usd": 0.0, "offer_id": None}]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    (line,) = [line for line in text.splitlines() if "row" in line]
    assert "job-1" in line and "evil\\nrow [/bold] [red]x" in line and "running" in line


def test_jobs_lists_a_stored_name_with_a_newline_on_one_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuscout.providers.fake import FakeProvider
    from tests.api_fixtures import GatedAgents

    svc = make_service(tmp_path / "home", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       FakeProvider(address_for=address_for), GatedAgents())
    try:
        # Stored before names were validated (the API refuses it now).
        job = svc.plane.submit(JobSpec(name="old\njob", command="true"))
        with ServerThread(svc) as server:
            monkeypatch.setenv("GPUSCOUT_URL", server.url)
            monkeypatch.setenv("GPUSCOUT_API_TOKEN", TOKEN)
            monkeypatch.setenv("COLUMNS", "200")
            result = CliRunner().invoke(app, ["jobs"])
    finally:
        close_service(svc)
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "job" in line]
    assert job.id in line and "old\\njob" in line
