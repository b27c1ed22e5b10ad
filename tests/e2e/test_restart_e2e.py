"""A control plane killed in the middle of a move resumes correctly.

The control plane runs as a real `gpuscout up` process; it is SIGKILLed while
a migration's replacement is booting, and a new one started on the same home
repairs the move: the replacement is terminated, the job goes on training
on the old instance, and finishes with the exact model.
"""

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

from gpuscout.providers.local import LocalProvider
from tests.e2e.conftest import linreg_command, standalone_model, wait

pytestmark = pytest.mark.e2e
TOKEN = "restart-token"
G4_SPOT_B = "local:us-east-1b:g4dn.xlarge:spot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Plane:
    """`gpuscout up` as a child process."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
        env.update(GPUSCOUT_HOME=str(self.home), GPUSCOUT_API_TOKEN=TOKEN,
                   GPUSCOUT_BOOT_DELAY_S="3", GPUSCOUT_SCOUT_INTERVAL_S="3600",
                   GPUSCOUT_RECONCILE_INTERVAL_S="0.2")
        log = open(self.home / f"plane-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuscout.cli.main", "up", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("gpuscout up did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    home = tmp_path / "home"
    home.mkdir()
    p = Plane(home, free_port())
    try:
        yield p
    finally:
        p.stop()
        provider = LocalProvider(home / "local")
        for instance in provider.list():
            provider.terminate(instance.instance_id)


def test_killed_mid_move_the_control_plane_rolls_back_on_restart(
        plane: Plane, tmp_path: Path) -> None:
    steps, seed = 700, 41
    plane.start()
    api = httpx.Client(base_url=plane.url, headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=20)
    body = {"name": "restart", "expected_duration_hours": 0.01,
            "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
            "command": linreg_command(steps=steps, seed=seed, step_sleep=0.02,
                                      checkpoint_every=25)}
    job_id = api.post("/api/v1/jobs", json=body).json()["id"]
    wait(lambda: api.get(f"/api/v1/jobs/{job_id}").json()["status"] == "running", 40,
         "the job to run")
    old_instance = api.get(f"/api/v1/jobs/{job_id}").json()["instance_id"]
    target = G4_SPOT_B
    if api.get(f"/api/v1/jobs/{job_id}").json()["offer_id"] == target:
        target = "local:us-east-1f:g4dn.xlarge:spot"
    assert api.post(f"/api/v1/jobs/{job_id}/migrate",
                    json={"offer_id": target, "confirm_dearer": True}).status_code == 202
    m = wait(lambda: next((m for m in api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
                           if m["phase"] == "booting"), None), 10, "the booting phase")
    plane.kill()  # the replacement is booting; nobody is watching it now

    provider = LocalProvider(plane.home / "local")
    replacement = m["to_instance_id"]
    assert provider.get(replacement).state.value != "terminated"  # it outlived the plane

    plane.start()
    repaired = api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"][0]
    assert repaired["status"] == "failed"
    assert "restarted" in repaired["error"]
    assert provider.get(replacement).state.value == "terminated"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert (job["status"], job["instance_id"]) == ("running", old_instance)
    # The proxy's route was rebuilt from the database.
    status = api.get(f"/endpoints/{job_id}/status").json()
    assert status["instance_id"] == old_instance

    wait(lambda: api.get(f"/api/v1/jobs/{job_id}").json()["status"] == "completed", 90,
         "the job to complete")
    model = api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json").content
    assert model == standalone_model(tmp_path, steps=steps, seed=seed)
