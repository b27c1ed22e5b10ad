"""The real control plane on the AWS provider (EC2 on moto's server).

Moto runs no code, so each EC2 instance's side is played by a real process:
the user-data EC2 stored for it, run with bash (tests/integration/aws_moto.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuscout import workdir
from gpuscout.config import Settings
from gpuscout.controllers.agent_client import AgentClient
from gpuscout.controllers.context import Timeouts
from gpuscout.domain import Capacity, JobSpec, JobStatus, Resources
from gpuscout.providers.aws import AwsProvider
from gpuscout.providers.base import LaunchRequest
from gpuscout.server import ServerThread
from gpuscout.service import build_service
from tests.e2e.conftest import E2E, TOKEN, linreg_command, standalone_model
from tests.e2e.test_user_project_e2e import CANARY, TRAIN_PY
from tests.integration.aws_moto import (
    TEST_BUCKET,
    TEST_SECRET,
    TEST_STORE_URL,
    AgentAwsProvider,
    FaultyEc2,
    ec2_client,
    new_config,
)

pytestmark = pytest.mark.usefixtures("aws_env")

# Two types keep the market small and the choice obvious.
TABLE_TYPES = ("g4dn.xlarge", "g5.xlarge")


def small_table(provider_table: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {("us-east-1", t): provider_table[t] for t in TABLE_TYPES}


def test_capacity_error_marks_the_offer_unavailable_and_the_next_one_is_launched(
        tmp_path: Path) -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    settings = Settings(home=tmp_path / "home", api_token=TOKEN)
    service = build_service(settings, provider=provider, agents=AgentClient())
    plane = service.plane
    plane.feed.start(service.repo, service.ctx.clock.now())  # what plane.start() does first
    job = plane.submit(JobSpec(name="fallback", command="true",
                               resources=Resources(gpus=1, cpus=1, memory_gb=1)))
    launched: list[tuple[str, str, bool]] = []
    real_run = spy._client.run_instances

    def run_instances(**params: Any) -> Any:
        launched.append((params["InstanceType"], params["Placement"]["AvailabilityZone"],
                         "InstanceMarketOptions" in params))
        return real_run(**params)

    spy._client = _Override(spy._client, run_instances=run_instances)
    spy.fail("run_instances", "InsufficientInstanceCapacity")

    plane.reconcile_once()  # pending -> scouting
    plane.reconcile_once()  # first choice: refused
    first_choice = service.repo.get_job(job.id)
    assert first_choice.status == JobStatus.SCOUTING and first_choice.instance_id is None
    refused = [e for e in service.repo.list_events(job.id) if e.kind == "capacity"]
    assert len(refused) == 1 and "InsufficientInstanceCapacity" in refused[0].message
    refused_offer = refused[0].data["offer_id"]
    assert next(o for o in service.ctx.offers() if o.id == refused_offer).available is False

    plane.reconcile_once()  # the next best offer
    placed = service.repo.get_job(job.id)
    assert placed.status == JobStatus.PROVISIONING
    assert placed.offer_id and placed.offer_id != refused_offer
    itype, zone, spot = launched[-1]
    assert placed.offer_id == f"aws:{zone}:{itype}:{'spot' if spot else 'on-demand'}"
    ec2_instance = provider.get(placed.instance_id or "")
    assert ec2_instance.offer_id == placed.offer_id
    service.ctx.terminate(placed.instance_id or "")
    assert provider.list() == []


def test_the_reaper_finds_unowned_ec2_instances_by_tag(tmp_path: Path) -> None:
    provider = AwsProvider(new_config())
    service = build_service(Settings(home=tmp_path / "home", api_token=TOKEN),
                            provider=provider, agents=AgentClient())
    offer = next(o for o in provider.offers() if o.instance_type == "g4dn.xlarge")
    # Launched, then the control plane died before recording it (or lost its database).
    orphan = provider.launch(LaunchRequest(instance_id="i-orphan", job_id="j-gone",
                                           offer=offer, command="true", store_url=TEST_STORE_URL))
    stranger = AwsProvider(new_config())  # another cluster's: not ours to reap
    stranger.launch(LaunchRequest(instance_id="i-theirs", job_id="j-x", offer=offer,
                                  command="true", store_url=TEST_STORE_URL))
    assert service.plane.reaper.reap() == ["i-orphan"]
    raw = ec2_client().describe_instances(InstanceIds=[orphan.provider_ref])
    assert raw["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    assert [i.instance_id for i in stranger.list()] == ["i-theirs"]
    stranger.terminate("i-theirs")


@pytest.fixture
def aws_e2e(tmp_path: Path) -> Iterator[E2E]:
    home = tmp_path / "home"
    settings = Settings(home=home, api_token=TOKEN, scout_interval_s=0.5,
                        reconcile_interval_s=0.2, reaper_interval_s=5)
    base = AwsProvider(new_config())
    # The job's Elastic IP follows it from instance to instance.
    elastic_ip = ec2_client().allocate_address(Domain="vpc")["AllocationId"]
    provider = AgentAwsProvider(new_config(elastic_ip=elastic_ip), tmp_path / "machines",
                                table=small_table(base.table), client=FaultyEc2(ec2_client()))
    service = build_service(settings, provider=provider, agents=AgentClient())
    service.ctx.timeouts = Timeouts(health_s=15, checkpoint_s=20, resume_s=20, drain_s=5,
                                    lost_s=5)
    server = ServerThread(service, start_plane=True)
    try:
        server.start()
        env = E2E(service, server, provider)  # type: ignore[arg-type]
        try:
            yield env
        finally:
            server.stop()
            env.api.close()
    finally:
        for instance in provider.list():
            provider.terminate(instance.instance_id)
        provider.stop_all()


def test_a_job_migrates_from_one_ec2_instance_to_another(aws_e2e: E2E, tmp_path: Path) -> None:
    e2e = aws_e2e
    provider: AgentAwsProvider = e2e.provider  # type: ignore[assignment]
    steps, seed = 400, 3
    body = {
        "name": "linreg-aws", "model": "linreg", "expected_duration_hours": 0.01,
        "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
        "command": linreg_command(steps=steps, seed=seed, step_sleep=0.02,
                                  checkpoint_every=25),
    }
    response = e2e.api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = e2e.wait_status(job_id, "running", timeout_s=30)
    old_instance = job["instance_id"]
    old_ec2 = provider.get(old_instance)
    assert old_ec2.state.value == "running" and old_ec2.provider_ref.startswith("i-")
    # From the first placement: the job is marked running, then its
    # endpoint (the proxy route, then the Elastic IP) follows.
    e2e.wait(lambda: elastic_ip_holder(provider) == old_ec2.provider_ref, 10,
             "the Elastic IP on the first instance")
    e2e.wait_step(job_id, 40, timeout_s=30)

    # Move it to another type in another zone, by hand (a price drop or a
    # spot notice starts the same make-before-break move).
    offers = e2e.api.get("/api/v1/offers").json()["data"]
    current = next(o for o in offers if o["id"] == job["offer_id"])
    target = next(o for o in offers if o["instance_type"] != current["instance_type"]
                  and o["zone"] != current["zone"] and o["capacity"] == Capacity.SPOT)
    response = e2e.api.post(f"/api/v1/jobs/{job_id}/migrate",
                            json={"offer_id": target["id"], "confirm_dearer": True})
    assert response.status_code == 202, response.text
    m = e2e.wait_migration(job_id, 1, timeout_s=40)
    assert m["status"] == "completed", m
    assert (m["from_offer_id"], m["to_offer_id"]) == (current["id"], target["id"])
    assert m["resume_step"] == m["checkpoint_step"] + 1  # no step lost or repeated
    # Make-before-break: the replacement was ready before the old one checkpointed.
    assert m["replacement_ready_at"] <= m["checkpointed_at"] <= m["switched_at"]

    new_ec2 = provider.get(m["to_instance_id"])
    assert new_ec2.provider_ref != old_ec2.provider_ref
    assert provider.get(old_instance).state.value == "terminated"
    raw = ec2_client().describe_instances(InstanceIds=[new_ec2.provider_ref])
    placed = raw["Reservations"][0]["Instances"][0]
    assert placed["InstanceType"] == target["instance_type"]
    assert placed["Placement"]["AvailabilityZone"] == target["zone"]
    assert placed.get("InstanceLifecycle") == "spot"
    # Each instance ran the very user-data EC2 stored for it.
    assert "GPUSCOUT_STANDBY=1" in provider.user_data_of[m["to_instance_id"]]
    assert "GPUSCOUT_STANDBY=0" in provider.user_data_of[old_instance]

    # The job's stable endpoint follows it to the new instance, and so
    # does its Elastic IP.
    status = e2e.api.get(f"/endpoints/{job_id}/status")
    assert status.status_code == 200 and status.json()["instance_id"] == m["to_instance_id"]
    assert elastic_ip_holder(provider) == new_ec2.provider_ref

    job = e2e.wait_status(job_id, "completed", timeout_s=60)
    assert job["progress"]["step"] == steps
    model = e2e.api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json")
    assert model.status_code == 200, model.text
    assert model.content == standalone_model(tmp_path, steps=steps, seed=seed)
    assert json.loads(model.content)["steps"] == steps
    e2e.wait(lambda: provider.list() == [], 15, "every EC2 instance to be terminated")


def test_a_spot_interruption_reported_by_ec2_moves_the_job(aws_e2e: E2E,
                                                            tmp_path: Path) -> None:
    e2e = aws_e2e
    provider: AgentAwsProvider = e2e.provider  # type: ignore[assignment]
    steps, seed = 400, 8
    body = {
        "name": "linreg-spot", "expected_duration_hours": 0.01,
        "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
        "command": linreg_command(steps=steps, seed=seed, step_sleep=0.02,
                                  checkpoint_every=25),
    }
    response = e2e.api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = e2e.wait_status(job_id, "running", timeout_s=30)
    assert job["offer_id"].endswith(":spot")
    e2e.wait_step(job_id, 30, timeout_s=30)
    old = provider.get(job["instance_id"])

    provider.ec2.reclaim(old.provider_ref)  # EC2 marks the spot request for termination
    assert provider.get(job["instance_id"]).interruption_notice
    m = e2e.wait_migration(job_id, 1, timeout_s=40)
    assert m["status"] == "completed" and m["reason"] == "preemption", m
    assert m["resume_step"] == m["checkpoint_step"] + 1
    assert m["to_offer_id"].split(":")[1] != job["offer_id"].split(":")[1]  # another zone
    assert provider.get(old.instance_id).state.value == "terminated"

    job = e2e.wait_status(job_id, "completed", timeout_s=60)
    model = e2e.api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json")
    assert model.content == standalone_model(tmp_path, steps=steps, seed=seed)


def elastic_ip_holder(provider: AwsProvider) -> str | None:
    answer = ec2_client().describe_addresses(AllocationIds=[provider.config.elastic_ip])
    return answer["Addresses"][0].get("InstanceId")  # type: ignore[no-any-return]


class _Override:
    def __init__(self, client: Any, **operations: Any) -> None:
        self._client = client
        self._operations = operations

    def __getattr__(self, name: str) -> Any:
        return self._operations.get(name) or getattr(self._client, name)


def test_a_users_project_travels_through_s3_and_moves_between_ec2_instances(
        tmp_path: Path) -> None:
    """The project folder goes up once to the job's bucket, every instance
    unpacks it and runs setup before the command; logs are shipped to S3 and
    read back as one across the move; user-data stays under 16 KB and holds
    no secret (the secret reaches the agent after boot)."""
    home = tmp_path / "home"
    settings = Settings(home=home, api_token=TOKEN, scout_interval_s=0.5,
                        reconcile_interval_s=0.2, reaper_interval_s=5,
                        store_url=TEST_STORE_URL)
    base = AwsProvider(new_config())
    # The instances reach the bucket with their role's credentials (moto's here).
    role = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                       "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    provider = AgentAwsProvider(new_config(), tmp_path / "machines",
                                table=small_table(base.table), machine_env=role)
    service = build_service(settings, provider=provider, agents=AgentClient())
    service.ctx.timeouts = Timeouts(health_s=30, checkpoint_s=20, resume_s=20, drain_s=5,
                                    lost_s=5)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "train.py").write_text(TRAIN_PY)
    (project / ".gitignore").write_text("data/\n")
    (project / "data" / "big.bin").write_bytes(b"\0" * 1024)
    packed = workdir.pack(project)
    server = ServerThread(service, start_plane=True)
    server.start()
    e2e = E2E(service, server, provider)  # type: ignore[arg-type]
    try:
        uploaded = e2e.api.post("/api/v1/workdirs", content=packed.path.read_bytes(),
                                headers={"Content-Type": "application/gzip"})
        assert uploaded.status_code == 201 and uploaded.json()["ref"] == packed.ref
        assert boto3.client("s3").head_object(Bucket=TEST_BUCKET, Key=f"gpuscout/{packed.key}")
        body = {
            "name": "project-aws", "expected_duration_hours": 0.01,
            "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
            "workdir": packed.ref, "command": "python train.py 300",
            "setup": "python -c \"print('setup on ec2')\" && pip --version",
            "envs": {"RUN_LABEL": "on-aws"}, "secrets": {"WANDB_API_KEY": CANARY},
        }
        response = e2e.api.post("/api/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        job = e2e.wait_status(job_id, "running", timeout_s=60)
        e2e.wait_step(job_id, 40, timeout_s=30)
        offers = e2e.api.get("/api/v1/offers", params={"available": "true"}).json()["data"]
        target = min((o for o in offers if o["id"] != job["offer_id"] and o["gpus"] >= 1),
                     key=lambda o: o["cost_per_work_hour"])
        response = e2e.api.post(f"/api/v1/jobs/{job_id}/migrate",
                                json={"offer_id": target["id"], "confirm_dearer": True})
        assert response.status_code == 202, response.text
        m = e2e.wait_migration(job_id, 1, timeout_s=60)
        assert m["status"] == "completed", m
        e2e.wait_status(job_id, "completed", timeout_s=60)

        log = e2e.api.get(f"/api/v1/jobs/{job_id}/logs").text
        lines = log.splitlines()
        assert lines[0] == f"-- placed on {job['instance_id']} ({job['offer_id']}) --"
        assert sum(line.endswith("setup on ec2") for line in lines) == 2
        assert f"-- moved from {job['instance_id']} to {m['to_instance_id']} " \
               f"({m['to_offer_id']}) at step {m['checkpoint_step']} --" in lines
        assert any("label on-aws" in line for line in lines) and CANARY not in log
        assert lines[-1].endswith("done")
        for instance_id, script in provider.user_data_of.items():
            assert len(script.encode()) < 16 * 1024, instance_id
            assert CANARY not in script and TEST_SECRET not in script
            assert "GPUSCOUT_SECRET_NAMES=WANDB_API_KEY" in script
            assert f"GPUSCOUT_WORKDIR_REF={packed.ref}" in script
        chunks = boto3.client("s3").list_objects_v2(
            Bucket=TEST_BUCKET, Prefix=f"gpuscout/jobs/{job_id}/logs/")["Contents"]
        assert {c["Key"].split("/")[4] for c in chunks} == {job["instance_id"],
                                                            m["to_instance_id"]}
    finally:
        server.stop()
        e2e.api.close()
        packed.path.unlink(missing_ok=True)
        for instance in provider.list():
            provider.terminate(instance.instance_id)
        provider.stop_all()


def test_a_launch_ec2_refuses_for_its_own_reason_fails_the_job_after_bounded_tries(
        tmp_path: Path) -> None:
    """UnauthorizedOperation is not a capacity problem: the job is retried
    with backoff, a bounded number of times, then fails with EC2's error;
    a job submitted beside it is placed at once and is not held back."""
    from gpuscout.controllers.lifecycle import MAX_LAUNCH_FAILURES
    from gpuscout.domain import Capacity as C
    from tests.unit.test_controllers import ManualClock

    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy, table=small_table(
        AwsProvider(new_config()).table))
    clock = ManualClock()
    service = build_service(Settings(home=tmp_path / "home", api_token=TOKEN),
                            provider=provider, agents=AgentClient(), clock=clock)
    plane = service.plane
    plane.feed.start(service.repo, clock.now())
    pinned = next(o for o in service.ctx.offers() if o.instance_type == "g5.xlarge"
                  and o.capacity == C.ON_DEMAND)
    spy.refuse("g5.xlarge", pinned.zone, False, "UnauthorizedOperation")
    bad = plane.submit(JobSpec(name="bad", command="true", resources=Resources(
        gpus=1, instance_type="g5.xlarge", zone=pinned.zone, capacity=C.ON_DEMAND)))
    good = plane.submit(JobSpec(name="good", command="true",
                                resources=Resources(gpus=1, cpus=1, memory_gb=1)))
    try:
        plane.reconcile_once()  # pending -> scouting
        plane.reconcile_once()
        assert service.repo.get_job(good.id).status == JobStatus.PROVISIONING
        for _ in range(300):
            plane.reconcile_once()
            clock.sleep(2.0)
        job = service.repo.get_job(bad.id)
        assert job.status == JobStatus.FAILED, job
        assert job.error is not None and "UnauthorizedOperation" in job.error
        assert f"after {MAX_LAUNCH_FAILURES} tries" in job.error
        refused = [e for e in service.repo.list_events(bad.id) if e.kind == "launch_failed"]
        assert len(refused) == MAX_LAUNCH_FAILURES - 1  # the last one is the failure itself
    finally:
        for instance in provider.list():
            provider.terminate(instance.instance_id)
