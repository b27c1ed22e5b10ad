"""The API served for real: uvicorn in a thread (ServerThread) with the
control plane's loops running, reached over loopback HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gpuscout.domain import JobSpec
from gpuscout.providers.base import LaunchRequest
from gpuscout.providers.fake import FakeProvider
from gpuscout.server import ServerThread
from tests.api_fixtures import AUTH, GatedAgents, close_service, make_service


class _Workload(BaseHTTPRequestHandler):
    """Stands in for the job's workload behind its agent."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.dumps({"path": self.path, "step": 7}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def workload() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Workload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_job_submitted_over_http_runs_and_its_endpoint_is_proxied(
        tmp_path: Path, workload: str) -> None:
    def address_for(request: LaunchRequest, n: int) -> str:
        return workload  # FakeAgents keys agents by address; one job, one agent

    service = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                           FakeProvider(address_for=address_for), GatedAgents(),
                           reconcile_interval_s=0.02)
    server = ServerThread(service, start_plane=True)
    try:
        server.start()
        assert server.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=server.url, timeout=5) as http:
            response = http.post("/api/v1/jobs", headers=AUTH, json={
                "name": "served", "command": "true", "resources": {"gpus": 1}})
            assert response.status_code == 201
            job_id = response.json()["id"]

            def running() -> bool:
                job = http.get(f"/api/v1/jobs/{job_id}").json()
                return job["status"] == "running" and job["progress"]["step"] > 0

            wait_for(running)
            proxied = http.get(f"/endpoints/{job_id}/status?verbose=1")
            assert proxied.status_code == 200
            assert proxied.json() == {"path": "/status?verbose=1", "step": 7}
            assert proxied.headers["x-gpuscout-instance"] == workload
            assert http.get("/healthz").json()["status"] == "ok"
            assert "gpuscout_jobs_submitted_total 1.0" in http.get("/metrics").text
    finally:
        server.stop()
        close_service(service)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)
    names = {t.name for t in threading.enumerate()}
    assert not names & {"gpuscout-uvicorn", "gpuscout-reconcile", "gpuscout-scout"}


def test_an_unreachable_instance_is_a_502_json_not_a_500(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    service = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                           FakeProvider(address_for=lambda r, n: closed), GatedAgents())
    try:
        job = service.plane.submit(JobSpec(name="x", command="y"))
        for _ in range(10):
            service.plane.reconcile_once()
        with ServerThread(service) as server:
            response = httpx.get(f"{server.url}/endpoints/{job.id}/status", timeout=5)
        assert response.status_code == 502
        assert "unreachable" in response.json()["detail"]
    finally:
        close_service(service)


def test_server_thread_reports_a_busy_port(tmp_path: Path) -> None:
    service = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", FakeProvider(),
                           GatedAgents())
    try:
        with ServerThread(service) as first:
            port = int(first.url.rsplit(":", 1)[1])
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                ServerThread(service, port=port)
    finally:
        close_service(service)
