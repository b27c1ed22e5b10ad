"""The agent's configuration, read once from the environment of protocol.py."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from gpuscout.agent import protocol as p
from gpuscout.agent.core import PLAIN_MODE_AFTER_S

# Seconds between SIGTERM and SIGKILL when the job's command is stopped.
DEFAULT_STOP_GRACE_S = 10.0
# Agent-only variables that the job's command must not see (the token above
# all: the workload talks to the agent over loopback without one).
_AGENT_ONLY_ENV = (
    p.ENV_AGENT_HOST, p.ENV_AGENT_PORT, p.ENV_AGENT_TOKEN, p.ENV_COMMAND, p.ENV_STANDBY,
    p.ENV_WORKDIR, p.ENV_CONTROL_URL, p.ENV_WORKDIR_REF, p.ENV_SETUP, p.ENV_SECRET_NAMES,
    p.ENV_PLAIN_MODE_AFTER_S,
)


class ConfigError(ValueError):
    """A missing or malformed environment variable; the message names it."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    instance_id: str
    job_id: str
    host: str
    port: int  # 0: any free port (logged at start)
    token: str | None
    store_url: str
    command: str
    workdir: str
    standby: bool
    control_url: str | None = None
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    offer_id: str | None = None
    workdir_ref: str | None = None  # the packed project folder to unpack first
    setup: str | None = None
    secret_names: tuple[str, ...] = ()
    instance_dir: str | None = None  # where the job log's copy and the job's env go
    plain_mode_after_s: float = PLAIN_MODE_AFTER_S

    @property
    def checkpoint_dir(self) -> str:
        """GPUSCOUT_CHECKPOINT_DIR: in the instance's folder, else beside the
        working folder (a name the job's own files are unlikely to use)."""
        base = self.instance_dir or os.path.join(
            tempfile.gettempdir(), f"gpuscout-{self.instance_id}")
        return os.path.join(base, "checkpoint")

    @property
    def preparing(self) -> bool:
        """Whether anything runs before the command (SETUP state)."""
        return bool(self.workdir_ref or self.setup or self.secret_names)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentConfig:
        env = os.environ if environ is None else environ

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is required")
            return value

        port_text = env.get(p.ENV_AGENT_PORT, "8000").strip() or "8000"
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{p.ENV_AGENT_PORT} must be an integer, got {port_text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{p.ENV_AGENT_PORT} must be within 0..65535, got {port}")
        standby_text = env.get(p.ENV_STANDBY, "").strip().lower()
        if standby_text not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"{p.ENV_STANDBY} must be 1/0/true/false, got {standby_text!r}")
        plain_text = env.get(p.ENV_PLAIN_MODE_AFTER_S, "").strip()
        try:
            plain_after = float(plain_text) if plain_text else PLAIN_MODE_AFTER_S
        except ValueError:
            plain_after = -1.0
        if not 0 < plain_after < 3600:
            raise ConfigError(f"{p.ENV_PLAIN_MODE_AFTER_S} must be seconds in (0, 3600), "
                              f"got {plain_text!r}")
        workdir = env.get(p.ENV_WORKDIR, "").strip() or os.getcwd()
        if not os.path.isdir(workdir):
            raise ConfigError(f"{p.ENV_WORKDIR} is not a directory: {workdir}")
        return cls(
            instance_id=env.get(p.ENV_INSTANCE_ID, "").strip() or socket.gethostname(),
            job_id=required(p.ENV_JOB_ID),
            host=env.get(p.ENV_AGENT_HOST, "").strip() or "127.0.0.1",
            port=port,
            token=env.get(p.ENV_AGENT_TOKEN, "").strip() or None,
            store_url=required(p.ENV_STORE_URL),
            command=required(p.ENV_COMMAND),
            workdir=workdir,
            standby=standby_text in ("1", "true", "yes"),
            control_url=env.get(p.ENV_CONTROL_URL, "").strip() or None,
            offer_id=env.get(p.ENV_OFFER_ID, "").strip() or None,
            workdir_ref=env.get(p.ENV_WORKDIR_REF, "").strip() or None,
            setup=env.get(p.ENV_SETUP, "").strip() or None,
            secret_names=tuple(n for n in env.get(p.ENV_SECRET_NAMES, "").split(",")
                               if n.strip()),
            instance_dir=env.get(p.ENV_INSTANCE_DIR, "").strip() or None,
            plain_mode_after_s=plain_after,
        )

    def workload_env(
        self, base: Mapping[str, str], *, agent_url: str, workload_port: int
    ) -> dict[str, str]:
        """The environment of the job's setup and command: ``base`` (the
        agent's own environment, which holds the job's ``envs``) without the
        agent-only variables, plus protocol.py's agent -> workload variables,
        with the Python environment the agent runs in first on ``PATH``, so
        ``python``, ``python3`` and ``pip`` are the ones that import gpuscout,
        whatever the shell that started the control plane had on its PATH."""
        env = {k: v for k, v in base.items() if k not in _AGENT_ONLY_ENV}
        bin_dir = os.path.dirname(sys.executable)
        rest = [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d and d != bin_dir]
        env["PATH"] = os.pathsep.join([bin_dir, *rest])
        if sys.prefix != sys.base_prefix:  # a venv, as its bin/activate would say
            env["VIRTUAL_ENV"] = sys.prefix
        if self.offer_id:
            env[p.ENV_OFFER_ID] = self.offer_id
        env.update({
            p.ENV_AGENT_URL: agent_url,
            p.ENV_WORKLOAD_PORT: str(workload_port),
            p.ENV_STORE_URL: self.store_url,
            p.ENV_JOB_ID: self.job_id,
            p.ENV_INSTANCE_ID: self.instance_id,
            p.ENV_CHECKPOINT_PREFIX: p.checkpoint_prefix(self.job_id),
            p.ENV_ARTIFACTS_PREFIX: p.artifacts_prefix(self.job_id),
            p.ENV_CHECKPOINT_DIR: self.checkpoint_dir,
        })
        return env
