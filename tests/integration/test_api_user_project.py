"""The REST API's side of a user's own project: what can never run is
refused at submit with a 422 naming the field, secrets are never shown
back, packed workdirs are uploaded once, and logs read back."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from gpuscout import workdir
from gpuscout.joblog import format_line
from tests.api_fixtures import AUTH, TestClient

JOB: dict[str, Any] = {"name": "n", "command": "python train.py",
                       "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1}}


def post(client: TestClient, **changes: Any) -> Any:
    return client.post("/api/v1/jobs", json={**JOB, **changes}, headers=AUTH)


def fields_of(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    return [e["field"] for e in response.json()["detail"]]


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"resources": {"gpus": 1000}}, "resources", "no offer has 1000 GPUs"),
    ({"resources": {"gpus": 1, "gpu_type": "A100"}}, "resources", "GPU type A100"),
    ({"resources": {"gpus": 1, "gpu_type": ["H100", "A100"]}}, "resources", "GPU type"),
    ({"command": "x" * 13000}, "command", "put long commands in a script"),
    ({"setup": "y" * 13000}, "setup", "16384-byte user-data"),
    ({"envs": {"BIG": "z" * 13000}}, "envs", "bytes"),
    ({"envs": {"1BAD": "x"}}, "envs", "not an environment variable name"),
    ({"envs": {"GPUSCOUT_JOB_ID": "spoof"}}, "envs", "set by GPU Scout"),
    ({"workdir": "/home/me/project"}, "workdir", "sha256"),
    ({"workdir": "sha256:" + "0" * 64}, "workdir", "never uploaded"),
    ({"max_restarts_on_errors": -1}, "max_restarts_on_errors", "greater than or equal"),
])
def test_what_can_never_run_is_refused_at_submit(
        client: TestClient, changes: dict[str, Any], field: str, words: str) -> None:
    response = post(client, **changes)
    assert fields_of(response) == [field]
    assert words in response.text
    assert client.get("/api/v1/jobs").json()["count"] == 0  # nothing half-written


def test_secrets_are_never_shown_back(client: TestClient) -> None:
    response = post(client, envs={"RUN": "a"}, secrets={"TOKEN": "canary-xyz"},
                    setup="pip install -r requirements.txt", max_restarts_on_errors=2)
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]
    assert (spec["envs"], spec["secrets"], spec["setup"], spec["max_restarts_on_errors"]) == (
        {"RUN": "a"}, ["TOKEN"], "pip install -r requirements.txt", 2)
    for path in ("/api/v1/jobs", f"/api/v1/jobs/{response.json()['id']}",
                 f"/api/v1/jobs/{response.json()['id']}/events", "/metrics"):
        assert "canary-xyz" not in client.get(path).text


def test_a_secret_also_in_envs_is_refused(client: TestClient) -> None:
    response = post(client, envs={"TOKEN": "a"}, secrets={"TOKEN": "b"})
    assert response.status_code == 422 and "also given in envs" in response.text


def test_a_packed_workdir_is_uploaded_once_and_jobs_name_it(
        client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "train.py").write_text("print('hi')\n")
    packed = workdir.pack(tmp_path / "p")
    data = packed.path.read_bytes()
    assert client.get(f"/api/v1/workdirs/{packed.ref}").status_code == 404
    headers = {**AUTH, "Content-Type": "application/gzip"}
    first = client.post("/api/v1/workdirs", content=data, headers=headers)
    assert first.status_code == 201 and first.json() == {
        "ref": packed.ref, "size_bytes": len(data), "files": 1, "uploaded": True}
    again = client.post("/api/v1/workdirs", content=data, headers=headers)
    assert again.json()["uploaded"] is False
    assert client.get(f"/api/v1/workdirs/{packed.ref}").status_code == 200
    assert post(client, workdir=packed.ref).json()["spec"]["workdir"] == packed.ref
    # Uploads change state: the token is needed.
    assert client.post("/api/v1/workdirs", content=data).status_code == 401


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"),
    (b"not a tarball", "cannot be unpacked: not a gzip file"),
])
def test_a_bad_upload_is_refused(client: TestClient, body: bytes, words: str) -> None:
    response = client.post("/api/v1/workdirs", content=body,
                           headers={**AUTH, "Content-Type": "application/gzip"})
    assert fields_of(response) == ["workdir"] and words in response.text


def test_an_archive_that_would_unpack_outside_its_folder_is_refused(client: TestClient) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        info = tarfile.TarInfo("../evil.sh")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"boom"))
    response = client.post("/api/v1/workdirs", content=raw.getvalue(),
                           headers={**AUTH, "Content-Type": "application/gzip"})
    assert fields_of(response) == ["workdir"] and "is refused: member '../evil.sh'" in response.text


def test_logs_read_back_with_a_marker_per_instance(client: TestClient, service: Any) -> None:
    job_id = post(client).json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/logs").text == ""  # nothing placed yet
    for _ in range(10):
        service.plane.reconcile_once()
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    instance_id = job["instance_id"]
    assert instance_id
    store = service.plane.ctx.store
    store.put(f"jobs/{job_id}/logs/{instance_id}/00000000.log",
              (format_line(1e9, "epoch 1") + format_line(1e9 + 1, "epoch 2")).encode())
    text = client.get(f"/api/v1/jobs/{job_id}/logs").text
    assert text.splitlines() == [
        f"-- placed on {instance_id} ({job['offer_id']}) --",
        "2001-09-09T01:46:40.000Z epoch 1", "2001-09-09T01:46:41.000Z epoch 2"]
    assert client.get(f"/api/v1/jobs/{job_id}/logs?tail=1").text.splitlines() == [
        "2001-09-09T01:46:41.000Z epoch 2"]
    assert client.get("/api/v1/jobs/job-nope/logs").status_code == 404
