"""Runs the job's command as a child process and stops it on request.

Contract:
- ``start`` runs ``bash -c COMMAND`` in ``workdir`` with exactly ``env``, as
  the leader of a new session (hence of its own process group), so that a
  stop reaches everything the command started (pipelines, background jobs)
  and a signal meant for the agent does not reach the job by accident.
- ``wait`` returns the exit code (negative: killed by that signal).
- ``stop`` is idempotent: SIGTERM to the group, SIGKILL to the group after
  ``grace_s``; it returns once the leader has exited. When the leader exits
  on its own, whatever it left behind in its group is killed too, so no
  process of the job outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping

log = logging.getLogger("gpuscout.agent.supervisor")


class Supervisor:
    def __init__(
        self, command: str, *, workdir: str, env: Mapping[str, str], grace_s: float,
        capture: bool = False,
    ) -> None:
        self.command = command
        self.workdir = workdir
        self.env = dict(env)
        self.grace_s = grace_s
        # With capture, stdout and stderr are pipes (``stdout``/``stderr``)
        # the caller must read to the end; else they are inherited.
        self.capture = capture
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_code: int | None = None
        self._stop_task: asyncio.Task[int | None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        return self._proc.stdout if self._proc is not None else None

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        return self._proc.stderr if self._proc is not None else None

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    async def start(self) -> int:
        """Start the command; return its pid. Raises OSError if it cannot start."""
        if self._proc is not None:
            raise RuntimeError("the command was started already")
        self._proc = await asyncio.create_subprocess_exec(
            "bash", "-c", self.command,
            cwd=self.workdir,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if self.capture else None,
            stderr=asyncio.subprocess.PIPE if self.capture else None,
            # A line longer than this is read in pieces (gpuscout.joblog).
            limit=1024 * 1024,
            start_new_session=True,
        )
        log.info("started command (pid %d): %s", self._proc.pid, self.command)
        return self._proc.pid

    async def wait(self) -> int:
        if self._proc is None:
            raise RuntimeError("the command was not started")
        code = await self._proc.wait()
        if self._exit_code is None:
            self._exit_code = code
            # Leftovers of the job (a background `&`, a daemonised helper)
            # would outlive it and nobody would stop them: kill the group now.
            self._signal_group(signal.SIGKILL)
            log.info("command exited with code %d", code)
        return code

    async def stop(self) -> int | None:
        """Stop the command (SIGTERM, then SIGKILL after the grace period).

        Concurrent and repeated calls share one stop. Returns the exit code,
        or None if the command was never started.
        """
        if self._proc is None:
            return None
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        return await asyncio.shield(self._stop_task)

    async def kill(self) -> None:
        """SIGKILL the group at once (a second SIGTERM to the agent)."""
        self._signal_group(signal.SIGKILL)

    async def _stop(self) -> int | None:
        assert self._proc is not None
        if self._proc.returncode is None:
            log.info("stopping command (pid %d): SIGTERM", self._proc.pid)
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), self.grace_s)
            except TimeoutError:
                log.warning("command ignored SIGTERM for %.1f s: SIGKILL", self.grace_s)
                self._signal_group(signal.SIGKILL)
        return await self.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        # The leader's pid is the group id (new session). After the leader is
        # reaped the group lives on while any member does; ESRCH means none.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
