"""The agent's spot watcher against a metadata service on loopback that
behaves like EC2's IMDSv2: session tokens required, 404 until a notice."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpuscout.agent.imds import (
    ImdsClient,
    SpotNotice,
    imds_endpoint_from_env,
    watch_spot_interruption,
)


class FakeImds:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.notice: dict[str, str] | None = None
        self.reads = 0
        self.unauthorized = 0
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:  # noqa: N802
                if self.path != "/latest/api/token" or not self.headers.get(
                        "X-aws-ec2-metadata-token-ttl-seconds"):
                    self._answer(400, b"")
                    return
                imds.tokens.append(f"token-{len(imds.tokens) + 1}")
                self._answer(200, imds.tokens[-1].encode())

            def do_GET(self) -> None:  # noqa: N802
                imds.reads += 1
                token = self.headers.get("X-aws-ec2-metadata-token")
                if not imds.tokens or token != imds.tokens[-1]:
                    imds.unauthorized += 1
                    self._answer(401, b"")
                elif self.path != "/latest/meta-data/spot/instance-action" or not imds.notice:
                    self._answer(404, b"")
                else:
                    self._answer(200, json.dumps(imds.notice).encode())

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(5)


def test_the_watcher_reports_a_notice_once_it_appears(imds: FakeImds) -> None:
    seen: list[SpotNotice] = []

    async def on_notice(notice: SpotNotice) -> None:
        seen.append(notice)

    async def scenario() -> SpotNotice:
        watcher = asyncio.create_task(
            watch_spot_interruption(imds.url, on_notice, interval_s=0.02))
        while imds.reads < 3:
            await asyncio.sleep(0.01)
        assert not seen and not watcher.done()  # 404: no notice yet
        imds.notice = {"action": "terminate", "time": "2026-11-24T17:00:00Z"}
        return await asyncio.wait_for(watcher, 5)

    notice = asyncio.run(scenario())
    assert notice == SpotNotice("terminate", "2026-11-24T17:00:00Z")
    assert seen == [notice]
    assert imds.tokens == ["token-1"]  # one IMDSv2 session for every read
    assert imds.unauthorized == 0


def test_an_expired_token_is_renewed_and_an_unreachable_service_retried(
        imds: FakeImds) -> None:
    async def scenario() -> SpotNotice | None:
        client = ImdsClient(imds.url)
        try:
            assert await client.spot_notice() is None
            imds.tokens.append("token-revoked-elsewhere")  # the service no longer takes ours
            imds.notice = {"action": "stop", "time": "t"}
            return await client.spot_notice()
        finally:
            await client.close()

    assert asyncio.run(scenario()) == SpotNotice("stop", "t")
    assert imds.unauthorized == 1 and len(imds.tokens) == 3

    async def unreachable() -> None:
        task = asyncio.create_task(watch_spot_interruption(
            "http://127.0.0.1:9", _ignore, interval_s=0.01))
        await asyncio.sleep(0.2)
        assert not task.done()  # keeps trying
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(unreachable())


def test_the_endpoint_comes_from_the_user_data_environment() -> None:
    assert imds_endpoint_from_env({}) is None
    assert imds_endpoint_from_env({"GPUSCOUT_IMDS_ENDPOINT": "http://169.254.169.254/"}) == \
        "http://169.254.169.254"


async def _ignore(_: SpotNotice) -> None:
    pass


def test_an_agent_on_ec2_reports_the_notice_and_saves_an_emergency_checkpoint(
        imds: FakeImds, tmp_path: Any) -> None:
    """The real agent, started with the user-data's metadata endpoint, sees
    the notice, reports it in its health (the control plane then moves the
    job) and checkpoints at the next step boundary without pausing."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from gpuscout.agent import protocol as p

    imds.notice = {"action": "terminate", "time": "2026-11-24T12:02:00Z"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
    env.update({
        p.ENV_INSTANCE_ID: "i-spot", p.ENV_JOB_ID: "job-spot", p.ENV_AGENT_HOST: "127.0.0.1",
        p.ENV_AGENT_PORT: str(port), p.ENV_STORE_URL: (tmp_path / "store").as_uri(),
        p.ENV_COMMAND: (f"{sys.executable} -m gpuscout.examples.linreg --steps 100000 "
                        "--step-sleep 0.01 --checkpoint-every 100000"),
        p.ENV_STANDBY: "0", p.ENV_WORKDIR: str(tmp_path),
        "GPUSCOUT_IMDS_ENDPOINT": imds.url,
    })
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen([sys.executable, "-m", "gpuscout.agent"], env=env, stdout=log,
                             stderr=log)
    try:
        deadline = time.monotonic() + 30
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/agent/health", timeout=2).json()
            except httpx.HTTPError:
                health = {}
            if health.get("interruption_notice") and health.get("last_checkpoint_step"):
                break
            time.sleep(0.05)
        assert health.get("interruption_notice") == "spot terminate at 2026-11-24T12:02:00Z"
        assert health["last_checkpoint_step"] >= 1  # long before the periodic one
        assert health["state"] == "running"  # an emergency checkpoint does not pause
    finally:
        agent.terminate()
        agent.wait(15)
        log.close()
