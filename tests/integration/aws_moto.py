"""Helpers for the AWS provider tests: EC2 on moto's server, faults moto
cannot produce, and agents that play the instance side.

- ``aws_env`` (fixture): the environment plain boto3 reads (AWS_ENDPOINT_URL
  pointing at moto's server on loopback, test credentials, us-east-1), and
  the bucket ``TEST_BUCKET`` for ``TEST_STORE_URL``, the job store.
- ``launch_request``: a LaunchRequest on that job store.
- ``FaultyEc2``: wraps a real boto3 EC2 client and answers the AWS errors a
  test queues (throttling, no capacity) in moto's place, under botocore's
  retries.
- ``dropping_proxy``: moto behind a proxy that drops connections;
  ``instant_retries`` (fixture): botocore's retries without their waits.
- ``AgentAwsProvider``: the real AwsProvider whose every launched EC2
  instance is also played by a real process: the user-data EC2 stored for
  the instance, read back with describe_instance_attribute and run with
  bash, as cloud-init would; its agent listens on a loopback port, which
  becomes the instance's address. By default the machine's python3 has
  gpuscout (an AMI with it); ``machine_env`` describes another machine.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
import pytest
from botocore import xform_name  # type: ignore[import-untyped]
from botocore.awsrequest import AWSResponse  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from botocore.retries.standard import ExponentialBackoff  # type: ignore[import-untyped]

from gpuscout.domain import Offer
from gpuscout.providers.aws import AwsConfig, AwsProvider
from gpuscout.providers.aws import ec2_client as provider_ec2_client
from gpuscout.providers.base import LaunchRequest, ProviderInstance
from tests.s3_servers import S3Endpoint, moto_server

__all__ = [
    "AgentAwsProvider", "FaultyEc2", "aws_env", "dropping_proxy", "instant_retries", "moto_server",
    "new_config",
]

TEST_SECRET = "testing-secret-9f2c"  # noqa: S105  (a fake credential moto accepts)
TEST_BUCKET = "gpuscout-test"
TEST_STORE_URL = f"s3://{TEST_BUCKET}/gpuscout"


@pytest.fixture
def aws_env(moto_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3 = boto3.client("s3", region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=TEST_BUCKET)
    return moto_server


@functools.cache
def _session() -> Any:
    """One boto3 session for the tests' clients: a client of a new session
    parses EC2's service model again (0.2 s each), and tests make hundreds."""
    return boto3.session.Session()


def ec2_client() -> Any:
    """A client as the provider makes one (botocore's standard retries)."""
    return provider_ec2_client(AwsConfig(region="us-east-1"), session=_session())


_AMIS: dict[str, str] = {}


def any_ami() -> str:
    """An image moto knows (looked up once per server: moto lists thousands)."""
    url = os.environ["AWS_ENDPOINT_URL"]
    if url not in _AMIS:
        images = ec2_client().describe_images(Owners=["amazon"])["Images"]
        _AMIS[url] = str(images[0]["ImageId"])
    return _AMIS[url]


def new_config(**changes: Any) -> AwsConfig:
    """A config of a cluster of its own, so tests sharing moto do not see
    each other's instances."""
    fields: dict[str, Any] = {"cluster": f"t-{uuid.uuid4().hex[:10]}", "ami_id": any_ami(),
                              "package_spec": None}
    fields.update(changes)
    return AwsConfig(**fields)


def launch_request(offer: Offer, instance_id: str, **fields: Any) -> LaunchRequest:
    """A LaunchRequest for ``offer`` whose job store is ``TEST_STORE_URL``;
    ``fields`` give (or override) the rest."""
    return LaunchRequest(**{"instance_id": instance_id, "offer": offer,
                            "store_url": TEST_STORE_URL, **fields})


class FaultyEc2:
    """A boto3 EC2 client with faults moto cannot produce.

    ``fail(operation, code, times)`` queues AWS errors, answered where AWS's
    answers enter botocore (its ``before-send`` event), so that botocore's
    own retries see them as they would see AWS's; ``calls`` records every
    request sent (each retry too). ``refuse(instance_type, zone, spot,
    code)`` makes run_instances refuse one offer every time; ``reclaim(ec2_id)``
    makes EC2 report a spot interruption for an instance (its spot request
    in status ``marked-for-termination``). Paginators call the operations
    through this object, so replacing ``_client`` reaches them too.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._queued: dict[str, list[str]] = {}
        self._refused: dict[tuple[str, str, bool], str] = {}
        self._reclaimed: set[str] = set()
        self.calls: list[str] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-send.ec2", self._before_send)

    def reclaim(self, ec2_id: str) -> None:
        with self._lock:
            self._reclaimed.add(ec2_id)

    def fail(self, operation: str, code: str, times: int = 1) -> None:
        with self._lock:
            self._queued.setdefault(operation, []).extend([code] * times)

    def refuse(self, instance_type: str, zone: str, spot: bool, code: str) -> None:
        self._refused[(instance_type, zone, spot)] = code

    def get_paginator(self, operation: str) -> Any:
        paginator = self._client.get_paginator(operation)
        paginator._method = getattr(self, operation)  # each page through this object
        return paginator

    def _before_send(self, request: Any, event_name: str, **_: Any) -> Any:
        operation = xform_name(event_name.rsplit(".", 1)[-1])
        with self._lock:
            self.calls.append(operation)
            queue = self._queued.get(operation)
            code = queue.pop(0) if queue else None
        return aws_error(code) if code else None

    def _with_reclaims(self, name: str, params: dict[str, Any], call: Any) -> Any:
        with self._lock:
            reclaimed = set(self._reclaimed)
        if name == "describe_spot_instance_requests":
            ids = params.get("SpotInstanceRequestIds", [])
            ours = [i for i in ids if i.startswith("sir-reclaim-")]
            rest = [i for i in ids if i not in ours]
            answer = call(**{**params, "SpotInstanceRequestIds": rest}) if rest else {
                "SpotInstanceRequests": []}
            answer["SpotInstanceRequests"] += [
                {"SpotInstanceRequestId": i, "InstanceId": i.removeprefix("sir-reclaim-"),
                 "State": "active", "Status": {"Code": "marked-for-termination"}}
                for i in ours]
            return answer
        answer = call(**params)
        if name == "describe_instances":
            for reservation in answer["Reservations"]:
                for raw in reservation["Instances"]:
                    if raw["InstanceId"] in reclaimed:
                        raw["SpotInstanceRequestId"] = "sir-reclaim-" + raw["InstanceId"]
        return answer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(**params: Any) -> Any:
            if name == "run_instances":
                key = (params["InstanceType"], params["Placement"]["AvailabilityZone"],
                       "InstanceMarketOptions" in params)
                code = self._refused.get(key)
                if code is not None:
                    raise ClientError({"Error": {"Code": code,
                                                 "Message": "injected by the test"}}, name)
            if name in ("describe_instances", "describe_spot_instance_requests"):
                return self._with_reclaims(name, params, attr)
            return attr(**params)

        return call


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def aws_error(code: str, status: int = 400) -> AWSResponse:
    """An EC2 error answer, as AWS's query protocol writes it."""
    body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>"
            f"<Code>{code}</Code><Message>injected by the test</Message></Error></Errors>"
            f"<RequestID>test</RequestID></Response>").encode()
    return AWSResponse("https://ec2.test", status, {}, _Body(body))


@contextlib.contextmanager
def dropping_proxy(target_url: str, drops: int | None) -> Iterator[tuple[str, list[int]]]:
    """A loopback TCP proxy to ``target_url`` that closes its first ``drops``
    connections (None: every one) unanswered, the way a refusing or
    restarting endpoint does; yields (its URL, [connections dropped])."""
    target = urlsplit(target_url)
    listener = socket.create_server(("127.0.0.1", 0))
    dropped = [0]
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if drops is None or dropped[0] < drops:
                dropped[0] += 1
                # An RST, not a FIN: what a refused or reset connection looks like.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                struct.pack("ii", 1, 0))
                conn.close()
                continue
            upstream = socket.create_connection((target.hostname, target.port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", dropped
    finally:
        stop.set()
        # close() alone does not wake the accept() waiting in serve (it would
        # hold join for its whole timeout); shutdown does.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def instant_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """botocore's retries without their waits: the delays its backoff chose,
    in order, while it sleeps none of them."""
    chosen: list[float] = []
    real = ExponentialBackoff.delay_amount

    def delay_amount(self: Any, context: Any) -> float:
        chosen.append(real(self, context))
        return 0.0

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", delay_amount)
    return chosen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentAwsProvider(AwsProvider):
    """AwsProvider + a real agent process per launched instance (see above)."""

    def __init__(self, config: AwsConfig, root: Path, *,
                 machine_env: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.root = root
        self.machine_env = machine_env
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.user_data_of: dict[str, str] = {}

    def _agent_port_for(self, request: LaunchRequest) -> int:
        port = self.ports[request.instance_id] = free_port()
        return port

    def _address_of(self, instance_id: str, ip: str | None) -> str | None:
        port = self.ports.get(instance_id)
        return f"127.0.0.1:{port}" if port else super()._address_of(instance_id, ip)

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        launched = super().launch(request)
        # What EC2 stored is what cloud-init would run.
        answer = self.ec2.describe_instance_attribute(InstanceId=launched.provider_ref,
                                                      Attribute="userData")
        script = base64.b64decode(answer["UserData"]["Value"]).decode()
        self.user_data_of[request.instance_id] = script
        home = self.root / request.instance_id
        home.mkdir(parents=True)
        # Many machines share this host: each gets an instance folder of its
        # own (as root, bootstrap.sh would put them all in /var/lib/gpuscout).
        instance_dir = shlex.quote(str(home / ".gpuscout" / "instance"))
        script = script.replace("unset GPUSCOUT_INSTANCE_DIR",
                                f"export GPUSCOUT_INSTANCE_DIR={instance_dir}", 1)
        (home / "user-data.sh").write_text(script)
        # A fresh machine: none of this process's GPUSCOUT_* or AWS settings,
        # and a python3 on PATH that has gpuscout (as on the AMI).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GPUSCOUT_", "AWS_"))}
        env["HOME"] = str(home)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(self.machine_env or {})
        with open(home / "boot.log", "wb") as log:
            self.processes[request.instance_id] = subprocess.Popen(
                ["bash", str(home / "user-data.sh")], cwd=home, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return launched

    def terminate(self, instance_id: str) -> None:
        super().terminate(instance_id)
        self.stop_agent(instance_id)

    def stop_agent(self, instance_id: str) -> None:
        process = self.processes.get(instance_id)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def stop_all(self) -> None:
        for instance_id in list(self.processes):
            self.stop_agent(instance_id)

    def agent_log(self, instance_id: str) -> str:
        path = self.root / instance_id / ".gpuscout" / "instance" / "agent.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def stopping(provider: AgentAwsProvider) -> Iterator[AgentAwsProvider]:
    try:
        yield provider
    finally:
        provider.stop_all()
