"""A spot interruption notice, end to end, on real processes.

The notice comes through the API the way AWS instance metadata gives it
(``POST /api/v1/instances/{id}/interrupt``). The control plane checkpoints at
once, within the notice window, moves the job make-before-break to the best
offer outside the zone just reclaimed, and the job ends with the very model
an uninterrupted run produces.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import E2E
from tests.e2e.test_migration_e2e import (
    P3_SPOT_A,
    assert_clean_move,
    assert_same_model,
    no_g4dn_spot,
)

pytestmark = pytest.mark.e2e


def test_interruption_notice_moves_the_job_out_of_the_zone_with_the_exact_model(
        e2e: E2E, tmp_path: Path) -> None:
    steps, seed = 600, 41
    no_g4dn_spot(e2e)
    job_id = e2e.submit_linreg(steps=steps, seed=seed, step_sleep=0.02)
    job = e2e.wait_status(job_id, "running")
    assert job["offer_id"] == P3_SPOT_A
    old_instance = job["instance_id"]
    e2e.wait_step(job_id, 50)

    response = e2e.api.post(f"/api/v1/instances/{old_instance}/interrupt")
    assert response.status_code == 202, response.text
    m = e2e.wait_migration(job_id, 1)
    assert_clean_move(e2e, m, reason="preemption")  # resumed at checkpoint step + 1
    assert m["from_offer_id"] == P3_SPOT_A
    to_zone = e2e.service.repo.get_offer(m["to_offer_id"]).zone
    assert to_zone != "us-east-1a" or m["to_offer_id"].endswith(":on-demand")

    events = e2e.api.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
    kinds = [e["kind"] for e in events]
    assert kinds.index("interruption_requested") < kinds.index("interruption") < kinds.index(
        "emergency_checkpoint") < kinds.index("migration_completed")
    emergency = next(e for e in events if e["kind"] == "emergency_checkpoint")
    assert 50 <= emergency["data"]["step"] <= m["checkpoint_step"]

    # The zone stays avoided: a second job goes elsewhere too.
    other = e2e.submit_linreg(steps=50, seed=1, step_sleep=0.01, name="second")
    assert e2e.wait_status(other, "running")["offer_id"] != P3_SPOT_A

    assert_same_model(e2e, tmp_path, job_id, steps=steps, seed=seed)
    # A notice to an instance that is gone is refused; an unknown one is 404.
    assert e2e.api.post(f"/api/v1/instances/{old_instance}/interrupt").status_code == 409
    assert e2e.api.post("/api/v1/instances/i-unknown/interrupt").status_code == 404
