"""The agent's HTTP server: protocol.py's /agent/* and /workload/* endpoints,
and a reverse proxy to the workload's own server for every other path.

Concurrency model: one asyncio loop, async handlers only. The status is
changed only through the pure functions of ``core`` (``Agent.apply``), each
change wakes every waiter (``asyncio.Condition``), and long polls wait on
that condition with a timeout, so they never block another request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import uvicorn
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from gpuscout import workdir
from gpuscout.agent import ckptdir, core, imds, jobenv
from gpuscout.agent.config import AgentConfig
from gpuscout.agent.protocol import (
    AGENT_PREFIX,
    WORKLOAD_PREFIX,
    ActionAnswer,
    AgentState,
    CheckpointedReport,
    CheckpointRequest,
    CheckpointResult,
    ProgressReport,
    RestoreRequest,
    RestoreTarget,
    SecretsRequest,
    SkippedReport,
    checkpoint_mode_key,
    checkpoint_prefix,
)
from gpuscout.agent.supervisor import Supervisor
from gpuscout.joblog import LogShipper
from gpuscout.routing.forward import relay, request_headers
from gpuscout.store import open_store
from gpuscout.store.base import ObjectStore
from gpuscout.workload.checkpoint import CheckpointStore

log = logging.getLogger("gpuscout.agent")

T = TypeVar("T")

# How long the workload's long polls are held before "ask again" (204).
DEFAULT_LONG_POLL_S = 25.0
MAX_LONG_POLL_S = 300.0
# Forwarding to the workload's server: connecting is loopback, so a slow
# connect means it is not up; a slow answer is the workload's business.
FORWARD_TIMEOUT = httpx.Timeout(60.0, connect=2.0, pool=5.0)


# How long a finished process's pipes are read after it exits (a process
# that left its group may hold them open).
PIPE_DRAIN_S = 5.0
# The instance's own copy of the job's log, in its folder.
JOB_LOG_FILE = "job.log"
# The job's own Python environment (agent/jobenv.py), in the instance's folder.
JOB_ENV_DIR = "jobenv"
# How often a folder job's GPUSCOUT_CHECKPOINT_DIR is looked at for a new STEP.
SAVE_POLL_S = 0.2


def error(status_code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status_code)


class Agent:
    """The running agent: its status, the child process, the forwarding client,
    and the job's log (``shipper``: setup and command output, line by line,
    shipped to the store)."""

    def __init__(self, config: AgentConfig, supervisor: Supervisor, workload_port: int,
                 shipper: LogShipper, store: ObjectStore | None = None) -> None:
        self.config = config
        self.supervisor = supervisor
        self.workload_port = workload_port
        self.shipper = shipper
        self.store = store
        self.status = core.initial(config.instance_id, config.job_id, standby=config.standby,
                                   preparing=config.preparing,
                                   awaiting_secrets=bool(config.secret_names))
        # The process running now: the setup, then the command.
        self.current: Supervisor | None = None
        self.secrets: dict[str, str] = {}
        # A folder job's saves (gpuscout.agent.ckptdir): the folder, where
        # its copies are staged, and the job's checkpoints.
        self.ckpt_dir = Path(config.checkpoint_dir)
        self.checkpoints = (CheckpointStore(store, checkpoint_prefix(config.job_id))
                            if store is not None else None)
        self.marker = (ckptdir.ModeMarker(store, checkpoint_mode_key(config.job_id))
                       if store is not None else None)
        self.mode_recorded: str | None = None  # what the store says
        self._stderr_before = 0
        self.closing = False
        self._cond = asyncio.Condition()
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{workload_port}", timeout=FORWARD_TIMEOUT
        )

    async def apply(self, change: Callable[[core.AgentStatus], tuple[core.AgentStatus, T]]) -> T:
        """Apply one pure transition and wake every waiter."""
        async with self._cond:
            before = self.status
            self.status, result = change(before)
            if self.status.state is not before.state:
                log.info("state %s -> %s (step %s)", before.state.value,
                         self.status.state.value, self.status.step)
            self._cond.notify_all()
        return result

    async def update(self, change: Callable[[core.AgentStatus], core.AgentStatus]) -> None:
        await self.apply(lambda s: (change(s), None))

    async def wait_until(self, ready: Callable[[core.AgentStatus], bool], timeout: float) -> bool:
        """Wait until ``ready(status)`` or the agent closes; False on timeout."""
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self.closing or ready(self.status)), timeout
                )
            except TimeoutError:
                return False
        return ready(self.status)

    async def close(self) -> None:
        """Wake every long poll so the server can shut down."""
        async with self._cond:
            self.closing = True
            self._cond.notify_all()

    # --- the job's processes ------------------------------------------------

    def log_line(self, text: str) -> None:
        """A line of the job's log written by the agent itself (a marker)."""
        self.shipper.add(text, source="agent")

    async def run_process(self, supervisor: Supervisor) -> int:
        """Start ``supervisor``'s process, log its output, and return its exit
        code once its output is read and the log flushed. Raises OSError if it
        cannot start."""
        self.current = supervisor
        self._stderr_before = self.shipper.lines_added("stderr")
        await supervisor.start()
        pumps = [asyncio.ensure_future(self.shipper.pump(stream, source=source))
                 for stream, source in ((supervisor.stdout, "stdout"),
                                        (supervisor.stderr, "stderr")) if stream is not None]
        code = await supervisor.wait()
        # The group is killed when the leader exits, so the pipes close; a
        # process that escaped the group may hold them: don't wait for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps), PIPE_DRAIN_S)
        for pump in pumps:
            pump.cancel()
        await self.shipper.flush()
        return code

    def stderr_tail(self) -> list[str]:
        """The last stderr lines of the process run last (secrets masked)."""
        count = self.shipper.lines_added("stderr") - self._stderr_before
        return self.shipper.tail_lines(min(count, core.ERROR_TAIL_LINES), "stderr")

    async def prepare(self) -> bool:
        """SETUP: wait for the job's secrets, unpack its workdir, run its
        setup, then STANDBY or STARTING. False when the job cannot start
        (the status says why) or the agent is closing."""
        config = self.config
        if config.instance_dir:
            try:
                bin_dir = await asyncio.to_thread(jobenv.make_job_env,
                                                  Path(config.instance_dir) / JOB_ENV_DIR)
            except OSError as exc:  # the agent's own environment will do
                log.warning("no environment of the job's own (%s): using the agent's", exc)
            else:
                self.supervisor.env = jobenv.job_env_vars(self.supervisor.env, bin_dir)
        if config.secret_names:
            async with self._cond:
                await self._cond.wait_for(
                    lambda: self.closing or self.status.stopping
                    or not self.status.awaiting_secrets)
            if self.closing or self.status.stopping:
                return False
            self.supervisor.env.update(self.secrets)
        if config.workdir_ref:
            try:
                assert self.store is not None
                files = await asyncio.to_thread(
                    workdir.fetch_and_unpack, self.store, config.workdir_ref,
                    Path(config.workdir))
            except Exception as exc:
                message = f"could not unpack the job's workdir {config.workdir_ref}: {exc}"
                log.error("%s", message)
                self.log_line(f"-- {message} --")
                await self.update(lambda s: core.on_setup_failed(s, message))
                return False
            log.info("workdir %s unpacked: %d files", config.workdir_ref, files)
        setup_s: float | None = None
        if config.setup and not (self.closing or self.status.stopping):
            self.log_line("-- setup --")
            setup = Supervisor(config.setup, workdir=config.workdir, env=self.supervisor.env,
                               grace_s=config.stop_grace_s, capture=True)
            started = time.monotonic()
            try:
                code = await self.run_process(setup)
            except OSError as exc:
                reason = f"setup could not start: {exc}"
                await self.update(lambda s: core.on_setup_failed(s, reason))
                return False
            setup_s = time.monotonic() - started
            if code != 0:
                reason = core.exit_reason("setup", code, self.stderr_tail())
                self.log_line(f"-- setup failed (exit code {code}) after {setup_s:.1f} s --")
                await self.update(lambda s: core.on_setup_failed(s, reason, setup_s, code))
                return False
            self.log_line(f"-- setup done in {setup_s:.1f} s --")
        mode = self.mode_recorded = await self.read_mode()
        await self.update(lambda s: core.prepared(core.known_mode(s, mode), setup_s))
        return not self.closing

    # --- how the job checkpoints: gpuscout.workload, or the folder ------------

    async def read_mode(self) -> str | None:
        """The checkpoint mode an earlier instance recorded for the job."""
        if self.marker is None:
            return None
        try:
            return await asyncio.to_thread(self.marker.read)
        except Exception as exc:  # the store failing: the safe default
            log.warning("cannot read the job's checkpoint mode: %s", exc)
            return None

    async def set_mode(self, change: Callable[[core.AgentStatus], core.AgentStatus]) -> None:
        """Apply a change that may settle the mode; record a new one."""
        await self.update(change)
        mode = self.status.checkpoint_mode
        if mode is not None and mode != self.mode_recorded and self.marker is not None:
            self.mode_recorded = mode
            log.info("the job checkpoints through %s", "gpuscout.workload"
                     if mode == core.LIBRARY else "GPUSCOUT_CHECKPOINT_DIR")
            try:
                await asyncio.to_thread(self.marker.write, mode)
            except Exception as exc:
                log.warning("cannot record the job's checkpoint mode: %s", exc)

    async def run_command(self) -> None:
        """Start the job's command once prepared, and run it to its end.

        A library job starts at once (a replacement's workload then waits in
        standby for its restore target). A job that is not known to be one
        gets the checkpoint folder filled first: a replacement waits in
        standby (ready: nothing more to load) for /agent/restore, then
        restores that step; a fresh start restores the newest checkpoint,
        if there is one.
        """
        restored: int | None = None
        if self.status.checkpoint_mode != core.LIBRARY:
            if self.status.standby:
                await self.update(core.workload_waits)
                async with self._cond:
                    await self._cond.wait_for(
                        lambda: self.closing or self.status.stopping
                        or self.status.state is not AgentState.STANDBY)
                if self.closing or self.status.stopping:
                    return
                mode = self.mode_recorded = await self.read_mode()  # the old one may know
                await self.update(lambda s: core.known_mode(s, mode))
            if self.status.checkpoint_mode != core.LIBRARY:
                step = self.status.restore_step if self.status.standby else None
                try:
                    restored = await self.restore_dir(step)
                except Exception as exc:
                    which = "newest checkpoint" if step is None else f"checkpoint of step {step}"
                    reason = f"could not restore the {which} into GPUSCOUT_CHECKPOINT_DIR: {exc}"
                    if step is not None or self.status.checkpoint_mode == core.DIR:
                        log.error("%s", reason)
                        await self.update(lambda s: core.on_start_failed(s, reason))
                        return
                    # Not known to be a folder job, and the store cannot be
                    # read (a job that never uses it has no credentials for
                    # it): start it as it is; it meets the store its own way.
                    log.warning("%s; starting the command without it", reason)
                    self.log_line(f"-- {reason}; the command starts on an empty folder --")
        while True:
            await self.watch_child(restored)
            # A folder job that exited on SIGUSR1 is PAUSED on its last save.
            # A resume (a move rolled back) starts it again on the folder.
            if not (self.status.state is AgentState.PAUSED
                    and self.status.checkpoint_mode == core.DIR):
                return
            async with self._cond:
                await self._cond.wait_for(
                    lambda: self.closing or self.status.stopping or self.status.resume_pending)
            if self.closing or self.status.stopping:
                return
            await self.update(core.resume)
            old = self.supervisor
            self.supervisor = Supervisor(old.command, workdir=old.workdir, env=old.env,
                                         grace_s=old.grace_s, capture=True)
            save = ckptdir.read_step(self.ckpt_dir)
            restored = save.step if save is not None else None
            self.log_line("-- resumed on this instance: the command starts again on "
                          "its last save --")

    async def restore_dir(self, step: int | None) -> int | None:
        """Fill the checkpoint folder with ``step`` (None: the newest); the
        step restored, or None (nothing to restore)."""
        assert self.checkpoints is not None
        started = time.monotonic()
        checkpoints = self.checkpoints
        try:
            info = await asyncio.to_thread(ckptdir.restore, checkpoints, step, self.ckpt_dir)
        finally:
            skipped = [(exc.key, exc.reason) for exc in checkpoints.take_skipped()]
            await self.update(lambda s: core.on_skipped(s, skipped))
        if info is None:
            return None
        self.log_line(f"-- restored the checkpoint of step {info.step} into "
                      f"GPUSCOUT_CHECKPOINT_DIR in {time.monotonic() - started:.1f} s --")
        return info.step

    async def watch_child(self, restored: int | None = None) -> None:
        """Run the job's command to its end, uploading what it saves into
        the checkpoint folder (``restored``: the step the folder holds)."""
        saves = SaveWatcher(self, restored)
        watcher = asyncio.ensure_future(saves.watch())
        try:
            code = await self.run_process(self.supervisor)
        except OSError as exc:
            reason = str(exc)
            log.error("the command could not start: %s", reason)
            await self.update(lambda s: core.on_start_failed(s, reason))
            return
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await saves.finish()  # its last save, before its exit is judged
        tail = self.stderr_tail()
        await self.update(lambda s: core.on_exit(s, code, tail))

    async def stop_child(self) -> None:
        await self.update(core.begin_stop)  # also wakes a wait for secrets
        if self.current is not None:
            await self.current.stop()


class SaveWatcher:
    """A folder job's saves while its command runs (gpuscout.agent.ckptdir):
    each new STEP is copied aside and uploaded in the background, one at a
    time (a newer save waits for the upload before; one overtaken meanwhile
    is skipped); SIGUSR1 goes to the command when a checkpoint is asked."""

    def __init__(self, agent: Agent, restored: int | None) -> None:
        self.agent = agent
        self.started = time.monotonic()
        self.seen = ckptdir.read_step(agent.ckpt_dir)  # what the folder held at start
        self.upload: asyncio.Task[None] | None = None
        self.restored = restored

    async def watch(self) -> None:
        agent = self.agent
        while agent.supervisor.pid is None:
            await asyncio.sleep(0.01)
        if agent.status.checkpoint_mode == core.DIR:
            await agent.update(lambda s: core.dir_started(s, self.restored, time.time()))
        while not agent.closing:
            await agent.wait_until(core.wants_signal, SAVE_POLL_S)
            status = agent.status
            if status.checkpoint_mode is None and (
                    time.monotonic() - self.started >= agent.config.plain_mode_after_s):
                await agent.set_mode(core.plain_mode)
            if core.wants_signal(agent.status):
                self.signal()
                await agent.update(functools.partial(core.signalled, at=time.time()))
            self.poll()

    def signal(self) -> None:
        pid = self.agent.supervisor.pid
        if pid is None:
            return
        target = ckptdir.main_process(pid)
        self.agent.log_line(f"-- SIGUSR1 to process {target}: save into "
                            "GPUSCOUT_CHECKPOINT_DIR at the next step boundary and exit --")
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGUSR1)

    def poll(self) -> None:
        """Start uploading a new save, unless one is still uploading."""
        if self.agent.status.checkpoint_mode == core.LIBRARY:
            return
        if self.upload is not None and not self.upload.done():
            return
        save = ckptdir.read_step(self.agent.ckpt_dir)
        if save is None or save == self.seen:
            return
        self.seen = save
        self.upload = asyncio.ensure_future(self.save(save))

    async def finish(self) -> None:
        """After the command exited: the upload under way, then its last save."""
        if self.upload is not None:
            await self.upload
        self.poll()
        if self.upload is not None:
            await self.upload

    async def save(self, save: ckptdir.Save) -> None:
        agent = self.agent
        if agent.checkpoints is None or agent.status.state is AgentState.PAUSED:
            return  # fenced: the job paused on an earlier save
        staging = Path(agent.config.checkpoint_dir + "-staging") / uuid.uuid4().hex[:12]
        started = time.monotonic()
        try:
            staging.mkdir(parents=True)
            files = await asyncio.to_thread(ckptdir.snapshot, agent.ckpt_dir, staging, save)
            if files is None:
                log.info("save of step %d changed while copied: taking the next", save.step)
                self.seen = None
                return
            info = await asyncio.to_thread(agent.checkpoints.save_paths, save.step, files)
        except Exception as exc:  # the store or the disk failing: the next save retries
            log.warning("checkpoint of step %d from GPUSCOUT_CHECKPOINT_DIR failed: %s",
                        save.step, exc)
            return
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        counted = await agent.apply(
            lambda s: core.on_saved(s, step=save.step, key=info.key, at=save.at))
        if not counted:
            log.info("save of step %d came after the pause: discarded", save.step)
            await asyncio.to_thread(agent.checkpoints.discard, info)
            return
        await agent.set_mode(lambda s: s)  # records the mode on_saved settled
        log.info("checkpoint of step %d from GPUSCOUT_CHECKPOINT_DIR: %s (%.2f s)",
                 save.step, info.key, time.monotonic() - started)


# --- request bodies --------------------------------------------------------


# --- the app ---------------------------------------------------------------


def create_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="GPU Scout agent", docs_url=None, redoc_url=None, openapi_url=None)

    def require_token(request: Request) -> None:
        """Calls that change state need the bearer token when one is set."""
        token = agent.config.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise _Unauthorized()

    def require_loopback(request: Request) -> None:
        """/workload/* is for the job's own process on this machine only."""
        host = request.client.host if request.client else ""
        if not _is_loopback(host):
            raise _Forbidden()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: Exception) -> JSONResponse:
        response = error(401, "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_Forbidden)
    async def _forbidden(_: Request, __: Exception) -> JSONResponse:
        return error(403, "workload endpoints answer loopback clients only")

    async def workload_call() -> None:
        await agent.set_mode(core.on_workload_call)

    authorized = [Depends(require_token)]
    loopback = [Depends(require_loopback), Depends(workload_call)]

    @app.get(f"{AGENT_PREFIX}/health")
    async def health() -> dict[str, Any]:
        return agent.status.health().model_dump(mode="json")

    @app.post(f"{AGENT_PREFIX}/checkpoint", dependencies=authorized)
    async def checkpoint(body: CheckpointRequest | None = None) -> Response:
        body = body or CheckpointRequest()
        started = time.monotonic()
        decision = await agent.apply(lambda s: core.request_checkpoint(s, pause=body.pause))
        if isinstance(decision, core.Refusal):
            return error(409, decision.message)
        if isinstance(decision, CheckpointResult):
            return JSONResponse(decision.model_dump(mode="json"))
        request = decision
        await agent.wait_until(
            lambda s: core.checkpoint_outcome(s, request) is not None, body.timeout_s
        )
        outcome = core.checkpoint_outcome(agent.status, request)
        if outcome is None:
            await agent.update(lambda s: core.withdraw_checkpoint(s, request.id))
            return error(504, f"no checkpoint within {body.timeout_s} s",
                         step=agent.status.step)
        if isinstance(outcome, core.Refusal):
            return error(409, outcome.message)
        log.info("checkpoint at step %d answered in %.3f s (pause=%s)",
                 outcome.step, time.monotonic() - started, body.pause)
        return JSONResponse(outcome.model_dump(mode="json"))

    @app.post(f"{AGENT_PREFIX}/secrets", dependencies=authorized)
    async def secrets(body: SecretsRequest) -> Response:
        missing = sorted(set(agent.config.secret_names) - set(body.secrets))
        if missing:
            return error(422, f"secrets missing: {', '.join(missing)}")
        if agent.status.awaiting_secrets:
            agent.secrets = dict(body.secrets)
            agent.shipper.redact(agent.secrets.values())
            await agent.update(core.secrets_received)
            log.info("received %d secret(s)", len(body.secrets))
        return JSONResponse({"state": agent.status.state.value})

    @app.post(f"{AGENT_PREFIX}/resume", dependencies=authorized)
    async def resume() -> dict[str, Any]:
        await agent.update(core.resume)
        return {"state": agent.status.state.value}

    @app.post(f"{AGENT_PREFIX}/restore", dependencies=authorized, status_code=202)
    async def restore(body: RestoreRequest | None = None) -> Response:
        step = (body or RestoreRequest()).step
        refusal = await agent.apply(lambda s: core.request_restore(s, step))
        if refusal is not None:
            return error(409, refusal.message)
        log.info("restore released (step %s)", "latest" if step is None else step)
        return JSONResponse({"state": agent.status.state.value, "step": step}, status_code=202)

    @app.post(f"{AGENT_PREFIX}/stop", dependencies=authorized, status_code=202)
    async def stop() -> Response:
        _background(agent.stop_child())
        return JSONResponse({"state": agent.status.state.value}, status_code=202)

    @app.get(f"{WORKLOAD_PREFIX}/restore-target", dependencies=loopback)
    async def restore_target(
        timeout_s: Annotated[float, Query(gt=0, le=MAX_LONG_POLL_S)] = DEFAULT_LONG_POLL_S,
    ) -> Response:
        await agent.update(core.workload_waits)
        if not await agent.wait_until(core.restore_released, timeout_s):
            return Response(status_code=204)  # still in standby: ask again
        return JSONResponse(RestoreTarget(step=agent.status.restore_step).model_dump())

    @app.post(f"{WORKLOAD_PREFIX}/progress", dependencies=loopback)
    async def progress(body: ProgressReport) -> dict[str, str]:
        at = body.time if body.time is not None else time.time()
        action = await agent.apply(lambda s: core.on_progress(
            s, step=body.step, loss=body.loss, total_steps=body.total_steps, at=at))
        return ActionAnswer(action=action).model_dump(mode="json")

    @app.post(f"{WORKLOAD_PREFIX}/checkpointed", dependencies=loopback)
    async def checkpointed(body: CheckpointedReport) -> dict[str, str]:
        action = await agent.apply(lambda s: core.on_checkpointed(
            s, step=body.step, key=body.key, periodic=body.periodic))
        return ActionAnswer(action=action).model_dump(mode="json")

    @app.post(f"{WORKLOAD_PREFIX}/skipped", dependencies=loopback)
    async def skipped(body: SkippedReport) -> dict[str, int]:
        items = [(c.key, c.reason) for c in body.checkpoints]
        await agent.update(lambda s: core.on_skipped(s, items))
        return {"recorded": len(agent.status.skipped_checkpoints)}

    @app.get(f"{WORKLOAD_PREFIX}/wait-resume", dependencies=loopback)
    async def wait_resume(
        timeout_s: Annotated[float, Query(gt=0, le=MAX_LONG_POLL_S)] = DEFAULT_LONG_POLL_S,
    ) -> Response:
        if not await agent.wait_until(core.resume_released, timeout_s):
            return Response(status_code=204)  # still paused: ask again
        return JSONResponse({"resumed": True})

    @app.api_route(
        "/{path:path}",
        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        include_in_schema=False,
    )
    async def forward(request: Request, path: str) -> Response:
        if _is_reserved(request.url.path):
            return error(404, f"no such endpoint: {request.method} {request.url.path}")
        return await _forward(agent, request)

    return app


class _Unauthorized(Exception):
    pass


class _Forbidden(Exception):
    pass


def _is_reserved(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/")
               for prefix in (AGENT_PREFIX, WORKLOAD_PREFIX))


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def _forward(agent: Agent, request: Request) -> Response:
    """Forward to the workload's server, streaming the answer back.

    The request body is read whole (the workload's endpoints take small JSON
    bodies, and its stdlib server needs a Content-Length); the response is
    streamed, so a large or slow answer is not buffered here.
    """
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    target = raw_path.decode("latin-1")
    if request.url.query:
        target += "?" + request.url.query
    upstream = agent.client.build_request(
        request.method, target, headers=request_headers(request.headers.raw),
        content=await request.body())

    def failed(err: httpx.HTTPError) -> Response:
        if isinstance(err, httpx.ConnectError):
            return error(503, "the workload's server is not up", state=agent.status.state.value)
        if isinstance(err, httpx.TimeoutException):
            return error(504, "the workload's server did not answer in time")
        return error(502, f"forwarding to the workload failed: {err}")

    return await relay(agent.client, upstream, on_error=failed, extra_headers=[
        (b"x-gpuscout-instance-id", agent.config.instance_id.encode())])


_background_tasks: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    """Run ``coro`` without awaiting it, keeping a reference until it ends."""
    task = asyncio.ensure_future(coro)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


# --- sockets and the main loop ---------------------------------------------


def bind_sockets(host: str, port: int) -> tuple[list[socket.socket], int, str]:
    """Listen on ``host:port``; return the sockets, the port, and the loopback
    URL under which the workload reaches the agent.

    When ``host`` is one specific non-loopback address, 127.0.0.1 on the
    same port is bound too, because the workload talks to the agent over
    loopback whatever address the control plane uses.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    main = socket.socket(family, kind, proto)
    main.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        main.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    main.bind(address)
    bound_port = main.getsockname()[1]
    sockets = [main]
    ip = ipaddress.ip_address(address[0])
    if ip.is_loopback and ip.version == 6:
        return sockets, bound_port, f"http://[::1]:{bound_port}"
    if not (ip.is_loopback or ip.is_unspecified):
        extra = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        extra.bind(("127.0.0.1", bound_port))
        sockets.append(extra)
    return sockets, bound_port, f"http://127.0.0.1:{bound_port}"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the agent stops the job first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _watch_spot_notices(agent: Agent) -> asyncio.Task[imds.SpotNotice] | None:
    """On EC2 (the user-data names the metadata endpoint), poll IMDSv2 for a
    spot reclaim notice; elsewhere there is nothing to watch."""
    endpoint = imds.imds_endpoint_from_env()
    if endpoint is None:
        return None

    async def on_notice(notice: imds.SpotNotice) -> None:
        await agent.update(lambda s: core.on_interruption(s, notice.describe()))

    return asyncio.create_task(imds.watch_spot_interruption(endpoint, on_notice))


async def run_agent(config: AgentConfig) -> int:
    """Serve until SIGTERM/SIGINT; stop the job's command before exiting.

    Returns the process exit code (0 after an orderly stop).
    """
    sockets, port, agent_url = bind_sockets(config.host, config.port)
    workload_port = free_loopback_port()
    env = config.workload_env(os.environ, agent_url=agent_url, workload_port=workload_port)
    supervisor = Supervisor(
        config.command, workdir=config.workdir, env=env, grace_s=config.stop_grace_s,
        capture=True,
    )
    store = open_store(config.store_url)
    shipper = LogShipper(store, config.job_id, config.instance_id,
                         local_path=(Path(config.instance_dir) / JOB_LOG_FILE
                                     if config.instance_dir else None))
    agent = Agent(config, supervisor, workload_port, shipper, store)
    server = _Server(uvicorn.Config(
        create_app(agent), log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=2,
    ))

    loop = asyncio.get_running_loop()
    signals_seen = 0

    async def shut_down() -> None:
        await agent.stop_child()
        await agent.close()
        server.should_exit = True

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: stopping the job, then the agent", sig.name)
            _background(shut_down())
        else:  # asked twice: do not wait for the grace period
            log.warning("%s again: killing the job now", sig.name)
            _background(supervisor.kill())
            server.force_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    serving = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if serving.done():
        await serving  # re-raises what kept the server from starting
        return 1
    log.info("agent %s (job %s) listening on %s:%d%s", config.instance_id, config.job_id,
             config.host, port, " in standby" if config.standby else "")

    spot_watch = _watch_spot_notices(agent)

    async def prepare_and_run() -> None:
        if not await agent.prepare():
            return
        if agent.closing or server.should_exit or agent.status.stopping:
            return
        await agent.run_command()

    watcher: asyncio.Task[None] | None = None
    if agent.closing or server.should_exit:
        pass  # a signal came while the server started: never start the job
    else:
        watcher = asyncio.create_task(prepare_and_run())
    try:
        await serving
    finally:
        if spot_watch is not None:
            spot_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await spot_watch
        await agent.stop_child()
        if watcher is not None:
            await watcher
        await shipper.close()
        await agent.client.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("agent stopped")
    return 0
