"""`gpuscout submit` with a user's project (workdir, setup, envs, secrets),
SkyPilot task files, and `gpuscout logs`, against a real API server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuscout.cli.main import app
from gpuscout.domain import Capacity
from gpuscout.joblog import format_line
from gpuscout.service import Service
from gpuscout.workdir import key_of
from tests.integration.test_cli import cli, invoke, server, service, write

__all__ = ["cli", "server", "service"]  # test_cli's fixtures

SKYPILOT = Path(__file__).parents[1] / "unit" / "data" / "skypilot"


def job_of(output: str) -> str:
    """The job id: the last line (notes and the workdir's upload go to stderr)."""
    return output.strip().splitlines()[-1]


def project(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    (code / ".git").mkdir(parents=True)
    (code / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (code / "train.py").write_text("print('training')\n")
    (code / "requirements.txt").write_text("numpy\n")
    (code / ".gitignore").write_text("*.ckpt\n")
    (code / "old.ckpt").write_bytes(b"\0" * 100)
    return code


def test_a_skypilot_gpu_task_with_workdir_setup_and_envs(
        cli: CliRunner, service: Service, tmp_path: Path) -> None:
    project(tmp_path)
    task = tmp_path / "train_gpu.yaml"
    shutil.copy(SKYPILOT / "train_gpu.yaml", task)
    result = cli.invoke(app, ["submit", str(task)])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert "note: resources.disk_size: ignored" in result.stderr
    spec = service.repo.get_job(job_id).spec
    assert spec.name == "resnet-train" and spec.setup == "pip install -r requirements.txt\n"
    assert spec.command.startswith("python train.py --epochs $EPOCHS")
    assert dict(spec.envs) == {"EPOCHS": "10", "LR": "0.001",
                               "DATA_BUCKET": "s3://example-datasets/imagenet"}
    assert (spec.resources.gpus, spec.resources.gpu_type, spec.resources.cpus,
            spec.resources.memory_gb) == (1, "V100", 8.0, 32.0)
    # The folder (resolved next to the task file) went to the store, packed
    # without .git and what .gitignore names.
    assert spec.workdir is not None and spec.workdir.startswith("sha256:")
    store = service.plane.ctx.store
    assert store.exists(key_of(spec.workdir))
    again = job_of(invoke(cli, "submit", str(task)))
    assert service.repo.get_job(again).spec.workdir == spec.workdir  # stored once per content


def test_a_skypilot_spot_task_keeps_its_secret_out_of_the_api(
        cli: CliRunner, service: Service) -> None:
    job_id = job_of(invoke(cli, "submit", str(SKYPILOT / "spot.yaml")))
    spec = service.repo.get_job(job_id).spec
    assert (spec.resources.capacity, spec.resources.gpu_type, spec.resources.region) == (
        Capacity.SPOT, "T4", "us-east-1")
    assert spec.max_restarts_on_errors == 3 and spec.secret_names == ("HF_TOKEN",)
    shown = invoke(cli, "show", job_id)
    assert "hf-placeholder-token" not in shown
    assert "HF_TOKEN" in shown and "0 of 3" in shown and "capacity: spot" in shown


def test_a_set_of_accelerators_is_any_of_them(cli: CliRunner, tmp_path: Path,
                                              service: Service) -> None:
    # The example asks for 64 GB; the local catalog's V100 machine has 61.
    text = (SKYPILOT / "any_gpu.yaml").read_text().replace("64GB", "32GB")
    job_id = job_of(invoke(cli, "submit", write(tmp_path, "any.yaml", text)))
    resources = service.repo.get_job(job_id).spec.resources
    assert set(resources.gpu_types) == {"V100", "A100"} and resources.gpus == 1
    result = cli.invoke(app, ["submit", str(SKYPILOT / "any_gpu.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("error: invalid job: 422")
    assert "no offer with 1 GPU and GPU type V100 or A100 has 64 GB memory" in result.stderr


def test_a_skypilot_cpu_task_goes_to_a_cpu_instance(cli: CliRunner, service: Service) -> None:
    job_id = job_of(invoke(cli, "submit", str(SKYPILOT / "cpu_only.yaml")))
    spec = service.repo.get_job(job_id).spec
    assert (spec.resources.gpus, spec.resources.cpus, spec.resources.capacity) == (
        0, 4.0, Capacity.ON_DEMAND)
    for _ in range(5):
        service.plane.reconcile_once()
    offer_id = service.repo.get_job(job_id).offer_id
    assert offer_id is not None and ":c5.xlarge:on-demand" in offer_id


def test_a_key_gpu_scout_cannot_honour_is_one_line_naming_it(
        cli: CliRunner, service: Service) -> None:
    output = invoke(cli, "submit", str(SKYPILOT / "multinode.yaml"), code=1)
    assert "num_nodes: 4 nodes asked" in output
    assert service.repo.list_jobs() == []


@pytest.mark.parametrize(("args", "words"), [
    (["--workdir", "no-such-folder"], "workdir no-such-folder does not exist"),
    (["--secret", "NOT_SET_ANYWHERE_42"], "NOT_SET_ANYWHERE_42 is not set in this shell"),
    (["--env", "=x"], "expected KEY=VALUE"),
])
def test_bad_project_options_are_one_line(cli: CliRunner, service: Service, tmp_path: Path,
                                          args: list[str], words: str) -> None:
    output = invoke(cli, "submit", "--name", "n", "--command", "true", *args, code=1)
    assert words in output
    assert service.repo.list_jobs() == []


def test_flags_give_workdir_setup_envs_and_secrets(
        cli: CliRunner, service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = project(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "from-the-shell")
    job_id = job_of(invoke(cli, "submit", "--name", "n", "--command", "python train.py",
                           "--workdir", str(code), "--setup", "pip install -r requirements.txt",
                           "--env", "A=1", "--secret", "WANDB_API_KEY"))
    spec = service.repo.get_job(job_id).spec
    assert (dict(spec.envs), spec.secret_names, spec.setup) == (
        {"A": "1"}, ("WANDB_API_KEY",), "pip install -r requirements.txt")
    sealed = service.repo.job_row_fields(job_id, "secrets_sealed")["secrets_sealed"]
    assert service.ctx.secretbox.open(sealed) == {"WANDB_API_KEY": "from-the-shell"}  # type: ignore[union-attr]


def test_logs_prints_the_log_and_its_tail(cli: CliRunner, service: Service) -> None:
    job_id = job_of(invoke(cli, "submit", "--name", "n", "--command", "true", "--gpus", "1"))
    for _ in range(5):
        service.plane.reconcile_once()
    instance_id = service.repo.get_job(job_id).instance_id
    service.plane.ctx.store.put(
        f"jobs/{job_id}/logs/{instance_id}/00000000.log",
        "".join(format_line(1e9 + i, f"line {i}") for i in range(5)).encode())
    lines = invoke(cli, "logs", job_id).splitlines()
    assert lines[0].startswith(f"-- placed on {instance_id}") and lines[-1].endswith("line 4")
    assert invoke(cli, "logs", job_id, "--tail", "2").splitlines() == lines[-2:]
    assert "404" in invoke(cli, "logs", "job-nope", code=1)


def test_the_readmes_skypilot_task_and_its_gpu_scout_job_are_the_same_job() -> None:
    import yaml  # type: ignore[import-untyped]

    from gpuscout.api.schemas import JobCreate
    from gpuscout.skypilot import from_skypilot

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text[text.index("<th>SkyPilot"):]
    blocks = [part.split("```", 1)[0] for part in table.split("```yaml\n")[1:3]]
    sky, ours = (yaml.safe_load(block) for block in blocks)
    assert "run" in sky and "command" in ours
    mapped = from_skypilot(sky).body
    assert mapped.pop("workdir") == ours.pop("workdir") == "."  # the CLI packs the folder
    assert JobCreate(**mapped).to_spec() == JobCreate(**ours).to_spec()


def test_plan_takes_the_same_files_as_submit(cli: CliRunner, tmp_path: Path) -> None:
    project(tmp_path)
    task = tmp_path / "train_gpu.yaml"
    shutil.copy(SKYPILOT / "train_gpu.yaml", task)
    result = cli.invoke(app, ["plan", str(task)])  # a SkyPilot file with a workdir
    assert result.exit_code == 0, result.output
    assert "Choice:" in result.stdout and "p3.2xlarge" in result.stdout
    ours = write(tmp_path, "job.yaml", "name: n\nworkdir: code\ncommand: python train.py\n"
                 "resources: {gpus: 1}\n")
    result = cli.invoke(app, ["plan", ours])
    assert result.exit_code == 0 and "Choice:" in result.stdout, result.output
    missing = write(tmp_path, "gone.yaml", "name: n\nworkdir: nowhere\ncommand: c\n")
    result = cli.invoke(app, ["plan", missing])
    assert result.exit_code == 1 and "workdir" in result.stderr and "does not exist" in (
        result.stderr)


def test_a_skypilot_secret_left_empty_takes_its_value_from_secret(
        cli: CliRunner, service: Service, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    task = write(tmp_path, "task.yaml", "run: python train.py\nresources:\n  accelerators: T4\n"
                 "secrets:\n  HF_TOKEN: null\nenvs:\n  EPOCHS: 3\n")
    result = cli.invoke(app, ["submit", task])
    assert result.exit_code == 1 and "secrets.HF_TOKEN" in result.stderr
    monkeypatch.setenv("HF_TOKEN", "hf-from-shell")
    job_id = job_of(invoke(cli, "submit", task, "--secret", "HF_TOKEN"))
    sealed = service.repo.job_row_fields(job_id, "secrets_sealed")["secrets_sealed"]
    assert service.ctx.secretbox.open(sealed) == {"HF_TOKEN": "hf-from-shell"}  # type: ignore[union-attr]
    assert dict(service.repo.get_job(job_id).spec.envs) == {"EPOCHS": "3"}


def test_numbers_in_envs_are_text(cli: CliRunner, service: Service, tmp_path: Path) -> None:
    job = write(tmp_path, "job.yaml", "name: n\ncommand: c\nenvs: {STEPS: 600, LR: 0.01, "
                "DEBUG: true}\n")
    spec = service.repo.get_job(job_of(invoke(cli, "submit", job))).spec
    assert dict(spec.envs) == {"STEPS": "600", "LR": "0.01", "DEBUG": "True"}


def test_jobs_piped_keep_one_line_per_job_and_json_for_scripts(
        server: object, service: Service, tmp_path: Path) -> None:
    """A real `gpuscout` process with its output piped, as `gpuscout jobs |
    grep` runs it: names and offers are not wrapped at 80 columns."""
    import json as json_
    import os
    import subprocess
    import sys

    name = "a-rather-long-job-name-that-used-to-wrap-in-pieces"
    job = service.plane.submit(JobSpec_of(name))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(GPUSCOUT_URL=server.url, GPUSCOUT_API_TOKEN="t")  # type: ignore[attr-defined]
    gpuscout = str(Path(sys.executable).parent / "gpuscout")
    listed = subprocess.run([gpuscout, "jobs"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert any(name in line and job.id in line for line in listed.stdout.splitlines())
    as_json = subprocess.run([gpuscout, "jobs", "--json"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert [j["id"] for j in json_.loads(as_json.stdout)] == [job.id]


def JobSpec_of(name: str):  # type: ignore[no-untyped-def]
    from gpuscout.domain import JobSpec, Resources

    return JobSpec(name=name, command="true", resources=Resources(gpus=1))
