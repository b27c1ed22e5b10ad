"""Real S3 servers on loopback for the tests: moto (in process) and s3rver
(the npm package, a Node process; ``make test-deps`` installs it into
``node_modules``).

Fixtures (session scope; import them into a conftest or a test module):
    moto_server    -> S3Endpoint of a ThreadedMotoServer
    s3rver_server  -> S3Endpoint of an s3rver subprocess

Each server starts on first use and stops when the last fixture instance
using it is torn down, so importing the fixtures into several modules (or a
conftest and a module) still starts one server per session, and none
outlives the session. A missing s3rver fails the test rather than skipping
it: a suite that silently tests less is worse than a red one.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from gpuscout.store import S3Store

REPO_ROOT = Path(__file__).resolve().parents[1]
S3RVER_BIN = REPO_ROOT / "node_modules" / ".bin" / "s3rver"
START_TIMEOUT_S = 20.0
_SESSIONS: dict[S3Endpoint, Any] = {}


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test S3 server listens and the credentials it accepts."""

    name: str
    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def session(self) -> Any:
        """A boto3 session for this server; one per endpoint, because making
        one loads botocore's models (~0.3 s). Make clients from it on the
        test's thread: sessions are not thread-safe, clients are."""
        cached = _SESSIONS.get(self)
        if cached is None:
            cached = _SESSIONS[self] = boto3.session.Session(
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                region_name=self.region,
            )
        return cached

    def client(self) -> Any:
        return self.session().client("s3", endpoint_url=self.url)

    def env(self) -> dict[str, str]:
        """Environment for a process that opens this server by URL alone."""
        return {
            "AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
        }

    def new_store(self, prefix: str = "", **kwargs: Any) -> S3Store:
        """An S3Store on a fresh bucket of its own (created here)."""
        bucket = f"t-{uuid.uuid4().hex[:16]}"
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return S3Store(url, endpoint_url=self.url, session=self.session(),
                       create_bucket=True, **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server on port {port} exited before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f}s")


@dataclass
class _Shared:
    """One server per session, however many fixture definitions share it."""

    start: Callable[[], tuple[S3Endpoint, Callable[[], None]]]
    users: int = 0
    endpoint: S3Endpoint | None = None
    stop: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def use(self) -> Iterator[S3Endpoint]:
        with self.lock:
            if self.users == 0:
                self.endpoint, self.stop = self.start()
            self.users += 1
            endpoint = self.endpoint
        assert endpoint is not None
        try:
            yield endpoint
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0 and self.stop is not None:
                    self.stop()
                    self.endpoint = self.stop = None


def _start_moto() -> tuple[S3Endpoint, Callable[[], None]]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port, START_TIMEOUT_S, lambda: True)
    except BaseException:
        server.stop()
        raise
    endpoint = S3Endpoint("moto", f"http://127.0.0.1:{port}", "testing", "testing")
    return endpoint, server.stop


def _start_s3rver() -> tuple[S3Endpoint, Callable[[], None]]:
    if not S3RVER_BIN.exists():
        pytest.fail(f"s3rver is not installed at {S3RVER_BIN}: run `make test-deps` "
                    "(npm install s3rver@3)", pytrace=False)
    if shutil.which("node") is None:
        pytest.fail("s3rver needs Node.js (`node`) on PATH", pytrace=False)
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="gpuscout-s3rver-"))
    (root / "data").mkdir()
    # A file, not a pipe, for its stderr: nobody drains a pipe during the
    # session, and a full one would block the server.
    log = (root / "s3rver.log").open("wb")
    process = subprocess.Popen(
        [str(S3RVER_BIN), "--directory", str(root / "data"), "--port", str(port),
         "--address", "127.0.0.1", "--silent"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    try:
        wait_for_port(port, START_TIMEOUT_S, lambda: process.poll() is None)
    except BaseException as exc:
        output = (root / "s3rver.log").read_bytes()[-2000:].decode(errors="replace")
        stop()
        raise RuntimeError(f"s3rver did not start: {exc}; output: {output}") from exc
    # s3rver accepts the fixed credentials S3RVER / S3RVER.
    return S3Endpoint("s3rver", f"http://127.0.0.1:{port}", "S3RVER", "S3RVER"), stop


_MOTO = _Shared(_start_moto)
_S3RVER = _Shared(_start_s3rver)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Endpoint]:
    with _MOTO.use() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3rver_server() -> Iterator[S3Endpoint]:
    with _S3RVER.use() as endpoint:
        yield endpoint

