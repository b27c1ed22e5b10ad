"""`gpuscout plan JOB.yaml`: the offers considered, the choice and the
expected cost, without launching anything; over the local catalog and over
live AWS offers (EC2 on moto's server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuscout.cli.main import app
from tests.integration.aws_moto import ec2_client

JOB = """\
name: resnet
command: python train.py
expected_duration_hours: 10
budget_usd: 20
resources: {gpus: 1, gpu_type: V100, cpus: 4, memory_gb: 16}
"""


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("GPUSCOUT_HOME", str(tmp_path / "home"))
    return CliRunner()


def job_file(tmp_path: Path, text: str = JOB) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_plan_over_the_local_catalog(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(job_file(tmp_path))])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line.strip().startswith("local:")]
    assert len(rows) == 36  # every offer of the catalog is shown
    # Cheapest per work hour first: the T4s (excluded: wrong GPU), then the chosen V100.
    assert "g4dn.xlarge:spot" in rows[0] and "excluded: GPU T4, needs V100" in rows[0]
    chosen = [r for r in rows if "chosen" in r]
    assert len(chosen) == 1 and "local:us-east-1a:p3.2xlarge:spot" in chosen[0]
    assert "$9.18" in chosen[0]  # 10 h / speed 1 x $0.918
    assert any("excluded: 0 GPUs, needs 1" in r for r in rows)
    assert "Choice: local:us-east-1a:p3.2xlarge:spot" in result.output
    assert "Expected cost: $9.18" in result.output
    assert "within the budget of $20.00" in result.output


def test_plan_names_a_bad_field(runner: CliRunner, tmp_path: Path) -> None:
    bad = JOB.replace("expected_duration_hours: 10", "expected_duration_hours: -1")
    result = runner.invoke(app, ["plan", str(job_file(tmp_path, bad))])
    assert result.exit_code == 1
    assert "expected_duration_hours" in result.output and "Traceback" not in result.output


def test_plan_when_nothing_fits(runner: CliRunner, tmp_path: Path) -> None:
    text = JOB.replace("gpu_type: V100", "gpu_type: H100")
    result = runner.invoke(app, ["plan", str(job_file(tmp_path, text))])
    assert result.exit_code == 1
    assert "No placement now" in result.output
    assert "chosen" not in result.output


@pytest.mark.usefixtures("aws_env")
def test_plan_over_live_aws_offers_launches_nothing(runner: CliRunner, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSCOUT_AWS_CLUSTER", "plan-test")
    text = JOB.replace("gpu_type: V100", "gpu_type: A10G")
    result = runner.invoke(app, ["plan", str(job_file(tmp_path, text)), "--provider", "aws"])
    assert result.exit_code == 0, result.output
    rows = [line.strip() for line in result.output.splitlines()
            if line.strip().startswith("aws:")]
    assert rows and any(":g4dn.xlarge:on-demand" in r and "excluded: GPU T4" in r for r in rows)
    chosen = [r for r in rows if "chosen" in r]
    assert len(chosen) == 1 and ":g5." in chosen[0] and ":spot" in chosen[0]
    assert "Choice: aws:" in result.output and "Expected cost:" in result.output
    running = ec2_client().describe_instances(Filters=[
        {"Name": "tag:gpuscout:cluster", "Values": ["plan-test"]}])
    assert running["Reservations"] == []
