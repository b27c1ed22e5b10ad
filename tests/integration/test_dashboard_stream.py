"""The dashboard's reads over HTTP, without a browser: the live stream
(server-sent events from a real server on loopback), its access rule off the
loopback interface, the sign-in check, move targets, artifacts and history."""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuscout.api import create_app
from gpuscout.providers.fake import FakeProvider
from gpuscout.server import ServerThread
from gpuscout.service import Service
from tests.api_fixtures import (
    AUTH,
    G4_SPOT_B,
    GatedAgents,
    address_for,
    close_service,
    make_service,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = make_service(tmp_path / "home", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       FakeProvider(address_for=address_for), GatedAgents(),
                       reconcile_interval_s=0.05)
    yield svc
    close_service(svc)


@pytest.fixture
def server(service: Service) -> Iterator[ServerThread]:
    running = ServerThread(service, start_plane=True)
    try:
        yield running.start()
    finally:
        running.stop()


class Stream:
    """A reader of /api/v1/stream in a thread: the messages as (event, id, data)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.messages: list[tuple[str, str | None, Any]] = []
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=30))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        event, ident, data = "message", None, []
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if not line:
                        if data:
                            self.messages.append((event, ident, json.loads("\n".join(data))))
                        event, ident, data = "message", None, []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("id:"):
                        ident = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
        except httpx.HTTPError:
            pass

    def wait_for(self, event: str, predicate: Any = lambda data: True,
                 timeout_s: float = 10) -> tuple[str | None, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for kind, ident, data in list(self.messages):
                if kind == event and predicate(data):
                    return ident, data
            time.sleep(0.05)
        raise AssertionError(f"no {event} message in {timeout_s}s: {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._client.close()


def test_the_stream_says_hello_then_pushes_changes_and_replays_missed_events(
        server: ServerThread) -> None:
    stream = Stream(f"{server.url}/api/v1/stream")
    try:
        stream.wait_for("hello")
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as api:
            job = api.post("/api/v1/jobs", json={"name": "streamed", "command": "python t.py",
                                                 "resources": {"gpus": 1}}).json()
            stream.wait_for("jobs", lambda data: any(
                j["id"] == job["id"] and j["status"] == "running" for j in data))
            last_id, events = stream.wait_for("events", lambda data: any(
                e["kind"] == "submitted" and e["job_id"] == job["id"] for e in data))
            assert last_id == str(events[-1]["id"])
            stream.wait_for("decisions", lambda data: any(d["job_id"] == job["id"]
                                                          for d in data))
            stream.wait_for("samples", lambda data: any(
                s["job_id"] == job["id"] and s["cost_per_work_hour"] for s in data))
            assert api.patch(f"/api/v1/offers/{G4_SPOT_B}",
                             json={"price_per_hour": 0.01}).status_code == 200
            stream.wait_for("offers", lambda data: any(
                o["id"] == G4_SPOT_B and o["price_per_hour"] == 0.01 for o in data))
            history = api.get(f"/api/v1/jobs/{job['id']}/history").json()
            assert history["count"] >= 1 and history["data"][0]["step"] >= 0
            prices = api.get(f"/api/v1/offers/{G4_SPOT_B}/history").json()
            assert [p["price_per_hour"] for p in prices["data"]][-1] == 0.01
    finally:
        stream.close()

    # A page that reconnects with Last-Event-ID gets the events it missed first.
    again = Stream(f"{server.url}/api/v1/stream", headers={"Last-Event-ID": "0"})
    try:
        again.wait_for("hello")
        _, replayed = again.wait_for("events")
        assert replayed[0]["id"] == 1 and replayed[0]["kind"] == "submitted"
    finally:
        again.close()


def test_off_the_loopback_the_stream_needs_the_token_as_a_query_parameter(
        service: Service) -> None:
    with TestClient(create_app(service), client=("203.0.113.7", 50000)) as remote:
        refused = remote.get("/api/v1/stream")
        assert refused.status_code == 401
        assert "token" in refused.json()["detail"]
        assert remote.get("/api/v1/stream", params={"token": "wrong"}).status_code == 401
        remote.cookies.set("gpuscout_token", "wrong")
        assert remote.get("/api/v1/stream").status_code == 401
        remote.cookies.clear()
        assert remote.get("/api/v1/session").json() == {
            "token": "none", "reads_need_token": True, "writes_need_token": True}
        wrong = remote.get("/api/v1/session", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "the API token is wrong"
        assert remote.get("/api/v1/session", headers=AUTH).json()["token"] == "valid"
        assert remote.get("/api/v1/offers/x/history").status_code == 401


def test_targets_say_what_each_move_saves_and_artifacts_are_listed(
        server: ServerThread, service: Service) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as api:
        for offer in api.get("/api/v1/offers").json()["data"]:
            if offer["instance_type"] == "g4dn.xlarge" and offer["capacity"] == "spot":
                api.patch(f"/api/v1/offers/{offer['id']}", json={"available": False})
        job = api.post("/api/v1/jobs", json={"name": "t", "command": "python t.py",
                                             "resources": {"gpus": 1}, "budget_usd": 5}).json()
        deadline = time.monotonic() + 10
        while api.get(f"/api/v1/jobs/{job['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api.patch(f"/api/v1/offers/{G4_SPOT_B}", json={"available": True})
        targets = api.get(f"/api/v1/jobs/{job['id']}/targets").json()
        assert targets["current"]["id"] == api.get(f"/api/v1/jobs/{job['id']}").json()["offer_id"]
        by_id = {t["offer"]["id"]: t for t in targets["data"]}
        assert by_id[G4_SPOT_B]["savings"] > 0.2 and by_id[G4_SPOT_B]["net_saving_usd"] > 0
        dearer = [t for t in targets["data"] if t["savings"] < 0]
        assert dearer and all(t["net_saving_usd"] < 0 for t in dearer)
        assert targets["data"][0]["offer"]["id"] == G4_SPOT_B  # the best first

        assert api.get(f"/api/v1/jobs/{job['id']}/artifacts").json() == {"data": [], "count": 0}
        service.ctx.store.put(f"jobs/{job['id']}/artifacts/model.json", b"{}")
        listed = api.get(f"/api/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert listed == [{"name": "model.json",
                           "url": f"/api/v1/jobs/{job['id']}/artifacts/model.json"}]
        assert api.get(listed[0]["url"]).content == b"{}"
        assert api.get("/api/v1/jobs/nope/targets").status_code == 404
