"""The control plane's side of the agent protocol (see agent/protocol.py)."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import httpx
from pydantic import ValidationError

from gpuscout.agent.protocol import (
    CheckpointRequest,
    CheckpointResult,
    Health,
    Message,
    RestoreRequest,
    SecretsRequest,
)


class AgentError(RuntimeError):
    """The agent did not answer, or answered with an error."""


# The agent's wire messages (agent/protocol.py), under the names the
# controllers use.
AgentHealth = Health
M = TypeVar("M", bound=Message)


class Agents(Protocol):
    """What controllers need from agents; a fake implements it in unit tests."""

    def set_token(self, address: str, token: str) -> None:
        """The bearer token of the agent at ``address`` (one per instance)."""
        ...

    def health(self, address: str) -> AgentHealth: ...

    def checkpoint(self, address: str, *, pause: bool, timeout_s: float) -> CheckpointResult: ...

    def resume(self, address: str) -> None: ...

    def restore(self, address: str, step: int | None) -> None: ...

    def send_secrets(self, address: str, secrets: dict[str, str]) -> None:
        """Hand the job's secret values to an agent that awaits them."""
        ...


class AgentClient:
    def __init__(self, token_for: dict[str, str] | None = None, timeout_s: float = 3.0) -> None:
        # One pooled client: health polls every half second must not open a
        # new connection each time.
        self._http = httpx.Client(timeout=timeout_s)
        self._tokens = token_for if token_for is not None else {}

    def close(self) -> None:
        self._http.close()

    def set_token(self, address: str, token: str) -> None:
        self._tokens[address] = token

    def _call(self, method: str, address: str, path: str, *, json: Any = None,
              timeout: float | None = None) -> httpx.Response:
        headers = {}
        token = self._tokens.get(address)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self._http.request(
                method, f"http://{address}{path}", json=json, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as err:
            raise AgentError(f"agent at {address} did not answer {path}: {err}") from err
        if response.status_code >= 400:
            raise AgentError(
                f"agent at {address} answered {path} with {response.status_code}: "
                f"{response.text[:300]}"
            )
        return response

    def health(self, address: str) -> AgentHealth:
        return self._parse(Health, address, "/agent/health",
                           self._call("GET", address, "/agent/health"))

    def checkpoint(self, address: str, *, pause: bool, timeout_s: float) -> CheckpointResult:
        body = CheckpointRequest(pause=pause, timeout_s=timeout_s)
        response = self._call("POST", address, "/agent/checkpoint",
                              json=body.model_dump(mode="json"), timeout=timeout_s + 5)
        return self._parse(CheckpointResult, address, "/agent/checkpoint", response)

    def resume(self, address: str) -> None:
        self._call("POST", address, "/agent/resume")

    def restore(self, address: str, step: int | None) -> None:
        self._call("POST", address, "/agent/restore",
                   json=RestoreRequest(step=step).model_dump(mode="json"))

    def send_secrets(self, address: str, secrets: dict[str, str]) -> None:
        self._call("POST", address, "/agent/secrets",
                   json=SecretsRequest(secrets=secrets).model_dump(mode="json"))

    @staticmethod
    def _parse(model: type[M], address: str, path: str, response: httpx.Response) -> M:
        """The answer as its wire message; AgentError if it is not one."""
        try:
            return model.model_validate_json(response.content)
        except ValidationError as err:
            raise AgentError(f"agent at {address} answered {path} with an unexpected body: "
                             f"{err.errors()[0]['msg']}") from err
