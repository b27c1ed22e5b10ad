"""What a training script calls: restore, report each step, checkpoint,
save artifacts, serve its endpoints. The same script runs with or without
the control plane.

Under an agent (``GPUSCOUT_AGENT_URL`` set, see ``gpuscout.agent.protocol``)
every completed step is reported with one keep-alive POST on loopback, and
the agent's answer decides whether to checkpoint now or pause. Standalone,
checkpoints go to ``GPUSCOUT_STORE_URL`` if set, else to the file store
``<default_dir>/.checkpoints``, and artifacts into ``default_dir``; a
standalone run started again in the same folder resumes where the last one
checkpointed.

A checkpoint is one of two kinds, chosen per ``step_done`` call:

- a JSON state (``state=``, read back with ``restore()``): a JSON object
  saved as ``state.json`` with Python's shortest round-trip float repr, so
  floats come back bit for bit; numpy arrays and scalars are accepted
  (anything with ``tolist()``) and come back as lists and Python floats.
- a folder of files (``files=``, read back with ``restore_dir()``): a
  function writes the step's files (torch.save, safetensors, anything) into
  a fresh local staging folder, which is streamed into the store file by
  file (``CheckpointStore.save_paths``, never a whole file in memory) and
  deleted. Restoring streams the files back into a local folder, each
  checked against the manifest before any lands (``load_to_dir``).

Giving both ``state=`` and ``files=`` at once is refused (ValueError): a
checkpoint is read back by exactly one of ``restore()``/``restore_dir()``.
A script that wants JSON beside its files writes it into the folder (see
``gpuscout.workload.torch``). Local staging and restored folders live under
``<default_dir>/.gpuscout-work`` and are deleted when no longer needed
(a staging folder after its upload, the restored folder at ``close()`` or
the next ``restore_dir()``; what a killed process left behind, by the next
run in that folder).

Periodic checkpoints (every ``checkpoint_every`` steps) do not stop
training for their upload, as in CheckFreq (Mohan et al., FAST '21): the
state is *staged* synchronously, at the step boundary (the JSON encoded to
bytes, or the ``files=`` function writing its folder), then uploaded,
hashed and reported to the agent in a background thread while the next
steps run. At most one upload is in flight: when the next periodic
checkpoint is due before the previous upload finished, ``step_done`` waits
for it, then stages the new one (so at most two states exist at once: the
model's and one staged copy). A checkpoint the agent asks for (a move, a
spot notice) stays synchronous: it waits for the upload in flight, saves
this step's state, and is reported before the next step runs, because it
must hold every step completed when it was asked for. A background upload
is reported with ``periodic=True``: the agent records it as the latest
checkpoint but does not answer its pending requests with it (training went
on meanwhile). ``last_checkpoint`` changes when an upload completes;
``flush()`` waits for it, and ``close()``, ``restore()``,
``restore_dir()``, ``checkpoint()`` and ``checkpoint_files()`` flush
first. The upload thread is not a daemon: a script that exits without
``close()`` still finishes its last periodic upload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from gpuscout.agent import protocol as p
from gpuscout.agent.protocol import ProgressAction
from gpuscout.store import ObjectStore, check_key, open_store
from gpuscout.workload.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    NoCheckpoint,
)

log = logging.getLogger("gpuscout.workload")

STATE_FILE = "state.json"
STANDALONE_CHECKPOINT_DIR = ".checkpoints"
STANDALONE_CHECKPOINT_PREFIX = "checkpoints"
# Local folders of file checkpoints (staging before upload, restored ones),
# under the run's default_dir.
WORK_DIR = ".gpuscout-work"
# A workload whose agent is gone is unsupervised: nobody can checkpoint,
# move or stop it. After this long without reaching the agent it gives up.
AGENT_GRACE_S = 30.0
# Server-side hold of the long polls (the agent answers 204 after it).
LONG_POLL_S = 25.0
MAX_BODY_BYTES = 16 * 1024 * 1024

State = Mapping[str, Any]
StateArg = State | Callable[[], State]
# Writes a checkpoint's files into the (empty, existing) folder it is given.
SaveFiles = Callable[[Path], None]


class AgentUnavailable(RuntimeError):
    """The agent could not be reached for ``AGENT_GRACE_S``."""


class AgentProtocolError(RuntimeError):
    """The agent answered something the protocol does not allow."""


# --- state encoding --------------------------------------------------------


def _to_builtin(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays and scalars
        return tolist()
    raise TypeError(f"checkpoint state is not JSON-able: {type(value).__name__}")


def encode_state(state: State) -> bytes:
    """``state`` as canonical JSON; floats round-trip exactly."""
    if not isinstance(state, Mapping):
        raise TypeError("checkpoint state must be a dict")
    return json.dumps(
        state, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_to_builtin
    ).encode()


def decode_state(data: bytes) -> dict[str, Any]:
    state = json.loads(data)
    if not isinstance(state, dict):
        raise ValueError("state.json does not hold an object")
    return state


# --- the agent, seen from the workload -------------------------------------


class AgentClient:
    """The workload side of protocol.py, over one keep-alive connection."""

    def __init__(self, url: str, *, grace_s: float = AGENT_GRACE_S) -> None:
        # httpx logs every request at INFO: one line per training step in a
        # script that logs at INFO. Quiet it unless someone chose its level.
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        self.url = url
        self.grace_s = grace_s
        self._http = httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, connect=2.0))

    def close(self) -> None:
        self._http.close()

    def restore_target(self) -> int | None:
        """The step to restore (None: the latest verified); blocks in standby."""
        while True:
            answer = self._call("GET", f"{p.WORKLOAD_PREFIX}/restore-target", long_poll=True)
            if answer.status_code == 200:
                return p.RestoreTarget.model_validate_json(answer.content).step

    def progress(self, step: int, *, loss: float | None, total_steps: int | None,
                 at: float) -> ProgressAction:
        body = p.ProgressReport(step=step, loss=loss, total_steps=total_steps, time=at)
        answer = self._call("POST", f"{p.WORKLOAD_PREFIX}/progress",
                            json=body.model_dump(mode="json"))
        return p.ActionAnswer.model_validate_json(answer.content).action

    def checkpointed(self, step: int, key: str, *, periodic: bool = False) -> ProgressAction:
        """Report a checkpoint saved; ``periodic``: one uploaded in the
        background, which the agent records but which answers no request.
        May be called from the upload thread while the training thread is
        in another call: ``httpx.Client`` can be shared between threads
        (its connection pool is locked; each call gets its own connection)."""
        body = p.CheckpointedReport(step=step, key=key, periodic=periodic)
        answer = self._call("POST", f"{p.WORKLOAD_PREFIX}/checkpointed",
                            json=body.model_dump(mode="json"))
        return p.ActionAnswer.model_validate_json(answer.content).action

    def skipped(self, checkpoints: list[tuple[str, str]]) -> None:
        """Report checkpoints a restore skipped as corrupt or partial
        ((key, reason)): the control plane names them in the job's events."""
        body = p.SkippedReport(checkpoints=[p.SkippedCheckpoint(key=key, reason=reason[:2000])
                                            for key, reason in checkpoints[:100]])
        self._call("POST", f"{p.WORKLOAD_PREFIX}/skipped", json=body.model_dump(mode="json"))

    def wait_resume(self) -> None:
        """Block until the agent resumes this workload."""
        while True:
            answer = self._call("GET", f"{p.WORKLOAD_PREFIX}/wait-resume", long_poll=True)
            if answer.status_code == 200:
                return

    def _call(self, method: str, path: str, *, json: Any = None,
              long_poll: bool = False) -> httpx.Response:
        """One request, retried while the agent cannot be reached.

        A 204 means "not yet" on a long poll; any other non-2xx is a bug.
        """
        params = {"timeout_s": LONG_POLL_S} if long_poll else None
        timeout = httpx.Timeout(LONG_POLL_S + 10.0, connect=2.0) if long_poll else None
        deadline = time.monotonic() + self.grace_s
        delay = 0.05
        while True:
            try:
                if timeout is not None:
                    answer = self._http.request(method, path, json=json, params=params,
                                                timeout=timeout)
                else:
                    answer = self._http.request(method, path, json=json)
                break
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise AgentUnavailable(
                        f"agent at {self.url} unreachable for {self.grace_s:.0f} s: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        if answer.status_code >= 300:
            raise AgentProtocolError(
                f"{method} {path} -> {answer.status_code}: {answer.text[:200]}"
            )
        return answer


# --- the workload's own HTTP endpoints ----------------------------------------


class BadRequest(Exception):
    """Raise in a route handler to answer ``status`` with {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; BadRequest (400) if it is not."""
        if not self.body:
            raise BadRequest("the request needs a JSON body")
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the body is not valid JSON") from None


Handler = Callable[[Request], Any]
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def _parse_routes(routes: Mapping[str, Handler]) -> dict[str, dict[str, Handler]]:
    table: dict[str, dict[str, Handler]] = {}
    for route, handler in routes.items():
        method, _, path = route.strip().partition(" ")
        method, path = method.upper(), path.strip()
        if method not in _METHODS or not path.startswith("/"):
            raise ValueError(f"route must read 'METHOD /path', got {route!r}")
        table.setdefault(path, {})[method] = handler
    return table


class WorkloadServer:
    """A small threaded JSON server for the workload's endpoints.

    Each route handler gets a ``Request`` and returns a JSON-able value
    (200) or raises ``BadRequest``; any other exception is a 500 and is
    logged. Unknown paths are 404, other methods on a known path 405; ``GET /``,
    unless routed, lists the routes (``{"endpoints": ["GET /status", ...]}``).
    """

    def __init__(self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        table = _parse_routes(routes)
        index = sorted(f"{method} {path}" for path, methods in table.items() for method in methods)

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive with the agent's proxy

            def _handle(self) -> None:
                url = urlsplit(self.path)
                methods = table.get(url.path)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    return self._reply(411, {"error": "a Content-Length is required"})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True
                    return self._reply(413, {"error": "body too large"})
                body = self.rfile.read(length) if length else b""
                if methods is None and url.path == "/" and self.command == "GET":
                    # The job's stable endpoint (/endpoints/JOB/, the dashboard's
                    # link) lands here: say what the workload serves.
                    return self._reply(200, {"endpoints": index})
                if methods is None:
                    return self._reply(404, {"error": f"no such endpoint: {url.path}"})
                handler = methods.get(self.command)
                if handler is None:
                    allow = ", ".join(sorted(methods))
                    return self._reply(405, {"error": f"method not allowed; use {allow}"},
                                       {"Allow": allow})
                request = Request(self.command, url.path, parse_qs(url.query), body)
                try:
                    result = handler(request)
                    payload = json.dumps(result, allow_nan=False, default=_to_builtin)
                except BadRequest as exc:
                    return self._reply(exc.status, {"error": exc.message})
                except Exception:
                    log.exception("handler for %s %s failed", self.command, url.path)
                    return self._reply(500, {"error": "internal error"})
                self._send(200, payload.encode())

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _reply(self, status: int, body: Any,
                       headers: Mapping[str, str] | None = None) -> None:
                self._send(status, json.dumps(body).encode(), headers)

            def _send(self, status: int, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
                self.send_response(status, HTTPStatus(status).phrase)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # polled endpoints would flood the job's log

        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gpuscout-workload-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the run ---------------------------------------------------------------


class Run:
    """One run of a training script; make it with ``init``.

    Steps are *completed* steps (protocol.py): ``step_done(s)`` after the
    s-th step, a checkpoint of step s holds the state after s steps, and
    ``restore()`` returning s means the next step to run is s + 1.
    """

    def __init__(
        self,
        *,
        checkpoints: CheckpointStore,
        checkpoint_every: int | None,
        instance_id: str,
        default_dir: Path,
        agent: AgentClient | None = None,
        workload_port: int | None = None,
        artifacts: tuple[ObjectStore, str] | None = None,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 or None: only when asked)")
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every or None
        self.instance_id = instance_id
        self.default_dir = default_dir
        self.agent = agent
        self.workload_port = workload_port
        self._artifacts = artifacts
        self._server: WorkloadServer | None = None
        self.last_checkpoint: CheckpointInfo | None = None
        self._restored: Path | None = None  # restore_dir()'s own folder
        self._swept = False
        # The periodic checkpoint being uploaded in the background (at most
        # one), and an agent error it met, raised in the training thread.
        self._upload_thread: threading.Thread | None = None
        self._upload_error: Exception | None = None

    @property
    def managed(self) -> bool:
        """True under an agent, False standalone."""
        return self.agent is not None

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        """The JSON state to start from: ``(step, state)``, or None to start fresh.

        Under an agent this first waits while the agent is in standby, then
        loads the step the agent names (which must exist and verify, else
        NoCheckpoint or CorruptCheckpoint), or the latest verified
        checkpoint; corrupt or partial checkpoints are skipped by
        ``CheckpointStore``. A checkpoint saved with ``files=`` holds no
        JSON state: CheckpointError (use ``restore_dir()``). A periodic
        checkpoint still uploading is waited for first.
        """
        self.flush()
        target = self.agent.restore_target() if self.agent is not None else None
        try:
            if target is None:
                try:
                    info, files = self.checkpoints.load(None)
                except NoCheckpoint:
                    log.info("no checkpoint to restore: starting fresh")
                    return None
            else:
                info, files = self.checkpoints.load(target)
        finally:
            self._report_skipped()
        if STATE_FILE not in files:
            raise CheckpointError(
                f"checkpoint {info.key} (step {info.step}) holds files, not a JSON "
                f"{STATE_FILE}: it was saved with files=, restore it with restore_dir()")
        self.last_checkpoint = info
        log.info("restored checkpoint of step %d (%s)", info.step, info.key)
        return info.step, decode_state(files[STATE_FILE])

    def restore_dir(
        self, dest: str | os.PathLike[str] | None = None
    ) -> tuple[int, Path] | None:
        """The files to start from: ``(step, folder)``, or None to start fresh.

        Picks the checkpoint exactly as ``restore()`` does (standby wait,
        the agent's step, else the newest that verifies; a corrupt or
        partial one is skipped for the previous one), and streams its files
        into ``folder``: checkpoint file ``a/b`` at ``folder/a/b``. Every
        file is checked (size, sha256) against the manifest in a staging
        folder before any lands, so ``folder`` only ever holds a verified
        checkpoint. A JSON-state checkpoint restores as its ``state.json``.

        ``dest`` None (the default): a fresh folder under
        ``<default_dir>/.gpuscout-work``, owned by the run: it is deleted
        by the next ``restore_dir()`` and by ``close()``, and the caller may
        delete it as soon as it has loaded the files. ``dest`` given: that
        folder, which must be empty or absent (ValueError otherwise) and is
        left to the caller. Raises NoCheckpoint / CorruptCheckpoint when
        the agent named a step that does not exist / verify, and OSError
        when the local disk fails.
        """
        self.flush()
        owned = dest is None
        if dest is not None:
            folder = Path(dest)
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise ValueError(f"restore_dir: {folder} must be an empty folder or absent")
        target = self.agent.restore_target() if self.agent is not None else None
        if dest is None:
            self._drop_restored()
            folder = self._new_local_dir("restore")
        try:
            try:
                info = self.checkpoints.load_to_dir(folder, target)
            finally:
                self._report_skipped()
        except BaseException as exc:
            if owned:
                shutil.rmtree(folder, ignore_errors=True)
                self._remove_empty_work_dir()
            if target is not None or not isinstance(exc, NoCheckpoint):
                raise
            log.info("no checkpoint to restore: starting fresh")
            return None
        if owned:
            self._restored = folder
        self.last_checkpoint = info
        log.info("restored checkpoint of step %d (%s) into %s", info.step, info.key, folder)
        return info.step, folder

    def step_done(
        self,
        step: int,
        *,
        state: StateArg | None = None,
        files: SaveFiles | None = None,
        loss: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        """Report that step ``step`` completed; checkpoint and pause as due.

        Exactly one of ``state`` and ``files`` describes the state after
        this step (ValueError for none or both, at every call):

        - ``state``: a dict, or a function returning one (called only when a
          checkpoint is taken), saved as JSON; not JSON-able: TypeError.
        - ``files``: ``files(folder)`` is called only when a checkpoint is
          taken, with a fresh empty local folder (a ``Path``); it writes the
          step's files there (sub-folders allowed), and they are streamed
          into the store and the folder deleted. Whatever it raises
          propagates (the script's bug, or its local disk); writing nothing,
          a symlinked folder, something that is not a regular file, or a
          name the store refuses (``MANIFEST.json``, ``.gpuscout-tmp-*``)
          raises ValueError.

        A checkpoint is saved every ``checkpoint_every`` steps and whenever
        the agent asks; if the agent asks to pause, this blocks until it
        resumes. A periodic checkpoint is staged here (``state`` encoded,
        or ``files`` called) and uploaded in the background while training
        goes on; if the previous one is still uploading, this first waits
        for it (at most one upload in flight). A checkpoint the agent asks
        for first waits for the upload in flight, then is saved and
        reported before this returns. A failed upload (the store failing),
        in the background or not, is logged and training goes on (the
        agent asks again at the next step boundary; a periodic one is
        tried again when the next one is due).
        """
        _check_kind(state, files)
        action = ProgressAction.CONTINUE
        if self.agent is not None:
            action = self.agent.progress(step, loss=loss, total_steps=total_steps, at=time.time())
        periodic = self.checkpoint_every is not None and step % self.checkpoint_every == 0
        # A state that cannot be encoded, or a files function that fails,
        # is the script's: it raises. The store failing (network, disk) is
        # not: training goes on.
        if action is ProgressAction.CHECKPOINT:
            self.flush()
            if files is None:
                assert state is not None
                blobs = {STATE_FILE: encode_state(state() if callable(state) else state)}
                info = self._upload(step, lambda: self.checkpoints.save(step, blobs))
            else:
                with self._staged(files) as paths:
                    info = self._upload(step, lambda: self.checkpoints.save_paths(step, paths))
            if info is not None and self.agent is not None:
                action = self.agent.checkpointed(info.step, info.key)
        elif periodic:
            self.flush()  # CheckFreq's pipelining: one upload in flight at most
            if files is None:
                assert state is not None
                blobs = {STATE_FILE: encode_state(state() if callable(state) else state)}
                self._upload_in_background(step, lambda: self.checkpoints.save(step, blobs))
            else:
                folder, paths = self._stage(files)
                self._upload_in_background(
                    step, lambda: self.checkpoints.save_paths(step, paths),
                    cleanup=lambda: self._drop_local(folder))
        if action is ProgressAction.PAUSE and self.agent is not None:
            log.info("paused after step %d", step)
            self.agent.wait_resume()
            log.info("resumed after step %d", step)

    def _report_skipped(self) -> None:
        """Log the checkpoints the last restore skipped as corrupt or
        partial, and tell the agent (the job's events name them)."""
        skipped = self.checkpoints.take_skipped()
        for exc in skipped:
            log.warning("restore skipped checkpoint %s: %s", exc.key, exc.reason)
        if skipped and self.agent is not None:
            try:
                self.agent.skipped([(exc.key, exc.reason) for exc in skipped])
            except (AgentUnavailable, AgentProtocolError) as err:
                log.warning("could not report the skipped checkpoints: %s", err)

    def flush(self) -> CheckpointInfo | None:
        """Wait until the periodic checkpoint uploading in the background,
        if any, is stored (or failed) and reported; return
        ``last_checkpoint``. Raises what reporting it to the agent raised
        (AgentUnavailable, AgentProtocolError)."""
        thread = self._upload_thread
        if thread is not None:
            thread.join()
            self._upload_thread = None
        error, self._upload_error = self._upload_error, None
        if error is not None:
            raise error
        return self.last_checkpoint

    def _upload_in_background(self, step: int, save: Callable[[], CheckpointInfo],
                              cleanup: Callable[[], None] | None = None) -> None:
        """Run ``save`` (then ``cleanup``) in a new thread, and report the
        checkpoint to the agent as periodic. Nothing may be in flight."""
        assert self._upload_thread is None

        def upload() -> None:
            try:
                info = self._upload(step, save)
            finally:
                if cleanup is not None:
                    cleanup()
            if info is None or self.agent is None:
                return
            try:
                self.agent.checkpointed(info.step, info.key, periodic=True)
            except Exception as exc:  # the agent gone or a bug: the training thread's
                self._upload_error = exc

        self._upload_thread = threading.Thread(
            target=upload, name=f"gpuscout-checkpoint-{step}", daemon=False)
        self._upload_thread.start()

    def checkpoint(self, step: int, state: State) -> CheckpointInfo:
        """Save ``state`` as the checkpoint of ``step`` (does not tell the
        agent); waits for a periodic upload in flight first."""
        self.flush()
        info = self.checkpoints.save(step, {STATE_FILE: encode_state(state)})
        self.last_checkpoint = info
        return info

    def checkpoint_files(self, step: int, files: SaveFiles) -> CheckpointInfo:
        """Save the files ``files(folder)`` writes as the checkpoint of
        ``step`` (see ``step_done``); does not tell the agent. Unlike
        ``step_done``, a failing store raises. Waits for a periodic upload
        in flight first."""
        self.flush()
        with self._staged(files) as paths:
            info = self.checkpoints.save_paths(step, paths)
        self.last_checkpoint = info
        return info

    def _upload(self, step: int, save: Callable[[], CheckpointInfo]) -> CheckpointInfo | None:
        try:
            info = save()
        except Exception:
            log.exception("checkpoint of step %d failed; training goes on", step)
            return None
        self.last_checkpoint = info
        return info

    @contextlib.contextmanager
    def _staged(self, files: SaveFiles) -> Iterator[dict[str, Path]]:
        """A fresh staging folder filled by ``files``, as {name: path};
        deleted afterwards whatever happens."""
        folder, paths = self._stage(files)
        try:
            yield paths
        finally:
            self._drop_local(folder)

    def _stage(self, files: SaveFiles) -> tuple[Path, dict[str, Path]]:
        """A fresh staging folder filled by ``files`` and its files as
        {name: path}; the caller deletes it (``_drop_local``). Deleted here
        when ``files`` or the check of what it wrote raises."""
        folder = self._new_local_dir("save")
        try:
            files(folder)
            return folder, _collect_files(folder)
        except BaseException:
            self._drop_local(folder)
            raise

    def _drop_local(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self._remove_empty_work_dir()

    def _new_local_dir(self, kind: str) -> Path:
        """A new empty folder ``<default_dir>/.gpuscout-work/<kind>-<pid>-<id>``.
        The first call also deletes the folders of processes that are gone."""
        root = self.default_dir / WORK_DIR
        root.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            _sweep_dead_folders(root)
            self._swept = True
        folder = root / f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True)  # parents: another run may just have removed root
        return folder

    def _drop_restored(self) -> None:
        if self._restored is not None:
            self._drop_local(self._restored)
            self._restored = None

    def _remove_empty_work_dir(self) -> None:
        try:
            (self.default_dir / WORK_DIR).rmdir()  # only if empty
        except OSError:
            pass

    def save_artifact(self, name: str, data: bytes) -> str:
        """Store an output file; return where it went (a store key or a path).

        Under an agent: ``<GPUSCOUT_ARTIFACTS_PREFIX>/<name>`` in the store;
        standalone: ``<default_dir>/<name>``, written atomically.
        """
        parts = name.split("/")
        if not name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"artifact name must be a relative path without '..': {name!r}")
        if self._artifacts is not None:
            store, prefix = self._artifacts
            key = f"{prefix}/{name}"
            store.put(key, data)
            return key
        path = self.default_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)

    def serve(self, routes: Mapping[str, Handler], *, port: int | None = None) -> int | None:
        """Serve ``routes`` ({"GET /status": handler, ...}) on loopback.

        Under an agent the port is ``GPUSCOUT_WORKLOAD_PORT`` (the agent
        forwards its other paths there); standalone it is ``port`` (0: any
        free port), and nothing is served when ``port`` is None. Returns the
        port served, or None.
        """
        if self._server is not None:
            raise RuntimeError("serve() was called already")
        chosen = self.workload_port if self.workload_port is not None else port
        if chosen is None:
            return None
        self._server = WorkloadServer(routes, port=chosen)
        log.info("serving on 127.0.0.1:%d", self._server.port)
        return self._server.port

    def close(self) -> None:
        """Wait for a periodic checkpoint still uploading (a script that
        ends keeps its last one), stop serving, drop the agent connection
        and delete the folder ``restore_dir()`` made; idempotent. An agent
        error met reporting that checkpoint is logged, not raised."""
        try:
            self.flush()
        except Exception:
            log.exception("reporting the last periodic checkpoint to the agent failed")
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.agent is not None:
            self.agent.close()
        self._drop_restored()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _check_kind(state: StateArg | None, files: SaveFiles | None) -> None:
    if (state is None) == (files is None):
        raise ValueError("step_done needs exactly one of state= (JSON) and files= "
                         "(a function writing the checkpoint's files into a folder)")
    if files is not None and not callable(files):
        raise TypeError("files= must be a function taking the folder to write into")


def _collect_files(folder: Path) -> dict[str, Path]:
    """The files under ``folder`` as {checkpoint file name: path}; ValueError
    for nothing, a symlinked folder, a special file or a name a store refuses."""
    found: dict[str, Path] = {}
    for here, dirs, names in os.walk(folder):
        base = Path(here)
        for name in dirs:
            if (base / name).is_symlink():
                raise ValueError(f"checkpoint folder {(base / name).relative_to(folder)} "
                                 "is a symlink; write a real folder")
        for name in names:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if not path.is_file():
                raise ValueError(f"checkpoint file {rel!r} is not a regular file")
            check_key(rel)
            if rel == MANIFEST:
                raise ValueError(f"checkpoint file name {MANIFEST!r} is reserved")
            found[rel] = path
    if not found:
        raise ValueError("the files= function wrote no file into its folder")
    return dict(sorted(found.items()))


_LOCAL_DIR = re.compile(r"^(?:save|restore)-(\d+)-[0-9a-f]+$")


def _sweep_dead_folders(root: Path) -> None:
    """Delete staging/restored folders under ``root`` whose process is gone
    (a run that was killed); those of live processes stay."""
    for entry in root.iterdir():
        match = _LOCAL_DIR.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue  # alive (someone else's), or not a pid


def init(
    *,
    checkpoint_every: int | None = None,
    default_dir: str | os.PathLike[str] = ".",
    environ: Mapping[str, str] | None = None,
) -> Run:
    """Make the run from the environment (protocol.py); standalone if there
    is no ``GPUSCOUT_AGENT_URL``. ``checkpoint_every``: save every that many
    steps besides when the agent asks (None or 0: only when asked)."""
    env = os.environ if environ is None else environ
    directory = Path(default_dir)
    agent_url = env.get(p.ENV_AGENT_URL, "").strip()
    store_url = env.get(p.ENV_STORE_URL, "").strip()
    instance_id = env.get(p.ENV_INSTANCE_ID, "").strip() or "standalone"
    if not agent_url:
        if store_url:
            store = open_store(store_url)
            prefix = env.get(p.ENV_CHECKPOINT_PREFIX, "").strip() or STANDALONE_CHECKPOINT_PREFIX
        else:
            root = (directory / STANDALONE_CHECKPOINT_DIR).resolve()
            root.mkdir(parents=True, exist_ok=True)
            store = open_store(root.as_uri())
            prefix = STANDALONE_CHECKPOINT_PREFIX
        return Run(checkpoints=CheckpointStore(store, prefix), checkpoint_every=checkpoint_every,
                   instance_id=instance_id, default_dir=directory)

    def required(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            raise RuntimeError(f"{name} must be set when {p.ENV_AGENT_URL} is")
        return value

    store = open_store(required(p.ENV_STORE_URL))
    port_text = required(p.ENV_WORKLOAD_PORT)
    try:
        workload_port = int(port_text)
    except ValueError:
        raise RuntimeError(f"{p.ENV_WORKLOAD_PORT} must be an integer: {port_text!r}") from None
    return Run(
        checkpoints=CheckpointStore(store, required(p.ENV_CHECKPOINT_PREFIX)),
        checkpoint_every=checkpoint_every,
        instance_id=instance_id,
        default_dir=directory,
        agent=AgentClient(agent_url),
        workload_port=workload_port,
        artifacts=(store, required(p.ENV_ARTIFACTS_PREFIX)),
    )
