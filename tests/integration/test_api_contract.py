"""The API contract, checked by a machine: schemathesis against a live
control plane (uvicorn on loopback, the control loops running over the fake
provider and in-memory agents, SQLite), from the OpenAPI the server serves.

All four phases run (examples, coverage, fuzzing, stateful), with every
check schemathesis has but ``use_after_free`` (see CONFIG). The run must
generate at least 1,000 cases, follow links between operations in the
stateful phase (schemathesis infers them from the path parameters and the
answers' fields), and find nothing: no 5xx, no status, content type, header
or body outside the OpenAPI, no write accepted without the token, no
schema-valid request refused but for STATEFUL_REFUSALS.

Run it alone: ``.venv/bin/pytest -q tests/integration/test_api_contract.py``
(about a minute; the cases, per phase, are printed with ``-s``). Against a
running ``gpuscout up``, the CLI does much the same (it will also send
``?follow=true`` to the logs, which stays open while a job runs)::

    .venv/bin/st run http://127.0.0.1:8080/openapi.json \\
        --phases examples,coverage,fuzzing,stateful --checks all \\
        --exclude-checks use_after_free -H "Authorization: Bearer $(cat ~/.gpuscout/api_token)"
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason, events

from gpuscout.providers.fake import FakeProvider
from gpuscout.server import ServerThread
from tests.api_fixtures import TOKEN, GatedAgents, address_for, close_service, make_service

MIN_CASES = 1000
SEED = 20261129  # a fixed seed: the same cases each run (the server's timing still varies)

# What the run sends and checks, in schemathesis.toml's shape.
CONFIG: dict[str, Any] = {
    "seed": SEED,
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "workers": 1,
    "cache": {"enabled": False},
    "generation": {"max-examples": 40, "database": "none"},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": True},
    },
    "checks": {
        # DELETE /jobs/{id} cancels a job; the cancelled job stays readable
        # (its logs, events and cost are the user's record), which this
        # check takes for a resource that was not deleted.
        "use_after_free": {"enabled": False},
    },
    "operations": [
        {
            # ?follow=true keeps the answer open until the job ends, by
            # contract; a job here runs for minutes.
            "include-path": "/api/v1/jobs/{job_id}/logs",
            "parameters": {"query.follow": False},
        },
        {
            # Server-sent events: "hello" comes at once, the rest as things change.
            "include-path": "/api/v1/stream",
            "max-stream-events": 1,
        },
        {
            # The user proxy answers 502/503/504 when it cannot reach the
            # job's service (here, never: the fake instances have no
            # address); those are the gateway's documented answers, not
            # server errors. Any other 5xx is.
            "include-path-regex": "^/endpoints/",
            "checks": {"not_a_server_error": {"expected-statuses": [
                "1XX", "2XX", "3XX", "4XX", "502", "503", "504"]}},
        },
    ],
}


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    service = make_service(tmp_path / "home", f"sqlite:///{tmp_path / 'gpuscout.db'}",
                           FakeProvider(address_for=address_for), GatedAgents(),
                           reconcile_interval_s=0.2)
    server = ServerThread(service, start_plane=True)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
        close_service(service)


# POST /api/v1/workdirs takes the archive's bytes as they are.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")


# Refusals (422) of schema-valid requests that the OpenAPI cannot state: they
# depend on the clock or on what the control plane holds, not on the
# request's form. positive_data_acceptance takes any other for a finding.
STATEFUL_REFUSALS: dict[tuple[str, str], set[str]] = {
    # deadline: in the future; workdir: uploaded first; resources: some
    # offer of the catalog fits; secrets: a key to seal them; body: no
    # variable both in envs and in secrets.
    ("POST", "/api/v1/jobs"): {"deadline", "workdir", "resources", "secrets", "body"},
    # offer_id: an available offer that fits the job, other than its own.
    ("POST", "/api/v1/jobs/{job_id}/migrate"): {"offer_id"},
    # the body: a gzip'd tar whose members are safe to unpack.
    ("POST", "/api/v1/workdirs"): {"workdir"},
}


def _stateful_refusal(case: Any, status: int | None, body: bytes) -> bool:
    allowed = STATEFUL_REFUSALS.get((case.method.upper(), case.operation.path), set())
    if status != 422 or not allowed:
        return False
    try:
        fields = {problem["field"] for problem in json.loads(body)["detail"]}
    except (ValueError, KeyError, TypeError):
        return False
    return fields <= allowed


def describe(event: events.ScenarioFinished) -> list[str]:
    """One line per failed check of the scenario."""
    lines = []
    for case_id, checks in event.recorder.checks.items():
        case = event.recorder.cases[case_id].value
        interaction = event.recorder.interactions.get(case_id)
        response = interaction.response if interaction else None
        status = response.status_code if response else None
        body = response.content if response else b""
        for check in checks:
            if check.failure_info is None:
                continue
            if check.name == "positive_data_acceptance" and _stateful_refusal(case, status,
                                                                               body):
                continue
            failure = check.failure_info.failure
            lines.append(f"{event.phase.value}: {case.method} {case.path} -> {status}: "
                         f"{check.name}: {failure.title}: {failure.message}\n"
                         f"    sent {case.body!r:.300}, answered {body[:300]!r}")
    return lines


def test_the_api_keeps_its_openapi_contract(server_url: str) -> None:
    schema = schemathesis.openapi.from_url(
        f"{server_url}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))
    cases: Counter[str] = Counter()
    findings: list[str] = []
    errors: list[str] = []
    links = None
    linked = 0
    finished = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases[event.phase.value] += len(event.recorder.cases)
            # A case whose values came from an earlier answer by a link.
            linked += sum(node.transition is not None
                          for node in event.recorder.cases.values())
            findings += describe(event)
        elif isinstance(event, events.PhaseStarted) and isinstance(
                event.payload, events.StatefulPhasePayload):
            links = event.payload
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None and not errors, "\n".join(errors)
    print(f"cases per phase: {dict(cases)}; links: {links}; cases by a link: {linked}; "
          f"{finished.running_time:.1f} s")
    assert finished.stop_reason == StopReason.COMPLETED
    assert not findings, "\n".join(sorted(set(findings)))
    assert set(cases) == {"examples", "coverage", "fuzzing", "stateful"}
    assert links is not None and links.transitions_selected > 0 and linked > 0
    assert sum(cases.values()) >= MIN_CASES
