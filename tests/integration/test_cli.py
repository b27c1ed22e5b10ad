"""The `gpuscout` CLI against a real API server (ServerThread over a real
Service on SQLite), through Typer's runner and, for the entry point and
`up`, as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpuscout.cli.main import app
from gpuscout.domain import JobSpec, JobStatus, Resources
from gpuscout.server import ServerThread
from gpuscout.service import Service
from tests.api_fixtures import (
    G4_SPOT_B,
    P3_SPOT_A,
    TOKEN,
    GatedAgents,
    address_for,
    close_service,
    make_g4_spot_unavailable,
    make_service,
    run_until,
)

GPUSCOUT = Path(sys.executable).parent / "gpuscout"

JOB_YAML = """\
name: yaml-job
command: python -m gpuscout.examples.linreg --steps 50
model: linear-regression
workload_type: training
expected_duration_hours: 0.5
budget_usd: 4
deadline: 2099-01-01T00:00:00Z
resources:
  gpus: 1
  cpus: 2
  memory_gb: 4
"""


@pytest.fixture
def service(tmp_path: Path, agents: GatedAgents) -> Iterator[Service]:
    from gpuscout.providers.fake import FakeProvider

    svc = make_service(tmp_path / "home", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       FakeProvider(address_for=address_for), agents)
    yield svc
    agents.release.set()
    close_service(svc)


@pytest.fixture
def server(service: Service) -> Iterator[ServerThread]:
    with ServerThread(service) as running:
        yield running


@pytest.fixture
def cli(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Iterator[CliRunner]:
    monkeypatch.setenv("GPUSCOUT_URL", server.url)
    monkeypatch.setenv("GPUSCOUT_API_TOKEN", TOKEN)
    monkeypatch.setenv("GPUSCOUT_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("COLUMNS", "200")
    yield CliRunner()


def invoke(runner: CliRunner, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    output = result.output
    assert "Traceback" not in output
    assert result.exit_code == code, output
    if code == 1:  # one red line, on stderr
        assert result.stderr.startswith("error: ")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return output


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- submit, jobs, show, cancel ---------------------------------------------------------


def test_submit_a_yaml_file_then_list_show_and_cancel_it(
        cli: CliRunner, service: Service, tmp_path: Path) -> None:
    job_id = invoke(cli, "submit", write(tmp_path, "job.yaml", JOB_YAML)).strip()
    assert job_id.startswith("job-")
    job = service.repo.get_job(job_id)
    assert (job.spec.name, job.spec.budget_usd, job.spec.resources.gpus,
            job.spec.resources.cpus) == ("yaml-job", 4, 1, 2)
    assert job.spec.deadline is not None and job.spec.deadline.year == 2099

    listed = invoke(cli, "jobs")
    assert job_id in listed and "yaml-job" in listed and "pending" in listed

    make_g4_spot_unavailable(service)
    run_until(service, job_id, JobStatus.RUNNING)
    service.plane.scout_once(force=True)
    listed = invoke(cli, "jobs")
    assert "running" in listed and "p3.2xlarge spot us-east-1a" in listed

    shown = invoke(cli, "show", job_id)
    for text in (job_id, "yaml-job", "running", P3_SPOT_A, f"/endpoints/{job_id}/",
                 "Migrations (0)", "Recent events", "submitted", "scout: stay [price at",
                 "per work hour $0.9180 ->", "remaining 0.50 work h", "budget left $4.00",
                 "deadline slack"):
        assert text in shown, text

    assert f"job {job_id} is cancelled" in invoke(cli, "cancel", job_id)
    assert service.repo.get_job(job_id).status == JobStatus.CANCELLED
    again = invoke(cli, "cancel", job_id, code=1)
    assert "409" in again and "already cancelled" in again
    assert "cancelled" in invoke(cli, "jobs", "--status", "cancelled")


def test_submit_with_flags(cli: CliRunner, service: Service) -> None:
    job_id = invoke(cli, "submit", "--name", "flagged", "--command", "python train.py",
                    "--gpus", "1", "--gpu-type", "V100", "--cpus", "4", "--memory-gb", "16",
                    "--expected-hours", "3", "--budget", "12.5", "--model", "resnet",
                    "--dataset-size-gb", "20", "--workload-type", "fine-tuning").strip()
    spec = service.repo.get_job(job_id).spec
    assert (spec.name, spec.command, spec.model, spec.workload_type.value) == (
        "flagged", "python train.py", "resnet", "fine-tuning")
    assert (spec.resources.gpus, spec.resources.gpu_type, spec.resources.cpus,
            spec.resources.memory_gb) == (1, "V100", 4, 16)
    assert (spec.expected_duration_hours, spec.budget_usd, spec.dataset_size_gb) == (3, 12.5, 20)


def test_flags_override_the_yaml_file(cli: CliRunner, service: Service,
                                      tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", JOB_YAML)
    job_id = invoke(cli, "submit", path, "--name", "renamed", "--gpus", "0").strip()
    spec = service.repo.get_job(job_id).spec
    assert (spec.name, spec.resources.gpus, spec.resources.cpus) == ("renamed", 0, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ncommand: [unclosed\n", "not valid YAML at line"),
    ("- name: x\n- command: y\n", "must be a mapping"),
    ("name: only-a-name\n", "invalid job: command: Field required"),  # (checked before sending)
    ("name: x\ncommand: y\nresources:\n  gpus: -1\n", "resources.gpus"),
    ("name: x\ncommand: y\nbudget_usd: -3\n", "budget_usd"),
    ("name: x\ncommand: y\nworkload_type: mining\n", "workload_type"),
    ("name: x\ncommand: y\ndeadline: 2001-01-01T00:00:00Z\n", "deadline: must be in the future"),
    ("name: x\ncommand: y\ncolour: blue\n", "colour: Extra inputs are not permitted"),
])
def test_a_bad_job_file_is_one_line_naming_the_problem(
        cli: CliRunner, service: Service, tmp_path: Path, text: str, message: str) -> None:
    output = invoke(cli, "submit", write(tmp_path, "bad.yaml", text), code=1)
    assert message in output
    assert service.repo.list_jobs() == []


def test_a_missing_command_is_named(cli: CliRunner, tmp_path: Path) -> None:
    output = invoke(cli, "submit", write(tmp_path, "job.yaml", "name: x\n"), code=1)
    assert "command: Field required" in output
    output = invoke(cli, "submit", str(tmp_path / "missing.yaml"), code=1)
    assert "cannot read job file" in output and "No such file" in output
    assert "at least --name and --command" in invoke(cli, "submit", code=1)


# --- market, migrate, instances -------------------------------------------------------------


def test_market_lists_offers_and_market_set_changes_one(cli: CliRunner,
                                                        service: Service) -> None:
    listed = invoke(cli, "market")
    assert P3_SPOT_A in listed and "0.9180" in listed

    changed = invoke(cli, "market", "set", P3_SPOT_A, "--price", "0.5", "--unavailable")
    assert f"{P3_SPOT_A}: $0.5000/h, unavailable" in changed
    offer = service.repo.get_offer(P3_SPOT_A)
    assert (offer.price_per_hour, offer.available) == (0.5, False)
    assert P3_SPOT_A not in invoke(cli, "market", "--available-only")

    invoke(cli, "market", "set", P3_SPOT_A, "--available")
    assert service.repo.get_offer(P3_SPOT_A).available

    assert "give --price" in invoke(cli, "market", "set", P3_SPOT_A, code=1)
    assert "price_per_hour" in invoke(cli, "market", "set", P3_SPOT_A, "--price", "0", code=1)
    assert "offer nope not found" in invoke(cli, "market", "set", "nope", "--price", "1", code=1)


def test_migrate_and_instances(cli: CliRunner, service: Service) -> None:
    make_g4_spot_unavailable(service)
    job = service.plane.submit(JobSpec(name="mover", command="train",
                                       resources=Resources(gpus=1)))
    run_until(service, job.id, JobStatus.RUNNING)
    service.plane.update_offer(G4_SPOT_B, available=True)

    assert "already runs on this offer" in invoke(cli, "migrate", job.id, "--to", P3_SPOT_A,
                                                  "--yes", code=1)
    output = invoke(cli, "migrate", job.id, "--offer", G4_SPOT_B, "--yes")
    assert "saves $" in output and "cheaper" in output
    assert f"{P3_SPOT_A} -> {G4_SPOT_B}" in output
    service.plane.wait_for_migrations()
    shown = invoke(cli, "show", job.id)
    assert "Migrations (1)" in shown and "manual" in shown and "completed" in shown
    assert "g4dn.xlarge spot us-east-1b" in shown and "resume" in shown

    instances = invoke(cli, "instances", "--job", job.id)
    assert "Instances (2)" in instances
    assert "terminated" in instances and "running" in instances
    assert "job job-nope not found" in invoke(cli, "migrate", "job-nope", code=1)


P3_ON_DEMAND_A = "local:us-east-1a:p3.2xlarge:on-demand"


def running_mover(service: Service) -> str:
    make_g4_spot_unavailable(service)
    job = service.plane.submit(JobSpec(name="mover", command="train",
                                       resources=Resources(gpus=1)))
    run_until(service, job.id, JobStatus.RUNNING)
    return job.id


def test_migrate_to_a_dearer_offer_shows_the_figures_and_asks(
        cli: CliRunner, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = running_mover(service)
    monkeypatch.setattr("gpuscout.cli.main._interactive", lambda: True)
    declined = cli.invoke(app, ["migrate", job_id, "--to", P3_ON_DEMAND_A], input="n\n")
    assert declined.exit_code == 1, declined.output
    # $0.918/h -> $3.06/h: $2.142 more per work hour, 233% dearer.
    assert "$3.06/h" in declined.output and "costs $2.14 more per remaining work hour" in (
        declined.output)
    assert "233% dearer" in declined.output and "-233%" not in declined.output
    assert "Move to this dearer offer?" in declined.output
    assert "not moved" in declined.stderr
    assert service.repo.list_migrations(job_id=job_id) == []

    accepted = cli.invoke(app, ["migrate", job_id, "--to", P3_ON_DEMAND_A], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"{P3_SPOT_A} -> {P3_ON_DEMAND_A}" in accepted.output
    service.plane.wait_for_migrations()
    shown = invoke(cli, "show", job_id)
    assert "233% dearer expected" in shown and "cheaper expected" not in shown


def test_migrate_to_a_named_offer_without_a_terminal_needs_yes(
        cli: CliRunner, service: Service) -> None:
    job_id = running_mover(service)
    result = cli.invoke(app, ["migrate", job_id, "--to", P3_ON_DEMAND_A])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: not moving") and "--yes" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert service.repo.list_migrations(job_id=job_id) == []

    output = invoke(cli, "migrate", job_id, "--to", P3_ON_DEMAND_A, "--yes")
    assert "233% dearer" in output and f"-> {P3_ON_DEMAND_A}" in output
    service.plane.wait_for_migrations()


def test_migrate_without_a_target_refuses_when_nothing_saves(
        cli: CliRunner, service: Service) -> None:
    job_id = running_mover(service)
    assert "no other offer saves" in invoke(cli, "migrate", job_id, code=1)
    service.plane.update_offer(G4_SPOT_B, available=True)
    assert f"{P3_SPOT_A} -> {G4_SPOT_B}" in invoke(cli, "migrate", job_id)
    service.plane.wait_for_migrations()


# --- errors -------------------------------------------------------------------------------------


def test_unknown_job_and_wrong_token_are_one_line_errors(cli: CliRunner) -> None:
    assert "404" in invoke(cli, "show", "job-nope", code=1)
    assert "job job-nope not found" in invoke(cli, "cancel", "job-nope", code=1)
    output = invoke(cli, "cancel", "job-nope", "--token", "wrong", code=1)
    assert "401" in output and "GPUSCOUT_API_TOKEN" in output


def test_the_token_is_read_from_gpuscout_home(cli: CliRunner, service: Service,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv("GPUSCOUT_API_TOKEN")
    home = tmp_path / "home-with-token"
    home.mkdir()
    (home / "api_token").write_text(TOKEN + "\n")
    monkeypatch.setenv("GPUSCOUT_HOME", str(home))
    job_id = invoke(cli, "submit", "--name", "n", "--command", "c").strip()
    assert service.repo.get_job(job_id).spec.name == "n"
    monkeypatch.setenv("GPUSCOUT_HOME", str(tmp_path / "empty-home"))
    assert "401" in invoke(cli, "submit", "--name", "n", "--command", "c", code=1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_api_is_a_friendly_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for args in (["jobs"], ["--url", url, "market"], ["show", "job-x"]):
        result = CliRunner().invoke(app, [*args, "--url", url] if args[0] != "--url" else args)
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert result.stderr.strip() == (
            f"error: cannot reach the GPU Scout API at {url}: is `gpuscout up` running?")


# --- the real entry point ---------------------------------------------------------------


def test_the_installed_command_reports_an_unreachable_url_without_a_traceback() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run([str(GPUSCOUT), "jobs"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPUSCOUT_URL": url})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert f"cannot reach the GPU Scout API at {url}" in done.stderr


def test_up_serves_until_interrupted(tmp_path: Path) -> None:
    port = closed_port()
    env = {**os.environ, "GPUSCOUT_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("GPUSCOUT_API_TOKEN", None)
    proc = subprocess.Popen([str(GPUSCOUT), "up", "--port", str(port), "--boot-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "gpuscout up did not serve in time"
            time.sleep(0.1)
        token = (tmp_path / "home" / "api_token").read_text().strip()
        offers = httpx.get(f"http://127.0.0.1:{port}/api/v1/offers", timeout=5).json()
        assert offers["count"] > 0  # the market was seeded by the running plane
        refused = httpx.post(f"http://127.0.0.1:{port}/api/v1/jobs", json={}, timeout=5)
        assert refused.status_code == 401
        invalid = httpx.post(f"http://127.0.0.1:{port}/api/v1/jobs", json={}, timeout=5,
                             headers={"Authorization": f"Bearer {token}"})
        assert invalid.status_code == 422
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "GPU Scout is up" in output and "GPU Scout stopped" in output
    assert "Traceback" not in output


def test_up_refuses_a_bad_setting_naming_the_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["up", "--home", str(tmp_path), "--savings-threshold",
                                      "1.5"])
    assert result.exit_code == 1
    assert "--savings-threshold / GPUSCOUT_SAVINGS_THRESHOLD" in result.stderr
    result = CliRunner().invoke(app, ["up", "--home", str(tmp_path), "--market", "bogus"])
    assert result.exit_code == 1 and "--market" in result.stderr


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["up", "--home", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output


def test_migrate_to_a_named_offer_says_first_when_the_job_cannot_move(
        cli: CliRunner, service: Service) -> None:
    job_id = running_mover(service)
    service.plane.cancel(job_id)
    said = invoke(cli, "migrate", job_id, "--to", P3_ON_DEMAND_A, code=1)
    assert f"job {job_id} is cancelled; only a running job can move" in said
    assert "confirmation" not in said
    assert "job job-nope not found" in invoke(cli, "migrate", "job-nope", "--to",
                                              P3_ON_DEMAND_A, code=1)
