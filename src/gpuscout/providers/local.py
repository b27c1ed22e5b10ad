"""The local provider: every instance is a tree of real OS processes.

An instance is a folder ``<root>/instances/<instance id>/`` holding its
rendered ``bootstrap.sh`` (the same script an EC2 instance gets as user-data),
a JSON record and its logs, plus a process group started by
``bash -c 'sleep <boot delay>; exec bash bootstrap.sh'`` in a new session, so
the boot shell, the agent it becomes and every process the job starts share
one process group that ``terminate`` can kill as a whole.

State lives on disk, not in this object: any LocalProvider on the same root
(a restarted control plane, another process) sees and can terminate the
instances another one launched.

How a process is recognised as the instance's (pids and process groups are
reused by the OS once free): every process of the tree inherits
``GPUSCOUT_LOCAL_INSTANCE=<absolute instance folder>`` in its environment
(unique even when two roots reuse an instance id), and the group leader's
start time is recorded. A process group counts as the instance's only while
one of its live members carries the marker or is the recorded leader;
zombies do not count as live. psutil reads the process table.

The agent runs the job's command in a session of its own, so an instance is
its process group *plus* the processes elsewhere that carry its marker;
``terminate`` signals both, and the instance is TERMINATED only when neither
is left. A job process that leaves its group *and* clears its environment is
not found (a limit of this local stand-in).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from gpuscout.domain import Offer
from gpuscout.market.catalog import default_local_catalog
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    ProviderError,
    ProviderInstance,
    ProviderState,
)
from gpuscout.providers.bootstrap import render_bootstrap

RECORD_FILE = "instance.json"
BOOTSTRAP_FILE = "bootstrap.sh"
BOOT_LOG_FILE = "boot.log"  # stdout/stderr of the boot shell; bootstrap.sh logs to agent.log
# A record without a pid is a launch in flight, or one that died before its
# process started; after this long it is the latter.
_LAUNCH_IN_FLIGHT_S = 30.0
# SIGKILL cannot be caught; a process that outlives it this long is stuck in
# the kernel (uninterruptible I/O) and terminate reports an error.
_KILL_WAIT_S = 10.0
_POLL_S = 0.05
# The ownership marker every process of an instance inherits (see above).
MARKER_ENV = "GPUSCOUT_LOCAL_INSTANCE"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_NOT_LIVE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})

# Boot shells started by this Python process, by pid. Reaping them (poll)
# keeps them from lingering as zombies, which would still be members of their
# process group. Shared by every LocalProvider in the process, because the
# one that launched an instance need not be the one that terminates it.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def _reap_children() -> None:
    with _children_lock:
        for pid, proc in builtins.list(_children.items()):
            if proc.poll() is not None:
                del _children[pid]


@dataclass(frozen=True, slots=True)
class _Record:
    """What ``instance.json`` holds. ``state`` is the last state observed."""

    instance_id: str
    job_id: str
    offer_id: str
    cluster: str
    host: str
    port: int
    launched_at: float  # Unix seconds
    boot_delay_s: float
    state: str = ProviderState.PENDING.value
    pid: int | None = None  # the boot shell, later the agent (exec keeps the pid)
    pgid: int | None = None  # == pid: the shell leads its own session and group
    started_at: float | None = None  # the leader's creation time (see _started_at)
    marker: str = ""  # MARKER_ENV's value in the instance's processes
    interruption_notice: bool = False
    interruption_at: float | None = None
    terminate_requested_at: float | None = None
    terminated_at: float | None = None
    end_reason: str | None = None  # terminated | exited | launch_failed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Record:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class LocalProvider:
    """Instances as process groups on this machine, booted by bootstrap.sh.

    ``root``: the folder holding ``instances/``; ``boot_delay_s``: how long an
    instance "boots" before bootstrap.sh runs (the agent is unreachable
    meanwhile); ``python``: an interpreter with gpuscout installed, handed to
    bootstrap.sh; ``host``: the address agents listen on; ``catalog``: what
    ``offers()`` returns (default: market.catalog.default_local_catalog());
    ``cluster``: instances of other clusters on the same root are not listed;
    ``terminate_grace_s``: how long processes get between SIGTERM and SIGKILL;
    ``keep_terminated_s``: how long a terminated instance's folder (record and
    logs) is kept before ``list`` removes it (EC2 shows a terminated instance
    for about an hour; ``get`` then raises InstanceNotFound, as there).
    """

    name = "local"

    def __init__(
        self,
        root: Path,
        *,
        boot_delay_s: float = 0.0,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        catalog: list[Offer] | None = None,
        cluster: str = "default",
        terminate_grace_s: float = 5.0,
        keep_terminated_s: float = 3600.0,
    ) -> None:
        if boot_delay_s < 0:
            raise ValueError("boot_delay_s must be >= 0")
        if keep_terminated_s < 0:
            raise ValueError("keep_terminated_s must be >= 0")
        self.keep_terminated_s = keep_terminated_s
        self.root = Path(root).absolute()
        self.boot_delay_s = boot_delay_s
        self.python = python
        self.host = host
        self.cluster = cluster
        self.terminate_grace_s = terminate_grace_s
        self._catalog = builtins.list(catalog) if catalog is not None else default_local_catalog()
        self._launch_lock = threading.Lock()

    # --- Provider protocol -------------------------------------------------

    def offers(self) -> list[Offer]:
        return builtins.list(self._catalog)

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        """Start the instance's boot shell and return it PENDING.

        The record is written before the process starts, so a control plane
        that dies in between leaves a record (never an untracked process).
        Raises CapacityError for an offer marked unavailable, LaunchError for
        a reused or unsafe instance id or a process that cannot start.
        """
        if not request.offer.available:
            raise CapacityError(request.offer.id, "offer is not available")
        if not _SAFE_ID.match(request.instance_id):
            raise LaunchError(f"instance id {request.instance_id!r} is not a safe folder name")
        folder = self._folder(request.instance_id)
        with self._launch_lock:
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                raise LaunchError(f"instance {request.instance_id} was already launched") from None
            port = self._free_port()
        # Held until the pid is recorded, so a concurrent terminate waits for
        # the process to exist instead of being overwritten by this write.
        with self._locked(request.instance_id):
            script = render_bootstrap(
                request,
                agent_host=self.host,
                agent_port=port,
                python=self.python,
                instance_dir=str(folder),
            )
            # The script holds the agent token: readable by its owner only.
            fd = os.open(folder / BOOTSTRAP_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            record = _Record(
                instance_id=request.instance_id,
                job_id=request.job_id,
                offer_id=request.offer.id,
                cluster=self.cluster,
                host=self.host,
                port=port,
                launched_at=time.time(),
                boot_delay_s=self.boot_delay_s,
                marker=str(folder),
            )
            self._write(folder, record)
            try:
                proc = self._start(folder, record.marker)
            except OSError as err:
                self._write(
                    folder,
                    replace(
                        record,
                        state=ProviderState.TERMINATED.value,
                        terminated_at=time.time(),
                        end_reason="launch_failed",
                    ),
                )
                raise LaunchError(f"cannot start instance {request.instance_id}: {err}") from err
            with _children_lock:
                _children[proc.pid] = proc
            record = replace(
                record, pid=proc.pid, pgid=proc.pid, started_at=_started_at(proc.pid)
            )
            self._write(folder, record)
        return self._view(record)

    def get(self, instance_id: str) -> ProviderInstance:
        """The instance as the OS sees it now; InstanceNotFound if no record."""
        _reap_children()
        return self._view(self._observe(instance_id))

    def list(self) -> list[ProviderInstance]:
        """Instances of this cluster not yet terminated, launched by anyone.
        Removes the folders of those terminated ``keep_terminated_s`` ago."""
        _reap_children()
        out: list[ProviderInstance] = []
        for instance_id in self._instance_ids():
            try:
                if self._read(instance_id).cluster != self.cluster:
                    continue
                record = self._observe(instance_id)
            except InstanceNotFound:
                continue  # removed meanwhile
            if record.state != ProviderState.TERMINATED:
                out.append(self._view(record))
            elif (record.terminated_at is not None
                  and time.time() - record.terminated_at >= self.keep_terminated_s):
                self._remove(instance_id)
        return out

    def on_route(self, job_id: str, instance_id: str) -> str | None:
        """Nothing follows a job here but the proxy's route."""
        return None

    def terminate(self, instance_id: str) -> None:
        """Kill the instance's whole process tree; return once none is left.

        SIGTERM (and SIGCONT, so stopped processes see it) to the group, up
        to ``terminate_grace_s`` for it to exit, then SIGKILL. Idempotent; an
        unknown id is already done. Raises ProviderError only if processes
        survive SIGKILL for 10 s (stuck in the kernel).
        """
        try:
            with self._locked(instance_id):
                record = self._read(instance_id)
                if record.state == ProviderState.TERMINATED:
                    return  # seen gone before: nothing of it can be found any more
                if record.terminate_requested_at is None:
                    # Persisted before the signals it announces.
                    record = replace(record, terminate_requested_at=time.time())
                    self._write(self._folder(instance_id), record)
        except InstanceNotFound:
            return
        if record.pid is not None:
            self._kill_tree(record)
        with self._locked(instance_id):
            record = self._read(instance_id)
            if record.state != ProviderState.TERMINATED:
                record = replace(
                    record,
                    state=ProviderState.TERMINATED.value,
                    terminated_at=time.time(),
                    end_reason="terminated",
                )
                self._write(self._folder(instance_id), record)

    # --- test hooks --------------------------------------------------------

    def notify_interruption(self, instance_id: str) -> None:
        """Give the instance a spot interruption notice (as AWS does 2 min ahead).

        ``get`` then reports ``interruption_notice=True``; the processes keep
        running until someone terminates them. InstanceNotFound if unknown.
        """
        with self._locked(instance_id):
            record = self._read(instance_id)
            if not record.interruption_notice:
                record = replace(record, interruption_notice=True, interruption_at=time.time())
                self._write(self._folder(instance_id), record)

    def instance_dir(self, instance_id: str) -> Path:
        """The instance's folder (bootstrap.sh, instance.json, boot.log, agent.log)."""
        return self._folder(instance_id)

    # --- internals ---------------------------------------------------------

    def _folder(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def _remove(self, instance_id: str) -> None:
        """Delete a terminated instance's folder (under its lock, so that no
        terminate or get is halfway through it)."""
        with contextlib.suppress(InstanceNotFound), self._locked(instance_id):
            if self._read(instance_id).state == ProviderState.TERMINATED:
                shutil.rmtree(self._folder(instance_id), ignore_errors=True)

    def _instance_ids(self) -> Iterator[str]:
        base = self.root / "instances"
        if not base.is_dir():
            return
        for entry in sorted(base.iterdir()):
            if (entry / RECORD_FILE).is_file():
                yield entry.name

    @contextlib.contextmanager
    def _locked(self, instance_id: str) -> Iterator[None]:
        """Serialise read-modify-write of one record, across processes too."""
        if not _SAFE_ID.match(instance_id):
            raise InstanceNotFound(instance_id)
        folder = self._folder(instance_id)
        try:
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise InstanceNotFound(instance_id) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self, instance_id: str) -> _Record:
        if not _SAFE_ID.match(instance_id):
            raise InstanceNotFound(instance_id)
        try:
            data = json.loads((self._folder(instance_id) / RECORD_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise InstanceNotFound(instance_id) from None
        return _Record.from_json(data)

    @staticmethod
    def _write(folder: Path, record: _Record) -> None:
        """Atomic: readers see the old record or the new one, never half."""
        tmp = folder / f".{RECORD_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=1, sort_keys=True))
        os.replace(tmp, folder / RECORD_FILE)

    def _observe(self, instance_id: str) -> _Record:
        """The record brought up to date with the OS (and persisted if changed)."""
        record = self._read(instance_id)
        if record.state == ProviderState.TERMINATED:
            return record
        now = time.time()
        if record.pid is None:
            if now - record.launched_at < _LAUNCH_IN_FLIGHT_S:
                return record
            new = replace(record, state=ProviderState.TERMINATED.value, terminated_at=now,
                          end_reason="launch_failed")
        elif not _tree_alive(record):
            new = replace(record, state=ProviderState.TERMINATED.value, terminated_at=now,
                          end_reason="terminated" if record.terminate_requested_at else "exited")
        elif now >= record.launched_at + record.boot_delay_s:
            new = replace(record, state=ProviderState.RUNNING.value)
        else:
            return record
        if new == record:
            return record
        with self._locked(instance_id):
            current = self._read(instance_id)
            if current.state == ProviderState.TERMINATED:
                return current  # someone else finished it meanwhile
            # Keep flags set meanwhile (interruption notice, terminate request).
            merged = replace(current, state=new.state, terminated_at=new.terminated_at,
                             end_reason=new.end_reason)
            self._write(self._folder(instance_id), merged)
            return merged

    def _view(self, record: _Record) -> ProviderInstance:
        return ProviderInstance(
            instance_id=record.instance_id,
            job_id=record.job_id,
            offer_id=record.offer_id,
            state=ProviderState(record.state),
            address=f"{record.host}:{record.port}",
            provider_ref=str(record.pid) if record.pid is not None else "",
            interruption_notice=record.interruption_notice,
        )

    def _free_port(self) -> int:
        """A port free on ``host`` now and not given to a live instance here.

        The agent binds it only after the boot delay, seconds later. A port
        from the kernel's ephemeral range (what binding port 0 gives) may be
        taken meanwhile by any outgoing connection on the machine, which
        then fails the instance's boot ("Address already in use"; seen under
        load, failing a move). So the port is drawn below that range, where
        only an explicit bind can take it; where the range is unknown or
        leaves no room below, from port 0 as before. Another program may
        still bind it first; the agent then fails to start and the instance
        never becomes healthy, which the control plane already handles.
        """
        taken = set()
        for instance_id in self._instance_ids():
            with contextlib.suppress(InstanceNotFound, ValueError, TypeError):
                record = self._read(instance_id)
                if record.state != ProviderState.TERMINATED:
                    taken.add(record.port)
        ports = _agent_ports()
        for _ in range(50):
            port = random.choice(ports) if ports else 0
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((self.host, port))
                except OSError:
                    if not ports:
                        raise
                    continue  # in use: draw again
                port = int(sock.getsockname()[1])
            if port not in taken:
                return port
        raise LaunchError("no free port found")

    def _start(self, folder: Path, marker: str) -> subprocess.Popen[bytes]:
        # The instance sees the machine's environment but none of the control
        # plane's own GPUSCOUT_* settings (tokens, database): like an EC2
        # machine, it gets only what bootstrap.sh exports.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
        env[MARKER_ENV] = marker  # from the very first process on
        if self.boot_delay_s > 0:
            argv = ["bash", "-c", 'sleep "$1"; exec bash ./' + BOOTSTRAP_FILE, "gpuscout-boot",
                    f"{self.boot_delay_s:.3f}"]
        else:
            argv = ["bash", "./" + BOOTSTRAP_FILE]
        with open(folder / BOOT_LOG_FILE, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    def _kill_tree(self, record: _Record) -> None:
        _signal_tree(record, signal.SIGTERM)
        _signal_tree(record, signal.SIGCONT)
        if _wait_gone(record, self.terminate_grace_s):
            return
        # SIGKILL in rounds: each round also reaches what was forked since the last.
        deadline = time.monotonic() + _KILL_WAIT_S
        while True:
            _signal_tree(record, signal.SIGKILL)
            if _wait_gone(record, 0.2):
                return
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"instance {record.instance_id}: processes survive SIGKILL: "
                    f"{_scan(record, hunt_escapees=True)}"
                )


# --- ports -------------------------------------------------------------------

# Where the kernel draws ports for outgoing connections and for port 0.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_AGENT_PORTS_FROM = 20000  # agents' ports: from here to the ephemeral range


def _agent_ports() -> range:
    """Ports below the ephemeral range for agents to listen on; empty if
    the range is unknown (not Linux) or leaves fewer than 1000 below it."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    ports = range(_AGENT_PORTS_FROM, low)
    return ports if len(ports) >= 1000 else range(0)


# --- processes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Proc:
    """A live (not zombie) process."""

    pid: int
    pgid: int
    started_at: float
    handle: psutil.Process = field(compare=False, repr=False)


def _rounded(create_time: float) -> float:
    # psutil's creation time: the kernel's start ticks (1/100 s) after the
    # boot time, in seconds since the epoch; rounded, so that the same process
    # compares equal. A step of the wall clock moves the boot time and so
    # every creation time: the leader is then known by its marker alone.
    return round(create_time, 2)


def _started_at(pid: int) -> float | None:
    try:
        return _rounded(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _has_marker(proc: _Proc, marker: str) -> bool:
    if not marker:
        return False
    try:
        return bool(proc.handle.environ().get(MARKER_ENV) == marker)
    except psutil.Error:  # gone, or not ours to read
        return False


def _live_procs() -> Iterator[_Proc]:
    for proc in psutil.process_iter(["status", "create_time"]):
        status, created = proc.info["status"], proc.info["create_time"]
        if status is None or status in _NOT_LIVE or created is None:
            continue
        try:
            pgid = os.getpgid(proc.pid)
        except OSError:  # gone meanwhile
            continue
        yield _Proc(pid=proc.pid, pgid=pgid, started_at=_rounded(created), handle=proc)


def _group_owned(record: _Record, members: builtins.list[_Proc]) -> bool:
    """True if these processes of the record's pgid are the instance's own."""
    for proc in members:
        if proc.pid == record.pid and proc.started_at == record.started_at:
            return True
        if _has_marker(proc, record.marker):
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Tree:
    """The live processes of an instance, as last scanned."""

    group: frozenset[int]  # members of its process group, if the group is still its own
    escapees: frozenset[int] = frozenset()  # marked processes that left the group

    def __bool__(self) -> bool:
        return bool(self.group or self.escapees)


def _scan(record: _Record, *, hunt_escapees: bool = False) -> _Tree:
    """The instance's live processes. ``hunt_escapees`` also reads the
    environment of every other process, which costs more; terminate does."""
    if record.pgid is None:
        return _Tree(frozenset())
    procs = builtins.list(_live_procs())
    members = [p for p in procs if p.pgid == record.pgid]
    group = frozenset(p.pid for p in members) if _group_owned(record, members) else frozenset()
    escapees: frozenset[int] = frozenset()
    if hunt_escapees:
        me = os.getpid()
        escapees = frozenset(
            p.pid
            for p in procs
            if p.pgid != record.pgid and p.pid != me and _has_marker(p, record.marker)
        )
    return _Tree(group, escapees)


def _tree_alive(record: _Record) -> bool:
    """Whether any process of the instance is alive (zombies are not).

    The common answer is cheap (a live process of its group). Only when the
    group is gone are all processes searched for the marker: the agent runs
    the job in a session of its own, which may outlive a crashed agent.
    """
    if record.pgid is None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pgid, 0)  # raises if nothing at all is left in the group
        if _scan(record).group:
            return True
    return bool(_scan(record, hunt_escapees=True))


def _signal_tree(record: _Record, sig: signal.Signals) -> None:
    tree = _scan(record, hunt_escapees=True)
    if tree.group and record.pgid is not None:
        # One call reaches every member, also those forked since the scan.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pgid, sig)
    for pid in tree.escapees:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(record: _Record, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap_children()
        if not _scan(record, hunt_escapees=True):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


__all__ = ["LocalProvider"]
