"""Real PyTorch training moved by the scout, by hand and by a spot notice,
on real processes: the CNN of gpuscout.examples.torch_digits ends with the
very weights and optimizer state of an uninterrupted run, tensor for tensor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E
from tests.e2e.test_migration_e2e import G4_SPOT_B, P3_SPOT_A, assert_clean_move, no_g4dn_spot

torch = pytest.importorskip("torch")  # installed by `make test` (torch==2.13.0, CPU)

from tests.torch_states import assert_identical, load_model  # noqa: E402

pytestmark = pytest.mark.e2e

STEPS, SEED = 700, 5


def command(steps: int, seed: int) -> str:
    return (f"python -m gpuscout.examples.torch_digits --steps {steps} --seed {seed} "
            "--step-sleep 0.03 --checkpoint-every 25")


def standalone(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "standalone"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "gpuscout.examples.torch_digits", "--steps",
                    str(STEPS), "--seed", str(SEED), "--out", str(out)], check=True,
                   timeout=300, capture_output=True, cwd=out,
                   env={k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")})
    return load_model((out / "model.pt").read_bytes())


def test_a_torch_job_moved_three_ways_ends_with_the_uninterrupted_model(
        e2e: E2E, tmp_path: Path) -> None:
    no_g4dn_spot(e2e)
    body = {"name": "digits", "command": command(STEPS, SEED), "expected_duration_hours": 0.01,
            "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1}}
    response = e2e.api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = e2e.wait_status(job_id, "running", timeout_s=60)
    assert job["offer_id"] == P3_SPOT_A
    e2e.wait_step(job_id, 40, timeout_s=60)

    e2e.patch_offer(G4_SPOT_B, available=True)  # the scout moves it: 66% cheaper
    scout = e2e.wait_migration(job_id, 1, timeout_s=90)
    assert_clean_move(e2e, scout, reason="price")
    e2e.wait_step(job_id, scout["resume_step"] + 20, timeout_s=60)

    # A spot notice: it moves out of the zone (avoided for a while after).
    instance = e2e.job(job_id)["instance_id"]
    assert e2e.api.post(f"/api/v1/instances/{instance}/interrupt").status_code == 202
    try:
        move = e2e.wait_migration(job_id, 2, timeout_s=90)
    except AssertionError:
        events = e2e.api.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
        raise AssertionError((e2e.migrations(job_id), [(e["kind"], e["message"])
                                                        for e in events[-15:]])) from None
    assert_clean_move(e2e, move, reason="preemption")
    e2e.wait_step(job_id, move["resume_step"] + 20, timeout_s=60)

    manual = e2e.manual_move(job_id)
    assert manual.status_code == 202, manual.text
    assert_clean_move(e2e, e2e.wait_migration(job_id, 3, timeout_s=90), reason="manual")


    job = e2e.wait_status(job_id, "completed", timeout_s=180)
    # The replacements were ready (torch imported, data loaded) before the
    # old instance paused: a move's downtime is the checkpoint's round trip.
    assert all(m["downtime_s"] < 1.5 for m in e2e.migrations(job_id)
               if m["status"] == "completed"), e2e.migrations(job_id)
    assert job["progress"]["step"] == STEPS
    artifact = e2e.api.get(f"/api/v1/jobs/{job_id}/artifacts/model.pt")
    assert artifact.status_code == 200
    moved, reference = load_model(artifact.content), standalone(tmp_path)
    assert assert_identical(moved["model"], reference["model"]) == 6  # every parameter
    assert assert_identical(moved["optimizer"], reference["optimizer"]) >= 13
