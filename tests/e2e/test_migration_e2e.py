"""A real training job migrates live, end to end, on real processes.

Every test here runs the example job under the whole control plane (see
conftest.py) and checks what a user relies on: the job lands on the
cheapest offer, moves when the market says so, loses no step, keeps its
endpoint, leaves no process behind, and ends with the very model an
uninterrupted run produces.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from gpuscout.workload.checkpoint import MANIFEST
from tests.e2e.conftest import E2E, standalone_model

pytestmark = pytest.mark.e2e

P3_SPOT_A = "local:us-east-1a:p3.2xlarge:spot"
P3_SPOT_B = "local:us-east-1b:p3.2xlarge:spot"
P3_SPOT_F = "local:us-east-1f:p3.2xlarge:spot"
G4_SPOT = ["local:us-east-1a:g4dn.xlarge:spot", "local:us-east-1b:g4dn.xlarge:spot",
           "local:us-east-1f:g4dn.xlarge:spot"]
G4_SPOT_A, G4_SPOT_B = G4_SPOT[0], G4_SPOT[1]


def no_g4dn_spot(e2e: E2E) -> None:
    for offer_id in G4_SPOT:
        e2e.patch_offer(offer_id, available=False)


def assert_clean_move(e2e: E2E, m: dict[str, Any], *, reason: str) -> None:
    assert m["status"] == "completed", m
    assert m["reason"] == reason
    # No step lost or repeated: the replacement's first step follows the
    # checkpoint the old instance paused at.
    assert m["resume_step"] == m["checkpoint_step"] + 1
    assert 0 <= m["downtime_s"] < 5
    for stamp in ("started_at", "replacement_ready_at", "checkpointed_at", "resumed_at",
                  "switched_at", "finished_at"):
        assert m[stamp], stamp
    assert e2e.pids_of(m["from_instance_id"]) == []
    assert e2e.provider.get(m["from_instance_id"]).state.value == "terminated"


def assert_same_model(e2e: E2E, tmp_path: Path, job_id: str, *, steps: int, seed: int) -> None:
    job = e2e.wait_status(job_id, "completed", timeout_s=120)
    assert job["progress"]["step"] == steps
    response = e2e.api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json")
    assert response.status_code == 200, response.text
    assert response.content == standalone_model(tmp_path, steps=steps, seed=seed)
    assert all(i.state.value == "terminated" for i in
               [e2e.provider.get(i["id"]) for i in
                e2e.api.get("/api/v1/instances", params={"job_id": job_id}).json()["data"]])


def test_price_drop_moves_the_job_live_and_the_model_is_exact(e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 600, 11
    no_g4dn_spot(e2e)
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02)
    job = e2e.wait_status(job_id, "running")
    assert job["offer_id"] == P3_SPOT_A  # the cheapest available compatible offer
    old_instance = job["instance_id"]
    e2e.wait_step(job_id, 50)
    old_pids = e2e.pids_of(old_instance)
    assert old_pids

    # Requests through the job's stable endpoint keep flowing during the move.
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = e2e.api.get(f"/endpoints/{job_id}/status")
            answers.append((r.status_code, r.json().get("instance_id")))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        e2e.patch_offer(G4_SPOT_B, available=True)  # spot capacity returns, 66% cheaper
        m = e2e.wait_migration(job_id, 1)
    finally:
        stop.set()
        thread.join()
    assert_clean_move(e2e, m, reason="price")
    assert m["from_offer_id"] == P3_SPOT_A and m["to_offer_id"] == G4_SPOT_B
    assert m["expected_savings"] == pytest.approx(1 - (0.1578 / 0.5) / 0.918)

    job = e2e.job(job_id)
    assert (job["offer_id"], job["instance_id"]) == (G4_SPOT_B, m["to_instance_id"])
    status = e2e.api.get(f"/endpoints/{job_id}/status").json()
    assert status["instance_id"] == m["to_instance_id"]
    # Every request during the move was answered, first by the old instance,
    # then by the new one, never by anything else.
    assert answers and all(code == 200 for code, _ in answers), answers[-5:]
    served_by = [i for _, i in answers]
    assert set(served_by) <= {old_instance, m["to_instance_id"]}
    switch = served_by.index(m["to_instance_id"]) if m["to_instance_id"] in served_by else None
    if switch is not None:
        assert old_instance not in served_by[switch:]
    assert all(e2e.pids_of(old_instance) == [] for _ in old_pids)

    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)
    assert e2e.job(job_id)["savings_usd"] > 0


def test_two_moves_in_a_row_and_a_manual_move(e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 900, 5
    no_g4dn_spot(e2e)
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02)
    assert e2e.wait_status(job_id, "running")["offer_id"] == P3_SPOT_A
    e2e.wait_step(job_id, 30)

    e2e.patch_offer(G4_SPOT_B, available=True)
    first = e2e.wait_migration(job_id, 1)
    assert_clean_move(e2e, first, reason="price")

    e2e.patch_offer(P3_SPOT_F, price_per_hour=0.05)  # a price drop elsewhere
    second = e2e.wait_migration(job_id, 2)
    assert_clean_move(e2e, second, reason="price")
    assert (second["from_offer_id"], second["to_offer_id"]) == (G4_SPOT_B, P3_SPOT_F)
    assert second["checkpoint_step"] > first["resume_step"]

    # Nothing cheaper is left, so only a user's move can take it elsewhere.
    # (The job's own offer stays available: capacity gone under a job is a
    # reclaim, which the scout answers with a move of its own.)
    e2e.patch_offer(G4_SPOT_B, available=False)
    e2e.patch_offer(P3_SPOT_F, price_per_hour=0.918)
    response = e2e.api.post(f"/api/v1/jobs/{job_id}/migrate", json={"offer_id": P3_SPOT_B,
                                                                     "confirm_dearer": True})
    assert response.status_code == 202, response.text
    third = e2e.wait_migration(job_id, 3)
    assert_clean_move(e2e, third, reason="manual")
    assert third["to_offer_id"] == P3_SPOT_B

    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)
    assert len(e2e.migrations(job_id)) == 3


def test_replacement_that_never_boots_leaves_the_job_where_it_was(
        e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 500, 21
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02)
    job = e2e.wait_status(job_id, "running")
    assert job["offer_id"] == G4_SPOT_A
    e2e.wait_step(job_id, 20)
    e2e.provider.never_boots.add(G4_SPOT_B)

    response = e2e.api.post(f"/api/v1/jobs/{job_id}/migrate",
                            json={"offer_id": G4_SPOT_B, "confirm_dearer": True})
    assert response.status_code == 202, response.text
    m = e2e.wait_migration(job_id, 1, timeout_s=60)
    assert m["status"] == "failed"
    assert "standby" in m["error"]
    assert m["checkpoint_step"] is None  # the job never stopped training
    assert e2e.pids_of(m["to_instance_id"]) == []
    job = e2e.job(job_id)
    assert (job["status"], job["instance_id"]) == ("running", m["from_instance_id"])

    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)


def test_replacement_that_cannot_restore_hands_the_job_back(e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 500, 23
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02)
    e2e.wait_status(job_id, "running")
    e2e.wait_step(job_id, 20)
    e2e.provider.blind_store.add(G4_SPOT_B)  # the replacement cannot read the checkpoint

    response = e2e.api.post(f"/api/v1/jobs/{job_id}/migrate",
                            json={"offer_id": G4_SPOT_B, "confirm_dearer": True})
    assert response.status_code == 202, response.text
    m = e2e.wait_migration(job_id, 1)
    assert m["status"] == "failed"
    assert m["checkpoint_step"] is not None  # the old instance paused, then resumed
    assert e2e.pids_of(m["to_instance_id"]) == []
    job = e2e.job(job_id)
    assert (job["status"], job["instance_id"]) == ("running", m["from_instance_id"])
    e2e.wait_step(job_id, m["checkpoint_step"] + 5)  # training goes on

    # Paused at the checkpoint and resumed from memory: no step lost or redone.
    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)


def test_lost_instance_with_a_corrupt_latest_checkpoint_resumes_from_the_one_before(
        e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 500, 31
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02, checkpoint_every=20)
    job = e2e.wait_status(job_id, "running")
    e2e.wait_step(job_id, 130)
    # The cloud takes the instance away without notice...
    e2e.provider.terminate(job["instance_id"])
    # ... and its last checkpoint is damaged (a flipped byte in its state).
    # (A checkpoint the kill cut short has no manifest: restores skip it.)
    prefix = e2e.service.settings.home / "store" / "jobs" / job_id / "checkpoints"
    complete = [p for p in sorted(prefix.iterdir()) if (p / MANIFEST).is_file()]
    latest = complete[-1]
    state = latest / "state.json"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    good = complete[-2].name.split("-")[0]

    e2e.wait(lambda: e2e.job(job_id)["instance_id"] not in (None, job["instance_id"]), 60,
             "a replacement instance")
    events = e2e.api.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
    assert any(ev["kind"] == "instance_lost" for ev in events)
    e2e.wait_status(job_id, "running")
    new_instance = e2e.job(job_id)["instance_id"]
    # The replacement restored the previous, verified checkpoint.
    status = e2e.wait(lambda: (s := e2e.api.get(f"/endpoints/{job_id}/status")).status_code
                      == 200 and s.json(), 30, "the new instance's endpoint")
    assert status["instance_id"] == new_instance
    assert int(good) < int(latest.name.split("-")[0])
    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)


def test_cancel_terminates_every_process(e2e: E2E) -> None:
    job_id = e2e.submit_linreg(steps=100_000, seed=1, step_sleep=0.02)
    job = e2e.wait_status(job_id, "running")
    assert e2e.pids_of(job["instance_id"])
    # The agent obeys only the control plane, which holds its instance token.
    address = e2e.provider.get(job["instance_id"]).address
    denied = e2e.api.post(f"http://{address}/agent/checkpoint", json={"pause": True},
                          headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    response = e2e.api.delete(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert e2e.pids_of(job["instance_id"]) == []
    assert e2e.provider.list() == []
    r = e2e.api.get(f"/endpoints/{job_id}/status")
    assert r.status_code == 503 and "no running instance" in r.json()["detail"]
