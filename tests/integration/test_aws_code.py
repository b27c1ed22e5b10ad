"""Code travels through the object store (AWS provider, moto's EC2 and S3).

What a user relies on: an instance whose image lacks gpuscout installs the
control plane's own code from the job's bucket, by a short-lived URL in a
user-data that holds no AWS secret; the bytes it gets are checked; the code
is uploaded once, not per launch; an explicit package spec wins.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import shlex
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gpuscout.agent.protocol import AgentState
from gpuscout.controllers.agent_client import AgentClient, AgentError
from gpuscout.domain import Capacity, Offer
from gpuscout.providers.aws import AwsProvider
from gpuscout.providers.base import LaunchError
from gpuscout.providers.bootstrap import MAX_USER_DATA_BYTES
from gpuscout.providers.code_bundle import CODE_PREFIX, wheel_of_running_package
from tests.integration.aws_moto import (
    TEST_BUCKET,
    TEST_SECRET,
    TEST_STORE_URL,
    AgentAwsProvider,
    ec2_client,
    launch_request,
    new_config,
    stopping,
)

pytestmark = pytest.mark.usefixtures("aws_env")


request = functools.partial(launch_request, job_id="j-code", command="true",
                            agent_token="agent-token-c")


def an_offer(provider: AwsProvider) -> Offer:
    return next(o for o in provider.offers()
                if o.instance_type == "g4dn.xlarge" and o.capacity == Capacity.ON_DEMAND)


def stored_user_data(ec2_id: str) -> str:
    answer = ec2_client().describe_instance_attribute(InstanceId=ec2_id, Attribute="userData")
    return base64.b64decode(answer["UserData"]["Value"]).decode()


def exported(script: str, name: str) -> str | None:
    """The value the script exports for ``name`` (None: unset)."""
    for line in script.splitlines():
        words = shlex.split(line) if line.startswith(("export ", "unset ")) else []
        if words[:1] == ["export"] and words[1].startswith(name + "="):
            return words[1].split("=", 1)[1]
        if words == ["unset", name]:
            return None
    raise AssertionError(f"{name} is neither exported nor unset")


def s3_calls(provider: AwsProvider, operation: str) -> list[str]:
    """Records each ``operation`` the provider's code shipper sends to S3."""
    seen: list[str] = []
    client = provider._shipper(TEST_STORE_URL).store.client  # type: ignore[attr-defined]
    client.meta.events.register(f"before-call.s3.{operation}",
                                lambda **_: seen.append(operation))
    return seen


def test_user_data_names_the_wheel_by_a_presigned_url_that_serves_exactly_it() -> None:
    provider = AwsProvider(new_config(code_url_ttl_s=900))
    launched = provider.launch(request(an_offer(provider), "i-code"))
    script = stored_user_data(launched.provider_ref)
    assert len(script.encode()) < MAX_USER_DATA_BYTES
    for secret in ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", TEST_SECRET):
        assert secret not in script

    spec = exported(script, "GPUSCOUT_PACKAGE_SPEC")
    assert spec is not None
    # PEP 508: the wheel with the aws extra, which the agent's S3 store needs.
    assert spec.startswith("gpuscout[aws] @ http://")
    url, _, fragment = spec.removeprefix("gpuscout[aws] @ ").partition("#")
    parts = urlsplit(url)
    wheel = wheel_of_running_package()
    assert parts.path.endswith("/" + wheel.filename)  # pip takes the name from the path
    assert parts.path.endswith(f"/gpuscout/{CODE_PREFIX}/{wheel.sha256}/{wheel.filename}")
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Signature"]
    assert fragment == f"sha256={wheel.sha256}"

    # Anyone holding the URL (and only the URL) gets the exact wheel bytes.
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200, fetched.text
    assert hashlib.sha256(fetched.content).hexdigest() == wheel.sha256
    assert fetched.content == wheel.data
    # Without the signature the bucket says no.
    assert httpx.get(url.split("?")[0], timeout=10).status_code == 403

    # A valid wheel: gpuscout's package, its data files, and a RECORD that
    # matches every file (pip checks it on install).
    with zipfile.ZipFile(io.BytesIO(fetched.content)) as archive:
        names = set(archive.namelist())
        assert {"gpuscout/__init__.py", "gpuscout/providers/bootstrap.sh",
                "gpuscout/market/data/aws_ondemand.csv"} <= names
        assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
        info = "gpuscout-0.1.0.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        assert "Name: gpuscout" in metadata and "Requires-Dist: boto3" in metadata
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        assert "gpuscout = gpuscout.cli.main:app" in entry_points
        assert "Tag: py3-none-any" in archive.read(f"{info}/WHEEL").decode()
        record = archive.read(f"{info}/RECORD").decode().splitlines()
        assert {line.split(",")[0] for line in record} == names
        for line in record:
            name, digest, size = line.split(",")
            if name.endswith("RECORD"):
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert (digest, int(size)) == (f"sha256={expected.decode()}", len(data)), name


def test_the_wheel_is_uploaded_once_not_per_launch() -> None:
    first = AwsProvider(new_config())
    offer = an_offer(first)
    puts = s3_calls(first, "PutObject")
    first.launch(request(offer, "i-once-1"))
    first.launch(request(offer, "i-once-2"))
    # The bucket may hold it from an earlier test already: at most one upload.
    assert len(puts) <= 1
    # A restarted control plane finds it by its content-addressed key.
    again = AwsProvider(new_config())
    puts, heads = s3_calls(again, "PutObject"), s3_calls(again, "HeadObject")
    again.launch(request(offer, "i-once-3"))
    again.launch(request(offer, "i-once-4"))
    assert puts == [] and heads == ["HeadObject"]
    specs = [exported(stored_user_data(p.get(i).provider_ref), "GPUSCOUT_PACKAGE_SPEC")
             for p, i in ((first, "i-once-1"), (again, "i-once-4"))]
    # Each launch signs a URL of its own, to the same object.
    assert {urlsplit((s or "").removeprefix("gpuscout[aws] @ ")).path for s in specs} == {
        f"/{TEST_BUCKET}/gpuscout/{wheel_of_running_package().key}"}


def test_a_configured_package_spec_wins_and_a_file_store_ships_nothing() -> None:
    spec = "gpuscout==0.1.0"
    pinned = AwsProvider(new_config(package_spec=spec))
    offer = an_offer(pinned)
    launched = pinned.launch(request(offer, "i-pinned", store_url="s3://no-such-bucket/x"))
    assert exported(stored_user_data(launched.provider_ref), "GPUSCOUT_PACKAGE_SPEC") == spec

    plain = AwsProvider(new_config())
    launched = plain.launch(request(offer, "i-file", store_url="file:///var/lib/store"))
    assert exported(stored_user_data(launched.provider_ref), "GPUSCOUT_PACKAGE_SPEC") is None
    off = AwsProvider(new_config(ship_code=False))
    launched = off.launch(request(offer, "i-off"))
    assert exported(stored_user_data(launched.provider_ref), "GPUSCOUT_PACKAGE_SPEC") is None


def test_a_store_that_cannot_take_the_code_refuses_the_launch() -> None:
    provider = AwsProvider(new_config())
    with pytest.raises(LaunchError, match="s3://no-such-bucket"):
        provider.launch(request(an_offer(provider), "i-nobucket",
                                store_url="s3://no-such-bucket/gpuscout"))
    assert provider.list() == []


def test_a_machine_without_gpuscout_installs_the_shipped_wheel_and_runs_the_job(
        tmp_path: Path) -> None:
    """The whole path on a bare machine: cloud-init runs the user-data,
    which creates a venv, pip-installs the wheel from the presigned URL
    (offline: no index, the image's packages stand in for the wheel's
    dependencies) and starts the agent, whose job imports gpuscout from
    that venv."""
    bare_bin = tmp_path / "bare-bin"
    bare_bin.mkdir()
    # The interpreter the test venv was made from: it has no gpuscout.
    (bare_bin / "python3").symlink_to(Path(sys._base_executable).resolve())  # type: ignore[attr-defined]
    probe = subprocess.run([str(bare_bin / "python3"), "-c", "import gpuscout"],
                           capture_output=True, cwd=tmp_path)
    assert probe.returncode != 0, "the bare python must not have gpuscout"
    machine_env = {
        "PATH": f"{bare_bin}:/usr/bin:/bin",
        # The image's packages: the test venv's, whose gpuscout (an
        # editable install, a .pth file) is not seen through PYTHONPATH.
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    provider = AgentAwsProvider(new_config(), tmp_path / "machines", machine_env=machine_env)
    command = ("python -c 'import gpuscout, sys; print(gpuscout.__file__); print(sys.prefix)'"
               " > where.txt")
    agents = AgentClient()
    with stopping(provider):
        launched = provider.launch(request(an_offer(provider), "i-bare", command=command))
        assert launched.address is not None
        agents.set_token(launched.address, "agent-token-c")
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline:
            with contextlib.suppress(AgentError):
                health = agents.health(launched.address)
                if health.state in (AgentState.COMPLETED, AgentState.FAILED):
                    break
            if provider.processes["i-bare"].poll() not in (None, 0):
                break
            time.sleep(0.5)
        log = provider.agent_log("i-bare")
        assert health is not None and health.state == AgentState.COMPLETED, (health, log)
    instance_dir = tmp_path / "machines" / "i-bare" / ".gpuscout" / "instance"
    venv = instance_dir / "venv"
    assert "installing gpuscout[aws] @ http://" in log and "X-Amz-Signature" not in log
    where, prefix = (instance_dir / "work" / "where.txt").read_text().split()
    # gpuscout from the venv bootstrap made; the job's own environment on top
    # of it (agent/jobenv.py), so what its setup installs stays out of it.
    assert Path(where).is_relative_to(venv) and Path(prefix) == instance_dir / "jobenv"
    assert not Path(where).is_relative_to(Path(__file__).resolve().parents[2])  # not ours
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert (installed / "site-packages" / "gpuscout" / "providers" / "bootstrap.sh").exists()
