"""The control plane's side of the agent protocol (see agent/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gpuscout.agent.protocol import AgentState


class AgentError(RuntimeError):
    """The agent did not answer, or answered with an error."""


@dataclass(frozen=True, slots=True)
class AgentHealth:
    state: AgentState
    step: int
    total_steps: int | None
    loss: float | None
    first_step: int | None
    first_step_at: float | None
    last_step_at: float | None
    last_checkpoint_step: int | None
    exit_code: int | None
    error: str | None
    interruption_notice: bool
    awaiting_secrets: bool = False
    setup_s: float | None = None
    failed_phase: str | None = None  # "setup" | "command": the job's own failure
    restore_waiting: bool = False  # a standby workload asks for its restore target
    # "library", "dir" (GPUSCOUT_CHECKPOINT_DIR: steps are not seen), or None.
    checkpoint_mode: str | None = None
    # Checkpoints a restore skipped as corrupt or partial: (key, reason).
    skipped_checkpoints: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentHealth:
        return cls(
            state=AgentState(data["state"]), step=int(data.get("step") or 0),
            total_steps=data.get("total_steps"), loss=data.get("loss"),
            first_step=data.get("first_step"), first_step_at=data.get("first_step_at"),
            last_step_at=data.get("last_step_at"),
            last_checkpoint_step=data.get("last_checkpoint_step"),
            exit_code=data.get("exit_code"), error=data.get("error"),
            interruption_notice=bool(data.get("interruption_notice")),
            awaiting_secrets=bool(data.get("awaiting_secrets")),
            setup_s=data.get("setup_s"),
            failed_phase=data.get("failed_phase"),
            restore_waiting=bool(data.get("restore_waiting")),
            checkpoint_mode=data.get("checkpoint_mode"),
            skipped_checkpoints=tuple((str(c.get("key")), str(c.get("reason")))
                                      for c in data.get("skipped_checkpoints") or ()
                                      if isinstance(c, dict)),
        )


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    step: int
    key: str
    last_step_at: float | None


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
        return AgentHealth.from_json(self._call("GET", address, "/agent/health").json())

    def checkpoint(self, address: str, *, pause: bool, timeout_s: float) -> CheckpointResult:
        data = self._call(
            "POST", address, "/agent/checkpoint", json={"pause": pause, "timeout_s": timeout_s},
            timeout=timeout_s + 5,
        ).json()
        return CheckpointResult(step=int(data["step"]), key=str(data["key"]),
                                last_step_at=data.get("last_step_at"))

    def resume(self, address: str) -> None:
        self._call("POST", address, "/agent/resume")

    def restore(self, address: str, step: int | None) -> None:
        self._call("POST", address, "/agent/restore", json={"step": step})

    def send_secrets(self, address: str, secrets: dict[str, str]) -> None:
        self._call("POST", address, "/agent/secrets", json={"secrets": secrets})
