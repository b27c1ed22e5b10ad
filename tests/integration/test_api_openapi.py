"""What the OpenAPI says of access and errors, checked against the routes
(the whole contract, every case generated, is tests/integration/test_api_contract.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuscout.api import create_app
from gpuscout.providers.fake import FakeProvider
from tests.api_fixtures import AUTH, GatedAgents, TestClient, close_service, make_service

TOKEN_NEEDED = [{"HTTPBearer": []}]
TOKEN_OFF_LOOPBACK = [{}, {"HTTPBearer": []}]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    service = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", FakeProvider(),
                           GatedAgents())
    try:
        with TestClient(create_app(service)) as test_client:
            yield test_client
    finally:
        close_service(service)


def operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": operation
            for path, item in schema["paths"].items() for method, operation in item.items()}


def test_each_operation_states_who_may_call_it(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ops = operations(schema)
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer"}
    api = {name: op for name, op in ops.items() if " /api/v1/" in name}
    writes = {name for name in api if name.split()[0] in ("POST", "PATCH", "DELETE")}
    assert writes and {name for name, op in api.items()
                       if op["security"] == TOKEN_NEEDED} == writes
    assert ops["GET /api/v1/jobs"]["security"] == TOKEN_OFF_LOOPBACK
    assert ops["GET /metrics"]["security"] == TOKEN_OFF_LOOPBACK
    assert ops["GET /healthz"]["security"] == []
    assert ops["GET /endpoints/{job_id}/{path}"]["security"] == []
    for name, op in ops.items():
        assert ("401" in op["responses"]) == bool(op["security"]), name

    # What it says holds: a write without the token is a 401 (a read on
    # loopback is not), and the 401 is documented with its body.
    refused = client.post("/api/v1/jobs", json={"name": "x", "command": "y"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/jobs").status_code == 200
    assert client.post("/api/v1/jobs", json={"name": "x", "command": "y"},
                       headers=AUTH).status_code == 201
    body = ops["POST /api/v1/jobs"]["responses"]["401"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ErrorPublic"}


def test_error_answers_are_documented_as_json(client: TestClient) -> None:
    ops = operations(client.get("/openapi.json").json())
    logs = ops["GET /api/v1/jobs/{job_id}/logs"]["responses"]
    assert set(logs) >= {"200", "401", "404", "422"}
    assert list(logs["200"]["content"]) == ["text/plain"]
    assert list(logs["404"]["content"]) == ["application/json"]
    assert set(ops["DELETE /api/v1/jobs/{job_id}"]["responses"]) >= {"404", "409", "422"}
    invalid = ops["POST /api/v1/jobs"]["responses"]["422"]["content"]["application/json"]
    assert invalid["schema"] == {"$ref": "#/components/schemas/ValidationErrorPublic"}


def test_a_method_a_path_lacks_is_a_405_listing_those_it_has(client: TestClient) -> None:
    response = client.put("/api/v1/jobs/job-x", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert client.options("/api/v1/jobs").headers["allow"] == "GET, POST"
    wrong = client.get("/api/v1/jobs/job-x/migrate")  # was the dashboard's 404
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    assert client.get("/api/v1/jobs/job-x").status_code == 404  # the job's own 404
