"""End-to-end fixtures: the whole control plane over real processes on
loopback — the local provider (instances are process trees started by the
bootstrap script), real agents, the example training job, a file store,
SQLite, the HTTP API and the user proxy served by uvicorn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuscout.config import Settings
from gpuscout.controllers.agent_client import AgentClient
from gpuscout.controllers.context import Timeouts
from gpuscout.providers.base import LaunchRequest, ProviderInstance
from gpuscout.providers.local import LocalProvider
from gpuscout.server import ServerThread
from gpuscout.service import Service, build_service

TOKEN = "e2e-token"
BOOT_DELAY_S = 1.0


class FaultyLocalProvider(LocalProvider):
    """The real local provider, with faults a test can aim at one offer:
    a replacement that never boots, or one that cannot read the store."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.never_boots: set[str] = set()
        self.blind_store: set[str] = set()
        self.empty_store_url = f"file://{root / 'empty-store'}"

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        if request.offer.id in self.blind_store:
            request = replace(request, store_url=self.empty_store_url)
        if request.offer.id in self.never_boots:
            saved, self.boot_delay_s = self.boot_delay_s, 3600.0
            try:
                return super().launch(request)
            finally:
                self.boot_delay_s = saved
        return super().launch(request)


class E2E:
    def __init__(self, service: Service, server: ServerThread, provider: FaultyLocalProvider):
        self.service = service
        self.server = server
        self.provider = provider
        self.api = httpx.Client(base_url=server.url, timeout=30,
                                headers={"Authorization": f"Bearer {TOKEN}"})

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.api.get(f"/api/v1/jobs/{job_id}")
        response.raise_for_status()
        return response.json()

    def migrations(self, job_id: str) -> list[dict[str, Any]]:
        response = self.api.get(f"/api/v1/jobs/{job_id}/migrations")
        response.raise_for_status()
        return response.json()["data"]

    def manual_move(self, job_id: str) -> httpx.Response:
        """POST /jobs/{id}/migrate to the cheapest other available GPU offer,
        cheaper or dearer than the job's own (confirm_dearer): a move that
        must happen whatever the market does at that moment."""
        current = self.job(job_id)["offer_id"]
        offers = self.api.get("/api/v1/offers", params={"available": "true"}).json()["data"]
        target = min((o for o in offers if o["id"] != current and o["gpus"] >= 1),
                     key=lambda o: (o["cost_per_work_hour"], o["id"]))
        return self.api.post(f"/api/v1/jobs/{job_id}/migrate",
                             json={"offer_id": target["id"], "confirm_dearer": True})

    def patch_offer(self, offer_id: str, **body: Any) -> None:
        response = self.api.patch(f"/api/v1/offers/{offer_id}", json=body)
        assert response.status_code == 200, response.text

    def submit_linreg(self, *, steps: int, seed: int, step_sleep: float = 0.02,
                      checkpoint_every: int = 25, name: str = "linreg") -> str:
        body = {
            "name": name, "model": "linreg", "dataset_size_gb": 0.001,
            "workload_type": "training", "expected_duration_hours": 0.01,
            "budget_usd": 5, "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
            "command": linreg_command(steps=steps, seed=seed, step_sleep=step_sleep,
                                      checkpoint_every=checkpoint_every),
        }
        response = self.api.post("/api/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait(predicate, timeout_s, what)

    def wait_status(self, job_id: str, status: str, timeout_s: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            assert job["status"] not in ({"failed", "cancelled"} - {status}), job
            return job if job["status"] == status else None

        return self.wait(check, timeout_s, f"job {job_id} to be {status}")  # type: ignore[no-any-return]

    def wait_step(self, job_id: str, step: int, timeout_s: float = 60) -> None:
        self.wait(lambda: (self.job(job_id)["progress"]["step"] or 0) >= step, timeout_s,
                  f"job {job_id} to reach step {step}")

    def wait_migration(self, job_id: str, count: int, timeout_s: float = 60
                       ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            done = [m for m in self.migrations(job_id) if m["status"] != "in_progress"]
            return done[count - 1] if len(done) >= count else None

        return self.wait(check, timeout_s, f"migration {count} of {job_id}")  # type: ignore[no-any-return]

    def pids_of(self, instance_id: str) -> list[int]:
        """Every live process that belongs to the instance (by its marker)."""
        marker = str(self.provider.instance_dir(instance_id))
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if f"GPUSCOUT_LOCAL_INSTANCE={marker}".encode() in environ.split(b"\0"):
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
        return pids


def wait(predicate: Callable[[], Any], timeout_s: float, what: str,
         poll_s: float = 0.05) -> Any:
    """The first truthy value of ``predicate()``, polled until the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def linreg_command(*, steps: int, seed: int, step_sleep: float, checkpoint_every: int) -> str:
    return (f"{sys.executable} -m gpuscout.examples.linreg --steps {steps} --seed {seed} "
            f"--step-sleep {step_sleep} --checkpoint-every {checkpoint_every}")


def standalone_model(tmp_path: Path, *, steps: int, seed: int) -> bytes:
    """model.json of an uninterrupted run with no control plane."""
    out = tmp_path / f"standalone-{seed}-{steps}"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "gpuscout.examples.linreg", "--steps", str(steps), "--seed",
         str(seed), "--out", str(out)],
        check=True, timeout=120, env={k: v for k, v in os.environ.items()
                                      if not k.startswith("GPUSCOUT_")},
    )
    data = (out / "model.json").read_bytes()
    assert json.loads(data)["steps"] == steps
    return data


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[E2E]:
    home = tmp_path / "home"
    # No dwell time: these jobs run for seconds and some tests move twice.
    settings = Settings(home=home, api_token=TOKEN, scout_interval_s=0.5,
                        boot_delay_s=BOOT_DELAY_S, reconcile_interval_s=0.2,
                        reaper_interval_s=5, min_dwell_s=0)
    provider = FaultyLocalProvider(home / "local", boot_delay_s=BOOT_DELAY_S,
                                   terminate_grace_s=2)
    service = build_service(settings, provider=provider, agents=AgentClient())
    service.ctx.timeouts = Timeouts(health_s=8, checkpoint_s=20, resume_s=20, drain_s=5,
                                    lost_s=5)
    server = ServerThread(service, start_plane=True)
    server.start()
    env = E2E(service, server, provider)
    try:
        yield env
    finally:
        server.stop()
        for instance in provider.list():
            provider.terminate(instance.instance_id)
        env.api.close()
