"""The REST API over a real Service (SQLite and PostgreSQL, real store, real
control plane driven by hand) with the fake provider and in-memory agents."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpuscout.agent.protocol import artifacts_prefix
from gpuscout.api import create_app
from gpuscout.api.deps import is_loopback
from gpuscout.api.routes import jobs as jobs_routes
from gpuscout.demo import DEMO_TRACE
from gpuscout.domain import (
    Instance,
    InstanceStatus,
    JobStatus,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
)
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service
from tests.api_fixtures import (
    AUTH,
    G4_SPOT_B,
    P3_SPOT_A,
    GatedAgents,
    TestClient,
    close_service,
    make_g4_spot_unavailable,
    make_service,
    run_until,
)

JOB: dict[str, Any] = {
    "name": "train-linreg",
    "model": "linear-regression",
    "dataset_size_gb": 0.5,
    "workload_type": "training",
    "expected_duration_hours": 2,
    "budget_usd": 10,
    "resources": {"gpus": 1, "gpu_type": None, "cpus": 2, "memory_gb": 4},
    "command": "python -m gpuscout.examples.linreg --steps 100",
    "savings_threshold": 0.3,
    "scout_interval_s": 30,
}


def submit(client: TestClient, **changes: Any) -> dict[str, Any]:
    response = client.post("/api/v1/jobs", json={**JOB, **changes}, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def running_job(client: TestClient, service: Service) -> str:
    make_g4_spot_unavailable(service)
    job_id: str = submit(client)["id"]
    run_until(service, job_id, JobStatus.RUNNING)
    return job_id


def fields_named(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    return [e["field"] for e in response.json()["detail"]]


# --- submit and validation -----------------------------------------------------


def test_submit_answers_201_with_the_job_and_its_spec(client: TestClient) -> None:
    deadline = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    job = submit(client, deadline=deadline)
    assert job["id"].startswith("job-")
    assert job["name"] == "train-linreg"
    assert job["status"] == "pending"
    assert job["progress"] == {"step": 0, "total_steps": None, "loss": None}
    assert job["endpoint"] == f"/endpoints/{job['id']}/"
    assert (job["offer_id"], job["instance_id"], job["cost_usd"], job["savings_usd"]) == (
        None, None, 0.0, 0.0)
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    spec = job["spec"]
    assert spec["command"] == JOB["command"]
    assert spec["resources"] == {"gpus": 1, "gpu_type": None, "cpus": 2.0, "memory_gb": 4.0,
                                 "capacity": None, "instance_type": None, "region": None,
                                 "zone": None}
    assert (spec["budget_usd"], spec["savings_threshold"], spec["scout_interval_s"]) == (
        10, 0.3, 30)
    assert datetime.fromisoformat(spec["deadline"]) == datetime.fromisoformat(deadline)
    assert client.get(f"/api/v1/jobs/{job['id']}").json() == job


def test_submit_fills_defaults_for_a_minimal_job(client: TestClient) -> None:
    response = client.post("/api/v1/jobs", json={"name": "n", "command": "true"}, headers=AUTH)
    assert response.status_code == 201
    spec = response.json()["spec"]
    assert spec["workload_type"] == "training"
    assert spec["resources"] == {"gpus": 0, "gpu_type": None, "cpus": 1.0, "memory_gb": 1.0,
                                 "capacity": None, "instance_type": None, "region": None,
                                 "zone": None}
    assert (spec["workdir"], spec["setup"], spec["envs"], spec["secrets"],
            spec["max_restarts_on_errors"]) == (None, None, {}, [], 0)


PAST = (datetime.now(UTC) - timedelta(hours=1)).isoformat()


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in JOB.items() if k != key}


@pytest.mark.parametrize(("body", "field"), [
    (without("command"), "command"),
    (without("name"), "name"),
    ({**JOB, "command": ""}, "command"),
    ({**JOB, "command": "   "}, "command"),
    ({**JOB, "budget_usd": -5}, "budget_usd"),
    ({**JOB, "budget_usd": 0}, "budget_usd"),
    ({**JOB, "workload_type": "mining"}, "workload_type"),
    ({**JOB, "priority": "high"}, "priority"),
    ({**JOB, "deadline": PAST}, "deadline"),
    ({**JOB, "deadline": "next tuesday"}, "deadline"),
    ({**JOB, "resources": {"gpus": -1}}, "resources.gpus"),
    ({**JOB, "resources": {"cpus": 0}}, "resources.cpus"),
    ({**JOB, "resources": {"memory_gb": -1}}, "resources.memory_gb"),
    ({**JOB, "resources": {"gpus": 1, "tpus": 2}}, "resources.tpus"),
    ({**JOB, "expected_duration_hours": 0}, "expected_duration_hours"),
    ({**JOB, "savings_threshold": 1}, "savings_threshold"),
    ({**JOB, "savings_threshold": -0.1}, "savings_threshold"),
    ({**JOB, "scout_interval_s": 0}, "scout_interval_s"),
    ({**JOB, "dataset_size_gb": "big"}, "dataset_size_gb"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_validation_error_names_its_field(client: TestClient, service: Service,
                                                body: dict[str, Any], field: str) -> None:
    response = client.post("/api/v1/jobs", json=body, headers=AUTH)
    assert fields_named(response) == [field]
    assert response.json()["detail"][0]["msg"]
    assert service.repo.list_jobs() == []  # nothing half-written


@pytest.mark.parametrize(("path", "method", "raw", "field"), [
    ("/api/v1/jobs", "POST", b'{"name": "x", "command": "y", "budget_usd": Infinity}',
     "budget_usd"),
    ("/api/v1/jobs", "POST", b'{"name": "x", "command": "y", "expected_duration_hours": NaN}',
     "expected_duration_hours"),
    (f"/api/v1/offers/{P3_SPOT_A}", "PATCH", b'{"price_per_hour": Infinity}', "price_per_hour"),
])
def test_infinity_and_nan_are_refused(client: TestClient, service: Service, path: str,
                                      method: str, raw: bytes, field: str) -> None:
    response = client.request(method, path, content=raw,
                              headers={**AUTH, "content-type": "application/json"})
    assert fields_named(response) == [field]
    assert service.repo.list_jobs() == []
    assert service.repo.get_offer(P3_SPOT_A).price_per_hour == pytest.approx(0.918)


def test_a_body_that_is_not_json_is_a_422_naming_the_body(client: TestClient) -> None:
    response = client.post("/api/v1/jobs", content=b"{name: x", headers={
        **AUTH, "content-type": "application/json"})
    assert fields_named(response) == ["body"]
    assert "not valid JSON" in response.json()["detail"][0]["msg"]


# --- auth ------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_every_write_needs_the_token(client: TestClient, service: Service,
                                     headers: dict[str, str]) -> None:
    job_id = submit(client)["id"]
    calls = [
        ("POST", "/api/v1/jobs", JOB),
        ("DELETE", f"/api/v1/jobs/{job_id}", None),
        ("POST", f"/api/v1/jobs/{job_id}/migrate", None),
        ("PATCH", f"/api/v1/offers/{P3_SPOT_A}", {"price_per_hour": 0.01}),
    ]
    for method, path, body in calls:
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]
    assert service.repo.get_job(job_id).status == JobStatus.PENDING
    assert service.repo.get_offer(P3_SPOT_A).price_per_hour != 0.01
    assert len(service.repo.list_jobs()) == 1


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False),
    ("example.com", False), (None, False),
])
def test_what_counts_as_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_reads_are_open_on_loopback_and_need_the_token_from_elsewhere(
        service: Service) -> None:
    app = create_app(service)
    with TestClient(app, client=("127.0.0.1", 40000)) as local:
        assert local.get("/api/v1/jobs").status_code == 200
    with TestClient(app, client=("10.1.2.3", 40000)) as remote:
        response = remote.get("/api/v1/jobs")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert remote.get("/api/v1/jobs", headers=AUTH).status_code == 200
        assert remote.get("/metrics").status_code == 401
        assert remote.get("/healthz").status_code == 200  # probes stay open


# --- reads -----------------------------------------------------------------------


def test_list_jobs_with_status_filter(client: TestClient, service: Service) -> None:
    first = submit(client, name="a")["id"]
    second = submit(client, name="b")["id"]
    service.plane.cancel(second)
    listed = client.get("/api/v1/jobs").json()
    assert listed["count"] == 2 and [j["id"] for j in listed["data"]] == [first, second]
    pending = client.get("/api/v1/jobs", params={"status": "pending"}).json()
    assert [j["id"] for j in pending["data"]] == [first]
    both = client.get("/api/v1/jobs?status=pending&status=cancelled").json()
    assert both["count"] == 2
    assert fields_named(client.get("/api/v1/jobs?status=sleeping")) == ["status"]


def test_a_running_job_reports_progress_offer_instance_and_events(
        client: TestClient, service: Service) -> None:
    job_id = running_job(client, service)
    service.plane.reconcile_once()
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "running"
    assert job["offer_id"] == P3_SPOT_A
    assert job["instance_id"] and job["started_at"]
    assert job["progress"]["step"] > 0 and job["progress"]["total_steps"] == 1000

    instances = client.get("/api/v1/instances", params={"job_id": job_id}).json()
    assert instances["count"] == 1
    instance = instances["data"][0]
    assert set(instance) >= {"id", "job_id", "offer_id", "status", "address"}
    assert (instance["id"], instance["status"], instance["offer_id"]) == (
        job["instance_id"], "running", P3_SPOT_A)
    assert client.get("/api/v1/instances", params={"job_id": "job-none"}).json()["count"] == 0

    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    assert events["count"] == len(events["data"]) >= 2
    assert events["data"][0]["kind"] == "submitted"
    assert {"id", "time", "kind", "message", "data"} <= set(events["data"][0])
    assert client.get(f"/api/v1/jobs/{job_id}/events?limit=1").json()["count"] == 1


def test_offers_list_and_filters(client: TestClient, service: Service) -> None:
    make_g4_spot_unavailable(service)
    offers = client.get("/api/v1/offers").json()
    assert offers["count"] == len(offers["data"]) == len(service.repo.list_offers())
    offer = next(o for o in offers["data"] if o["id"] == P3_SPOT_A)
    assert offer == {
        "id": P3_SPOT_A, "provider": "local", "region": "us-east-1", "zone": "us-east-1a",
        "instance_type": "p3.2xlarge", "capacity": "spot", "gpus": 1, "gpu_type": "V100",
        "vcpus": offer["vcpus"], "memory_gb": offer["memory_gb"],
        "price_per_hour": offer["price_per_hour"], "available": True,
        "relative_speed": 1.0, "cost_per_work_hour": offer["price_per_hour"],
        "interruptions_per_day": 0.0,
    }
    unavailable = client.get("/api/v1/offers?available=false").json()["data"]
    assert unavailable and all(not o["available"] for o in unavailable)
    assert {o["instance_type"] for o in unavailable} == {"g4dn.xlarge"}
    spot = client.get("/api/v1/offers?capacity=spot").json()["data"]
    assert spot and all(o["capacity"] == "spot" for o in spot)
    assert fields_named(client.get("/api/v1/offers?capacity=reserved")) == ["capacity"]


# --- cancel ----------------------------------------------------------------------


def test_cancel_terminates_everything_and_a_second_cancel_is_409(
        client: TestClient, service: Service, provider: FakeProvider) -> None:
    job_id = running_job(client, service)
    instance_id = service.repo.get_job(job_id).instance_id

    response = client.delete(f"/api/v1/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled" and job["finished_at"]
    assert instance_id in provider.terminate_calls
    assert service.repo.get_instance(instance_id or "").status == InstanceStatus.TERMINATED
    kinds = [e["kind"] for e in client.get(f"/api/v1/jobs/{job_id}/events").json()["data"]]
    assert "cancelled" in kinds

    again = client.delete(f"/api/v1/jobs/{job_id}", headers=AUTH)
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]


# --- migrations and decisions ---------------------------------------------------------


def test_manual_migration_is_202_then_runs_make_before_break(
        client: TestClient, service: Service, agents: GatedAgents) -> None:
    job_id = running_job(client, service)
    service.plane.update_offer(G4_SPOT_B, available=True)
    agents.release.clear()  # hold the move at its restore phase

    response = client.post(f"/api/v1/jobs/{job_id}/migrate", json={"offer_id": G4_SPOT_B},
                           headers=AUTH)
    assert response.status_code == 202, response.text
    migration = response.json()
    assert (migration["job_id"], migration["status"], migration["reason"]) == (
        job_id, "in_progress", "manual")
    assert (migration["from_offer_id"], migration["to_offer_id"]) == (P3_SPOT_A, G4_SPOT_B)
    assert migration["expected_savings"] == pytest.approx(1 - 0.1578 / 0.5 / 0.918)

    busy = client.post(f"/api/v1/jobs/{job_id}/migrate", headers=AUTH)
    assert busy.status_code == 409 and "migrating" in busy.json()["detail"]

    agents.release.set()
    service.plane.wait_for_migrations()
    (done,) = client.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
    assert done["id"] == migration["id"]
    assert (done["status"], done["phase"]) == ("completed", "done"), done["error"]
    assert done["resume_step"] == done["checkpoint_step"] + 1
    assert done["downtime_s"] is not None and done["downtime_s"] >= 0
    for stamp in ("started_at", "replacement_ready_at", "checkpointed_at", "resumed_at",
                  "switched_at", "finished_at"):
        assert done[stamp], stamp
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert (job["status"], job["offer_id"], job["instance_id"]) == (
        "running", G4_SPOT_B, done["to_instance_id"])


def test_a_follow_stream_outlasts_the_end_of_its_job_until_its_move_settles(
        client: TestClient, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that ends while a move is in flight: `logs --follow` ends only
    once the move has settled, so its last marker says how the move ended
    (it read "moving" when the stream stopped at the job's end)."""
    monkeypatch.setattr(jobs_routes, "FOLLOW_POLL_S", 0.05)
    job_id = running_job(client, service)
    job = service.repo.get_job(job_id)
    # A move the job's end cuts short: its replacement launched, the migrator
    # (not run here) yet to roll it back.
    move = Migration(id="m-cut-short", job_id=job_id, status=MigrationStatus.IN_PROGRESS,
                     phase=MigrationPhase.RESTORING, reason=MigrationReason.MANUAL,
                     from_instance_id=job.instance_id or "", from_offer_id=P3_SPOT_A,
                     to_offer_id=G4_SPOT_B, to_instance_id="i-replacement",
                     started_at=datetime.now(UTC))
    service.repo.add_migration(move)
    service.repo.add_instance(Instance(id="i-replacement", job_id=job_id, offer_id=G4_SPOT_B,
                                       provider="fake", status=InstanceStatus.RUNNING),
                              0.1578, datetime.now(UTC))
    service.repo.transition(job_id, JobStatus.COMPLETED)

    lines: list[str] = []

    def follow() -> None:
        with client.stream("GET", f"/api/v1/jobs/{job_id}/logs",
                           params={"follow": "true"}) as answer:
            lines.extend(answer.iter_lines())

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(1.0)
    assert follower.is_alive()  # the job has ended, its move has not

    service.repo.update_migration(move.id, status=MigrationStatus.FAILED,
                                  phase=MigrationPhase.ROLLED_BACK, error="the job ended")
    follower.join(10)
    assert not follower.is_alive()
    markers = [line for line in lines if line.startswith("-- ")]
    assert markers[-1].startswith("-- move from") and "rolled back: the job ended" in (
        markers[-1]), lines


def test_migrate_without_a_body_picks_the_best_other_offer(
        client: TestClient, service: Service) -> None:
    job_id = running_job(client, service)
    service.plane.update_offer(G4_SPOT_B, available=True)  # cheaper per work hour
    response = client.post(f"/api/v1/jobs/{job_id}/migrate", headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["to_offer_id"] == G4_SPOT_B
    assert response.json()["expected_savings"] > 0
    service.plane.wait_for_migrations()


def test_on_budget_travels_from_the_body_to_the_stored_spec(
        client: TestClient, service: Service) -> None:
    assert submit(client)["spec"]["on_budget"] == "warn"
    job = submit(client, on_budget="stop")
    assert job["spec"]["on_budget"] == "stop"
    assert service.repo.get_job(job["id"]).spec.on_budget == "stop"
    assert fields_named(client.post("/api/v1/jobs", json={**JOB, "on_budget": "halt"},
                                    headers=AUTH)) == ["on_budget"]


def test_migrate_without_a_target_is_409_when_no_offer_saves(
        client: TestClient, service: Service) -> None:
    job_id = running_job(client, service)  # on the cheapest available offer
    response = client.post(f"/api/v1/jobs/{job_id}/migrate", headers=AUTH)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "no other offer saves" in detail and "confirm_dearer" in detail
    assert service.repo.get_job(job_id).status == JobStatus.RUNNING
    assert service.repo.list_migrations(job_id=job_id) == []


def test_a_dearer_target_moves_only_with_confirm_dearer(
        client: TestClient, service: Service) -> None:
    job_id = running_job(client, service)
    dearer = "local:us-east-1a:p3.2xlarge:on-demand"
    assert service.repo.get_offer(dearer).price_per_hour > 0.918
    refused = client.post(f"/api/v1/jobs/{job_id}/migrate", json={"offer_id": dearer},
                          headers=AUTH)
    assert refused.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert "confirm_dearer" in detail and "dearer than" in detail and "-" not in detail[:5]
    assert service.repo.list_migrations(job_id=job_id) == []

    response = client.post(f"/api/v1/jobs/{job_id}/migrate",
                           json={"offer_id": dearer, "confirm_dearer": True}, headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["to_offer_id"] == dearer
    assert response.json()["expected_savings"] < 0
    started = [e["message"] for e in client.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
               if e["kind"] == "migration_started"]
    assert len(started) == 1 and "dearer)" in started[0] and "-" not in started[0].split("(")[1]
    service.plane.wait_for_migrations()


def test_a_dearer_target_that_would_cross_the_budget_is_409(
        client: TestClient, service: Service) -> None:
    make_g4_spot_unavailable(service)
    job_id = submit(client, budget_usd=1.5)["id"]  # 2 work hours: $1.84 here, $6.12 there
    run_until(service, job_id, JobStatus.RUNNING)
    response = client.post(f"/api/v1/jobs/{job_id}/migrate",
                           json={"offer_id": "local:us-east-1a:p3.2xlarge:on-demand",
                                 "confirm_dearer": True}, headers=AUTH)
    assert response.status_code == 409, response.text
    assert "over the budget" in response.json()["detail"]


@pytest.mark.parametrize(("offer_id", "message"), [
    ("local:nowhere:x:spot", "no offer"),
    (P3_SPOT_A, "already runs"),
    (G4_SPOT_B, "not available"),
    ("local:us-east-1a:c5.xlarge:spot", "does not fit"),
])
def test_migrate_to_a_bad_target_is_422_naming_offer_id(
        client: TestClient, service: Service, offer_id: str, message: str) -> None:
    job_id = running_job(client, service)
    if "c5.xlarge" in offer_id:  # a CPU-only type must be in the catalog to be refused
        assert any(o.id == offer_id for o in service.repo.list_offers())
    response = client.post(f"/api/v1/jobs/{job_id}/migrate", json={"offer_id": offer_id},
                           headers=AUTH)
    assert fields_named(response) == ["offer_id"]
    assert message in response.json()["detail"][0]["msg"]
    assert service.repo.get_job(job_id).status == JobStatus.RUNNING


def test_migrate_a_job_that_is_not_running_is_409(client: TestClient) -> None:
    job_id = submit(client)["id"]
    response = client.post(f"/api/v1/jobs/{job_id}/migrate", headers=AUTH)
    assert response.status_code == 409
    assert "only a running job can move" in response.json()["detail"]
    assert fields_named(client.post(f"/api/v1/jobs/{job_id}/migrate",
                                    json={"offer": "x"}, headers=AUTH)) == ["offer"]


def test_decisions_show_the_placement_then_the_scouts_latest(client: TestClient,
                                                             service: Service) -> None:
    make_g4_spot_unavailable(service)
    job_id = submit(client)["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/decisions").json() == {"data": [], "count": 0}
    run_until(service, job_id, JobStatus.RUNNING)
    (placed,) = client.get(f"/api/v1/jobs/{job_id}/decisions").json()["data"]
    assert (placed["trigger"], placed["move"], placed["target_offer_id"]) == (
        "placement", True, P3_SPOT_A)
    assert placed["decided_at"] and placed["remaining_work_hours"] > 0
    service.plane.scout_once(force=True)  # g4dn spot unavailable: the job stays
    decisions = client.get(f"/api/v1/jobs/{job_id}/decisions").json()
    assert decisions["count"] == 1
    decision = decisions["data"][0]
    assert decision["job_id"] == job_id and decision["move"] is False
    assert decision["trigger"] == "price" and decision["reason"]
    assert decision["current_offer_id"] == P3_SPOT_A
    assert decision["current_cost_per_work_hour"] == pytest.approx(0.918)
    assert decision["threshold"] == pytest.approx(JOB["savings_threshold"])
    assert set(decision) >= {"target_offer_id", "target_cost_per_work_hour", "savings",
                             "expected_saving_usd", "move_cost_usd", "budget_left_usd",
                             "deadline_slack_s", "decided_at"}


# --- offers: manual changes ----------------------------------------------------------


def test_patch_offer_changes_price_and_availability(client: TestClient,
                                                    service: Service) -> None:
    response = client.patch(f"/api/v1/offers/{P3_SPOT_A}", json={"price_per_hour": 0.42},
                            headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["price_per_hour"] == 0.42
    response = client.patch(f"/api/v1/offers/{P3_SPOT_A}", json={"available": False},
                            headers=AUTH)
    assert (response.json()["price_per_hour"], response.json()["available"]) == (0.42, False)
    offer = next(o for o in client.get("/api/v1/offers").json()["data"] if o["id"] == P3_SPOT_A)
    assert (offer["price_per_hour"], offer["available"]) == (0.42, False)
    assert service.repo.get_offer(P3_SPOT_A).price_per_hour == 0.42


@pytest.mark.parametrize(("body", "field"), [
    ({}, "body"),
    ({"price_per_hour": 0}, "price_per_hour"),
    ({"price_per_hour": -1}, "price_per_hour"),
    ({"available": "perhaps"}, "available"),
    ({"price": 1.0}, "price"),
])
def test_patch_offer_validation_names_the_field(client: TestClient, body: dict[str, Any],
                                                field: str) -> None:
    response = client.patch(f"/api/v1/offers/{P3_SPOT_A}", json=body, headers=AUTH)
    assert field in fields_named(response)


def test_patch_offer_is_refused_with_409_when_the_market_is_a_trace(
        tmp_path: Path, database_url: str, provider: FakeProvider,
        agents: GatedAgents) -> None:
    svc = make_service(tmp_path / "trace-home", database_url, provider, agents,
                       market=f"trace:{DEMO_TRACE}")
    try:
        with TestClient(create_app(svc)) as trace_client:
            offer_id = trace_client.get("/api/v1/offers").json()["data"][0]["id"]
            before = svc.repo.get_offer(offer_id)
            response = trace_client.patch(f"/api/v1/offers/{offer_id}",
                                          json={"price_per_hour": 0.01}, headers=AUTH)
            assert response.status_code == 409
            assert "only when it is manual" in response.json()["detail"]
            assert svc.repo.get_offer(offer_id) == before
            health = trace_client.get("/healthz").json()
            assert health["manual_market"] is False
            assert health["market"].startswith("trace:")
    finally:
        close_service(svc)


# --- artifacts ---------------------------------------------------------------------


def test_artifacts_are_served_with_a_content_type(client: TestClient,
                                                  service: Service) -> None:
    job_id = submit(client)["id"]
    prefix = artifacts_prefix(job_id)
    service.ctx.store.put(f"{prefix}/model.json", b'{"coef": [1.5], "intercept": 0.25}')
    service.ctx.store.put(f"{prefix}/weights.bin", b"\x00\x01\x02")
    response = client.get(f"/api/v1/jobs/{job_id}/artifacts/model.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"coef": [1.5], "intercept": 0.25}
    binary = client.get(f"/api/v1/jobs/{job_id}/artifacts/weights.bin")
    assert binary.content == b"\x00\x01\x02"
    assert binary.headers["content-type"] == "application/octet-stream"
    missing = client.get(f"/api/v1/jobs/{job_id}/artifacts/nothing.txt")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    assert fields_named(client.get(f"/api/v1/jobs/{job_id}/artifacts/.hidden")) == ["name"]


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/jobs/job-nope"),
    ("DELETE", "/api/v1/jobs/job-nope"),
    ("GET", "/api/v1/jobs/job-nope/migrations"),
    ("GET", "/api/v1/jobs/job-nope/events"),
    ("GET", "/api/v1/jobs/job-nope/decisions"),
    ("POST", "/api/v1/jobs/job-nope/migrate"),
    ("GET", "/api/v1/jobs/job-nope/artifacts/model.json"),
    ("PATCH", "/api/v1/offers/local:nowhere:x:spot"),
    ("GET", "/api/v1/no-such-thing"),
])
def test_unknown_things_are_json_404s(client: TestClient, method: str, path: str) -> None:
    body = {"available": True} if method == "PATCH" else None
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]


def test_the_user_proxy_answers_404_for_an_unknown_job_and_503_without_an_instance(
        client: TestClient) -> None:
    unknown = client.get("/endpoints/job-nope/status")
    assert unknown.status_code == 404 and "not found" in unknown.json()["detail"]
    job_id = submit(client)["id"]
    pending = client.get(f"/endpoints/{job_id}/status")
    assert pending.status_code == 503
    assert "no running instance" in pending.json()["detail"]


# --- system ---------------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    for path in ("/healthz", "/api/v1/healthz"):
        health = client.get(path).json()
        assert health["status"] == "ok"
        assert (health["market"], health["manual_market"], health["provider"]) == (
            "manual", True, "fake")
        assert health["scout_interval_s"] == 120 and health["savings_threshold"] == 0.2


def test_metrics_are_prometheus_text_with_the_counters(client: TestClient,
                                                       service: Service) -> None:
    running_job(client, service)
    submit(client)
    service.plane.scout_once(force=True)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "gpuscout_jobs_submitted_total 2.0" in text
    assert "gpuscout_instances_launched_total 1.0" in text
    assert "gpuscout_scout_passes_total 1.0" in text
    assert 'gpuscout_jobs{status="running"} 1.0' in text
    assert "# TYPE gpuscout_migration_downtime_seconds histogram" in text


def test_openapi_describes_the_surface(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, methods in {
        "/api/v1/jobs": {"get", "post"},
        "/api/v1/jobs/{job_id}": {"get", "delete"},
        "/api/v1/jobs/{job_id}/migrations": {"get"},
        "/api/v1/jobs/{job_id}/events": {"get"},
        "/api/v1/jobs/{job_id}/migrate": {"post"},
        "/api/v1/jobs/{job_id}/decisions": {"get"},
        "/api/v1/jobs/{job_id}/artifacts/{name}": {"get"},
        "/api/v1/offers": {"get"},
        "/api/v1/offers/{offer_id}": {"patch"},
        "/api/v1/instances": {"get"},
        "/healthz": {"get"},
        "/metrics": {"get"},
    }.items():
        assert methods <= set(paths[path]), path
    schemas = spec["components"]["schemas"]
    assert {"JobCreate", "JobPublic", "JobsPublic", "OfferUpdate", "MigrationPublic"} <= set(
        schemas)
    assert schemas["JobCreate"]["additionalProperties"] is False
    assert client.get("/docs").status_code == 200


def test_the_dashboard_is_served_at_the_root(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "GPU Scout" in page.text
    assert client.get("/app.js").headers["content-type"].startswith(
        ("application/javascript", "text/javascript"))
    assert client.get("/style.css").status_code == 200


# --- instances: interruption notices ---------------------------------------------------


def test_interrupt_delivers_a_notice_and_the_job_moves_out_of_the_zone(
        client: TestClient, service: Service, provider: FakeProvider) -> None:
    job_id = running_job(client, service)
    instance_id = client.get(f"/api/v1/jobs/{job_id}").json()["instance_id"]
    assert client.post(f"/api/v1/instances/{instance_id}/interrupt").status_code == 401
    response = client.post(f"/api/v1/instances/{instance_id}/interrupt", headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["id"] == instance_id
    assert provider.get(instance_id).interruption_notice
    service.plane.reconcile_once()
    service.plane.wait_for_migrations()
    (m,) = client.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
    assert (m["reason"], m["status"]) == ("preemption", "completed")
    assert ":us-east-1a:" not in m["to_offer_id"] or ":spot" not in m["to_offer_id"]
    kinds = [e["kind"] for e in client.get(f"/api/v1/jobs/{job_id}/events").json()["data"]]
    assert {"interruption_requested", "interruption", "emergency_checkpoint"} <= set(kinds)
    # The offer it was reclaimed from now reads as less steady than its peers.
    offers = {o["id"]: o for o in client.get("/api/v1/offers").json()["data"]}
    assert offers[m["from_offer_id"]]["interruptions_per_day"] == 1.0
    assert offers[m["to_offer_id"]]["interruptions_per_day"] == 0.0


def test_interrupt_unknown_is_404_and_gone_or_unsupported_is_409(
        client: TestClient, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.post("/api/v1/instances/i-nope/interrupt", headers=AUTH).status_code == 404
    job_id = running_job(client, service)
    instance_id = client.get(f"/api/v1/jobs/{job_id}").json()["instance_id"]
    monkeypatch.delattr(FakeProvider, "notify_interruption")
    response = client.post(f"/api/v1/instances/{instance_id}/interrupt", headers=AUTH)
    assert response.status_code == 409
    assert "cannot deliver interruption notices" in response.json()["detail"]
    monkeypatch.undo()
    client.delete(f"/api/v1/jobs/{job_id}", headers=AUTH)
    response = client.post(f"/api/v1/instances/{instance_id}/interrupt", headers=AUTH)
    assert response.status_code == 409 and "already terminated" in response.json()["detail"]


def test_a_jobs_history_is_recorded_for_its_charts_with_no_dashboard_open(
        client: TestClient, service: Service) -> None:
    make_g4_spot_unavailable(service)
    job_id = client.post("/api/v1/jobs", json=JOB, headers=AUTH).json()["id"]
    run_until(service, job_id, JobStatus.RUNNING)
    response = client.get(f"/api/v1/jobs/{job_id}/history")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] >= 1
    point = body["data"][-1]
    offers = client.get("/api/v1/offers").json()["data"]
    p3 = next(o for o in offers if o["id"] == P3_SPOT_A)
    assert point["cost_per_work_hour"] == pytest.approx(p3["cost_per_work_hour"])
    assert point["best_cost_per_work_hour"] is not None
    assert client.get("/api/v1/jobs/job-nope/history").status_code == 404
