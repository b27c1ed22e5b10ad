"""In-memory agents, for tests of the controllers and of code above them
(the real agent is tested with real processes in tests/integration and
tests/e2e): the ``Agents`` protocol of controllers/agent_client.py, answered
in the agent's own wire messages (agent/protocol.py), as
``gpuscout.providers.fake`` stands in for a cloud.

Each agent completes one step per ``health`` call while running, so tests
advance training by polling, deterministically. Addresses name the kind of
instance: one containing "standby" starts in standby (a replacement), any
other runs at once (restoring the latest checkpoint, if any). Records
``calls`` ((verb, address), in order); ``reachable``, ``notice``,
``fail_restore`` and ``skipped`` script faults."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from gpuscout.agent.protocol import AgentState, CheckpointResult, Health, SkippedCheckpoint
from gpuscout.controllers.agent_client import AgentError
from gpuscout.providers.base import LaunchRequest


@dataclass
class FakeAgent:
    state: AgentState
    step: int = 0
    total_steps: int = 1000
    first_step: int | None = None
    first_step_at: float | None = None
    last_step_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    reachable: bool = True
    notice: bool = False
    skipped: tuple[tuple[str, str], ...] = ()  # checkpoints its restore skipped


def fake_address(request: LaunchRequest, n: int) -> str:
    """The address FakeProvider gives a launched instance, for FakeAgents
    (``FakeProvider(address_for=fake_address)``): in standby for a replacement."""
    return f"{'standby' if request.standby else 'run'}-{request.instance_id}"


class FakeAgents:
    def __init__(self) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self.clock = 1000.0  # fake agent-side time, seconds
        self.checkpoints: dict[int, str] = {}  # step -> key (the job's store)
        self.fail_restore: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.tokens: dict[str, str] = {}
        self.secrets_sent: dict[str, dict[str, str]] = {}
        self._lock = threading.RLock()

    def set_token(self, address: str, token: str) -> None:
        self.tokens[address] = token

    def agent(self, address: str) -> FakeAgent:
        with self._lock:
            if address not in self.agents:
                standby = "standby" in address
                self.agents[address] = FakeAgent(
                    state=AgentState.STANDBY if standby else AgentState.RUNNING)
                if not standby and self.checkpoints:
                    # A fresh (recovery) instance restores the latest checkpoint.
                    self.agents[address].step = max(self.checkpoints)
            return self.agents[address]

    def _advance(self, a: FakeAgent) -> None:
        if a.state in (AgentState.RUNNING, AgentState.RESTORING) and a.step < a.total_steps:
            self.clock += 0.1
            a.step += 1
            a.state = AgentState.RUNNING
            if a.first_step is None:
                a.first_step, a.first_step_at = a.step, self.clock
            a.last_step_at = self.clock
            if a.step >= a.total_steps:
                a.state = AgentState.COMPLETED
                a.exit_code = 0

    def health(self, address: str) -> Health:
        with self._lock:
            self.calls.append(("health", address))
            a = self.agent(address)
            if not a.reachable:
                raise AgentError(f"{address} unreachable")
            self._advance(a)
            return Health(
                state=a.state, step=a.step, total_steps=a.total_steps, loss=1.0 / (1 + a.step),
                first_step=a.first_step, first_step_at=a.first_step_at,
                last_step_at=a.last_step_at,
                last_checkpoint_step=max(self.checkpoints, default=None),
                exit_code=a.exit_code, error=a.error,
                interruption_notice="terminate" if a.notice else None,
                restore_waiting=a.state == AgentState.STANDBY,
                skipped_checkpoints=tuple(SkippedCheckpoint(key=k, reason=r)
                                          for k, r in a.skipped))

    def checkpoint(self, address: str, *, pause: bool, timeout_s: float) -> CheckpointResult:
        with self._lock:
            self.calls.append(("checkpoint", address))
            a = self.agent(address)
            if not a.reachable or a.state != AgentState.RUNNING:
                raise AgentError(f"{address} cannot checkpoint in state {a.state}")
            self._advance(a)  # the next step boundary
            key = f"jobs/j/checkpoints/{a.step:012d}-v"
            self.checkpoints[a.step] = key
            if pause:
                a.state = AgentState.PAUSED
            return CheckpointResult(step=a.step, key=key, last_step_at=a.last_step_at)

    def resume(self, address: str) -> None:
        with self._lock:
            self.calls.append(("resume", address))
            a = self.agent(address)
            if not a.reachable:
                raise AgentError(f"{address} unreachable")
            if a.state == AgentState.PAUSED:
                a.state = AgentState.RUNNING

    def restore(self, address: str, step: int | None) -> None:
        with self._lock:
            self.calls.append(("restore", address))
            a = self.agent(address)
            if address in self.fail_restore:
                a.state = AgentState.FAILED
                a.error = "checkpoint could not be restored"
                return
            a.step = step if step is not None else max(self.checkpoints, default=0)
            a.state = AgentState.RESTORING

    def send_secrets(self, address: str, secrets: dict[str, str]) -> None:
        with self._lock:
            self.calls.append(("secrets", address))
            self.secrets_sent[address] = dict(secrets)
