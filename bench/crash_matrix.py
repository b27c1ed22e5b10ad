"""Crash matrix: kill -9 of `gpuscout up` in each phase of a move, then restart.

For each of the six phases of a migration (launching, booting,
checkpointing, restoring, switching, terminating) and each run, on a fresh
home: start a real `gpuscout up` (local provider, manual market), submit the
linreg example job, move it by hand (`POST /jobs/{id}/migrate`), SIGKILL the
control plane while the move is in that phase, start `gpuscout up` again on
the same home, and let the job finish. Each run checks:

- killed     the plane died by SIGKILL with the move persisted in that phase
- outcome    the restarted plane's repair rolled the move back (a kill before
             switching) or forward (from switching on)
- completed  the job completed
- exact      its model.json equals, byte for byte, an uninterrupted run's
- steps      no step lost beyond the checkpoint in flight: after a rollback
             the old instance's workload was never restarted (it resumed
             where it paused); after a roll forward the replacement resumed
             at the move's checkpoint step + 1 and the old instance never ran
             past that step
- one        from the moment the restarted plane answers (its repair is
             done), exactly one instance of the job has live processes until
             the job completes, and none after; no instance row stays live
- orphans    the repair left nothing for the reaper to find (no `reaped`
             event), and once the plane is stopped no process of any
             instance is left in the OS process table and every instance
             record says terminated

How the kill lands in a phase: BOOTING lasts the boot delay, so the bench
polls the API and kills the process from outside ("outside"). The other
phases last milliseconds; the plane is started with GPUSCOUT_FAILPOINT
(gpuscout.controllers.failpoints) and SIGKILLs itself right after the phase
is persisted ("<phase>"), or once its work is done, before the next one is
persisted ("<phase>:end"). Runs of a phase cycle through its kill points.
Either way the phase the database holds after the kill is checked.

Recovery times, from the restart: "up" until the API answers (the repair is
done by then), "train" until the job runs again past the step it had at the
kill.

    .venv/bin/python bench/crash_matrix.py [--runs 3] [--phases booting,switching] [--json]

Exits 1 if any run fails. tests/e2e/test_crash_matrix.py runs one kill per
phase through ``run_case``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from gpuscout.agent.protocol import AGENT_PREFIX
from gpuscout.db import open_repository
from gpuscout.providers.local import MARKER_ENV, RECORD_FILE, LocalProvider

PHASES = ("launching", "booting", "checkpointing", "restoring", "switching", "terminating")
# Where in each phase a run kills the plane; run i takes point i mod len.
# The first of each is the one tests/e2e/test_crash_matrix.py uses.
KILL_POINTS: dict[str, tuple[str, ...]] = {
    # LAUNCHING is persisted when the move is recorded, before any hook:
    # its kill point is its end, the replacement launched but not yet
    # named by its migration.
    "launching": ("launching:end",),
    "booting": ("outside", "booting", "booting:end"),
    "checkpointing": ("checkpointing:end", "checkpointing"),
    "restoring": ("restoring:end", "restoring"),
    "switching": ("switching", "switching:end"),
    # DONE is written without a phase change: no "terminating:end".
    "terminating": ("terminating",),
}
ROLLS_FORWARD = frozenset({"switching", "terminating"})
TOKEN = "crash-matrix"


@dataclass(frozen=True)
class Config:
    steps: int = 800
    seed: int = 11
    step_sleep_s: float = 0.02
    checkpoint_every: int = 25
    boot_delay_s: float = 2.0
    reconcile_s: float = 0.2
    reaper_s: float = 2.0
    # How long the plane stays dead before its restart: the instances run on
    # meanwhile (a replacement past its restore trains ahead).
    dead_s: float = 1.0
    # "Exactly one instance" holds from this long after the restarted plane
    # answers (0: at once; its repair is done by then).
    settle_s: float = 0.0
    timeout_s: float = 120.0
    sample_s: float = 0.15


# --- the control plane as a process -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Plane:
    """`gpuscout up` as a child process on ``home``."""

    def __init__(self, home: Path, port: int, cfg: Config) -> None:
        self.home, self.port, self.cfg = home, port, cfg
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, failpoint: str | None = None) -> float:
        """Start it and return once the API answers (the restart's repair is
        done by then); the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
        env.update(
            GPUSCOUT_HOME=str(self.home), GPUSCOUT_API_TOKEN=TOKEN, GPUSCOUT_PROVIDER="local",
            GPUSCOUT_MARKET="manual", GPUSCOUT_BOOT_DELAY_S=str(self.cfg.boot_delay_s),
            GPUSCOUT_SCOUT_INTERVAL_S="3600",
            GPUSCOUT_RECONCILE_INTERVAL_S=str(self.cfg.reconcile_s),
            GPUSCOUT_REAPER_INTERVAL_S=str(self.cfg.reaper_s),
            GPUSCOUT_HEALTH_TIMEOUT_S="60", GPUSCOUT_CHECKPOINT_TIMEOUT_S="60",
        )
        if failpoint:
            env["GPUSCOUT_FAILPOINT"] = failpoint
        self.starts += 1
        log = open(self.home / f"plane-{self.starts}.log", "wb")  # noqa: SIM115
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuscout.cli.main", "up", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = started + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpuscout up exited with {self.proc.returncode} "
                                   f"(see {self.home}/plane-{self.starts}.log)")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError("gpuscout up did not answer within 60 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_dead(self, timeout_s: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --- what the OS and the agents show, sampled --------------------------------


@dataclass
class Trace:
    """One instance as the monitor saw it."""

    first_steps: set[int] = field(default_factory=set)  # >1 value: its workload restarted
    max_step: int = 0
    last_checkpoint_step: int | None = None


class Monitor:
    """Samples, every ``interval_s``, which instances under ``instances_dir``
    have live processes (the OS process table, by the local provider's
    marker) and what each live one's agent says (step, first step)."""

    def __init__(self, instances_dir: Path, interval_s: float) -> None:
        self.dir = instances_dir
        self.prefix = f"{instances_dir}/"
        self.interval_s = interval_s
        self.samples: list[tuple[float, frozenset[str]]] = []
        self.traces: dict[str, Trace] = {}
        self._addresses: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crash-monitor", daemon=True)
        self._http = httpx.Client(timeout=0.5)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._http.close()

    def live(self) -> dict[str, list[int]]:
        """Instance id -> pids of its live processes."""
        return live_instance_processes(self.prefix)

    def _address(self, instance_id: str) -> str | None:
        if instance_id not in self._addresses:
            try:
                record = json.loads((self.dir / instance_id / RECORD_FILE).read_text())
            except (OSError, ValueError):
                return None
            self._addresses[instance_id] = f"{record['host']}:{record['port']}"
        return self._addresses[instance_id]

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            live = self.live()
            self.samples.append((now, frozenset(live)))
            for instance_id in live:
                trace = self.traces.setdefault(instance_id, Trace())
                address = self._address(instance_id)
                if address is None:
                    continue
                try:
                    health = self._http.get(f"http://{address}{AGENT_PREFIX}/health").json()
                except (httpx.HTTPError, ValueError):
                    continue
                if health.get("first_step") is not None:
                    trace.first_steps.add(int(health["first_step"]))
                trace.max_step = max(trace.max_step, int(health.get("step") or 0))
                if health.get("last_checkpoint_step") is not None:
                    trace.last_checkpoint_step = int(health["last_checkpoint_step"])
            self._stop.wait(self.interval_s)


def live_instance_processes(prefix: str) -> dict[str, list[int]]:
    """Instance id -> live (not zombie) processes whose environment carries
    the local provider's marker of an instance folder under ``prefix``."""
    out: dict[str, list[int]] = {}
    for proc in psutil.process_iter(["environ", "status"]):
        try:
            marker = (proc.info["environ"] or {}).get(MARKER_ENV, "")
        except (psutil.Error, AttributeError):
            continue
        if not marker.startswith(prefix) or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        out.setdefault(marker[len(prefix):].split("/")[0], []).append(proc.pid)
    return out


def unterminated_records(instances_dir: Path) -> list[str]:
    """Instance folders whose record does not say terminated."""
    out = []
    if instances_dir.is_dir():
        for folder in sorted(instances_dir.iterdir()):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((folder / RECORD_FILE).read_text())["state"] != "terminated":
                    out.append(folder.name)
    return out


# --- one run -------------------------------------------------------------------


@dataclass
class Result:
    phase: str
    run: int
    kill_point: str
    killed_in: str | None = None
    outcome: str | None = None  # rolled back | rolled forward
    up_s: float | None = None  # restart -> the API answers (repair done)
    train_s: float | None = None  # restart -> the job trains past its step at the kill
    lost_steps: int | None = None  # steps the job lost beyond the checkpoint in flight
    discarded_steps: int = 0  # steps a rolled-back replacement ran past the checkpoint
    # Whether the move's target offer was left blocked (unavailable to
    # every job) by the repair: a restart is not the offer's fault.
    target_blocked: bool | None = None
    max_live_after: int | None = None  # instances with processes, after the restart
    # Seconds after the restarted plane answered during which a second
    # instance of the job still had live processes (0: none was seen).
    second_instance_s: float | None = None
    orphans: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    home: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def cell(self) -> str:
        if not self.ok:
            return "FAIL " + ",".join(f.split(":", 1)[0] for f in self.failures)
        how = "back" if self.outcome == "rolled back" else "fwd"
        return f"ok {how} {self.train_s or 0:.1f}s"


def reference_model(workdir: Path, cfg: Config) -> bytes:
    """model.json of an uninterrupted run, with no control plane."""
    out = workdir / f"reference-{cfg.seed}-{cfg.steps}"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "gpuscout.examples.linreg", "--steps", str(cfg.steps),
         "--seed", str(cfg.seed), "--out", str(out)],
        check=True, timeout=300, capture_output=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")})
    return (out / "model.json").read_bytes()


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Check(Exception):
    """A failed check that ends the run."""


def run_case(phase: str, kill_point: str, cfg: Config, workdir: Path, reference: bytes,
             *, run: int = 1) -> Result:
    """One kill of the plane in ``phase`` at ``kill_point``; cleans up after
    itself whatever happens (the home is kept if the run failed)."""
    home = workdir / f"{phase}-{run}"
    home.mkdir(parents=True)
    result = Result(phase=phase, run=run, kill_point=kill_point, home=str(home))
    plane = Plane(home, free_port(), cfg)
    instances_dir = home / "local" / "instances"
    try:
        with Monitor(instances_dir, cfg.sample_s) as monitor:
            _run(plane, monitor, result, phase, kill_point, cfg, reference)
    except Check as failed:
        result.failures.append(str(failed))
    except Exception as err:  # noqa: BLE001 - a run that breaks is a failed cell
        result.failures.append(f"error: {type(err).__name__}: {err}")
    finally:
        plane.stop()
        # Nothing may be left once the plane is stopped (the job is over);
        # a process being terminated right now gets a few seconds to go.
        deadline = time.monotonic() + 5
        while (leftover := live_instance_processes(f"{instances_dir}/")) and (
                time.monotonic() < deadline):
            time.sleep(0.2)
        records = unterminated_records(instances_dir)
        result.orphans = ([f"{i} (pids {p})" for i, p in leftover.items()]
                          + [f"{i} (record not terminated)" for i in records
                             if i not in leftover])
        # (Before the restart, a stopped plane leaves a running job's
        # instances running, by design: no verdict on a run that ended there.)
        if result.orphans and result.outcome is not None:
            result.failures.append(f"orphans: {'; '.join(result.orphans)}")
        _clean_up(home)
    if result.ok:
        shutil.rmtree(home, ignore_errors=True)
    return result


def _clean_up(home: Path) -> None:
    provider = LocalProvider(home / "local", terminate_grace_s=1)
    for instance in provider.list():
        with contextlib.suppress(Exception):
            provider.terminate(instance.instance_id)
    for pids in live_instance_processes(f"{home / 'local' / 'instances'}/").values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _run(plane: Plane, monitor: Monitor, result: Result, phase: str, kill_point: str,
         cfg: Config, reference: bytes) -> None:
    failpoint = None if kill_point == "outside" else kill_point
    plane.start(failpoint=failpoint)
    api = httpx.Client(base_url=plane.url, headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=20)
    try:
        _drive(plane, api, monitor, result, phase, failpoint, cfg, reference)
    finally:
        api.close()


def _drive(plane: Plane, api: httpx.Client, monitor: Monitor, result: Result, phase: str,
           failpoint: str | None, cfg: Config, reference: bytes) -> None:
    def job() -> dict[str, Any]:
        response = api.get(f"/api/v1/jobs/{job_id}")
        response.raise_for_status()
        return dict(response.json())

    body = {
        "name": f"crash-{phase}", "expected_duration_hours": 0.01,
        "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1},
        "command": (f"{sys.executable} -m gpuscout.examples.linreg --steps {cfg.steps} "
                    f"--seed {cfg.seed} --step-sleep {cfg.step_sleep_s} "
                    f"--checkpoint-every {cfg.checkpoint_every}"),
    }
    response = api.post("/api/v1/jobs", json=body)
    if response.status_code != 201:
        raise Check(f"submit: {response.status_code} {response.text}")
    job_id = response.json()["id"]
    wait_for(lambda: job()["status"] == "running", cfg.timeout_s, "the job to run")
    old_instance = job()["instance_id"]

    # A move that must happen whatever the market says: to the cheapest other
    # GPU offer, confirmed if it is dearer (the scout, every hour, stays out).
    current = job()["offer_id"]
    offers = api.get("/api/v1/offers", params={"available": "true"}).json()["data"]
    target = min((o for o in offers if o["id"] != current and o["gpus"] >= 1),
                 key=lambda o: (o["cost_per_work_hour"], o["id"]))
    moved: httpx.Response | None
    try:
        moved = api.post(f"/api/v1/jobs/{job_id}/migrate",
                            json={"offer_id": target["id"], "confirm_dearer": True})
    except httpx.TransportError:
        # A failpoint early in the move may kill the plane before it answers.
        if failpoint is None or plane.wait_dead(10) is None:
            raise
        moved = None
    if moved is not None and moved.status_code != 202:
        raise Check(f"migrate: {moved.status_code} {moved.text}")
    migration_id = moved.json()["id"] if moved is not None else None

    if failpoint is None:  # BOOTING lasts the boot delay: kill from outside
        def in_phase() -> bool:
            moves = api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
            return any(m["id"] == migration_id and m["phase"] == phase for m in moves)

        wait_for(in_phase, cfg.timeout_s, f"the move to reach {phase}", poll_s=0.02)
        plane.kill()
    else:
        def dead_or_over() -> tuple[int | None] | None:
            code = plane.wait_dead(0.05)
            if code is not None:
                return (code,)
            with contextlib.suppress(httpx.HTTPError, StopIteration):
                moves = api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
                move = next(m for m in moves if m["id"] == migration_id)
                if move["status"] != "in_progress":
                    return (None,)  # the move ended and the failpoint never fired
            return None

        (code,) = wait_for(dead_or_over, cfg.timeout_s, f"failpoint {failpoint}", poll_s=0.05)
        if code is None:
            raise Check(f"killed: failpoint {failpoint} not reached: the move ended")
        if code != -signal.SIGKILL:
            raise Check(f"killed: gpuscout up exited with {code}, not by SIGKILL")

    # What the dead plane left in its database.
    repo = open_repository(f"sqlite:///{plane.home / 'gpuscout.db'}")
    try:
        moves_left = repo.list_migrations(job_id=job_id)
        if len(moves_left) != 1:
            raise Check(f"killed: {len(moves_left)} moves recorded, expected 1")
        left = moves_left[0]
        migration_id = left.id
        step_at_kill = repo.get_job(job_id).progress.step
    finally:
        repo.engine.dispose()
    result.killed_in = left.phase.value
    if left.phase.value != phase or left.status.value != "in_progress":
        raise Check(f"killed: the move was {left.status.value} in {left.phase.value}, "
                    f"not in progress in {phase}")
    in_flight = left.checkpoint_step
    time.sleep(cfg.dead_s)

    restarted = time.monotonic()
    result.up_s = plane.start()
    up_at = time.time()
    moves = api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
    move = next(m for m in moves if m["id"] == migration_id)
    result.outcome = {"completed": "rolled forward", "failed": "rolled back"}.get(
        move["status"], move["status"])
    available = api.get("/api/v1/offers", params={"available": "true"}).json()["data"]
    result.target_blocked = target["id"] not in {o["id"] for o in available}

    def training() -> bool:
        j = job()
        return j["status"] == "completed" or (
            j["status"] == "running" and (j["progress"]["step"] or 0) > step_at_kill)

    wait_for(training, cfg.timeout_s, "the job to train again")
    result.train_s = time.monotonic() - restarted
    final = wait_for(lambda: (j := job())["status"] in ("completed", "failed", "cancelled")
                     and j, cfg.timeout_s, "the job to finish")
    finished_at = _timestamp(final.get("finished_at")) or time.time()
    # None left once it finished (terminated with the job).
    try:
        wait_for(lambda: not monitor.live(), 30, "the job's instances to be gone")
    except TimeoutError:
        raise Check(f"one: instances still alive 30 s after the job finished: "
                    f"{sorted(monitor.live())}") from None

    failures = result.failures
    expected = "rolled forward" if phase in ROLLS_FORWARD else "rolled back"
    if result.outcome != expected:
        failures.append(f"outcome: {result.outcome}, expected {expected} "
                        f"(error: {move.get('error')})")
    if final["status"] != "completed":
        failures.append(f"completed: job is {final['status']}: {final.get('error')}")
    else:
        model = api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json").content
        if model != reference:
            failures.append(f"exact: model.json differs from the uninterrupted run's "
                            f"({model[:80]!r}...)")

    # Steps: who trained the job to the end, and from where.
    instances = api.get("/api/v1/instances", params={"job_id": job_id}).json()["data"]
    ended_on = final.get("instance_id") or (instances[-1]["id"] if instances else None)
    traces = monitor.traces
    old = traces.get(old_instance, Trace())
    new_id = move.get("to_instance_id")
    new = traces.get(new_id or "", Trace())
    if not old.first_steps:
        failures.append(f"steps: the monitor never saw {old_instance}'s agent train")
    elif ended_on == old_instance:
        result.lost_steps = 0
        if len(old.first_steps) > 1:
            result.lost_steps = old.max_step - (max(old.first_steps) - 1)
            failures.append(f"steps: the old instance's workload restarted "
                            f"(first steps {sorted(old.first_steps)})")
        result.discarded_steps = max(0, new.max_step - (in_flight or new.max_step))
    elif ended_on == new_id and not new.first_steps:
        failures.append(f"steps: the monitor never saw the replacement {new_id}'s agent train")
    elif ended_on == new_id:
        resumed_after = min(new.first_steps) - 1
        result.lost_steps = max(0, old.max_step - resumed_after)
        if move["checkpoint_step"] is None or resumed_after != move["checkpoint_step"]:
            failures.append(f"steps: the replacement resumed after step {resumed_after}, "
                            f"the move's checkpoint is {move['checkpoint_step']}")
        if in_flight is not None and resumed_after < in_flight:
            failures.append(f"steps: resumed after {resumed_after}, before the checkpoint "
                            f"in flight ({in_flight})")
        if result.lost_steps:
            failures.append(f"steps: the old instance ran to step {old.max_step}, the "
                            f"replacement resumed after {resumed_after}")
    else:
        failures.append(f"steps: the job ended on {ended_on}, neither the old instance "
                        f"{old_instance} nor the replacement {new_id}")

    # Instances: exactly one with live processes from the restart until the
    # job finished (none after: waited for above).
    during = [live for t, live in monitor.samples if up_at + cfg.settle_s <= t
              and t < finished_at - 0.5]
    result.max_live_after = max((len(s) for s in during), default=0)
    result.second_instance_s = max((t - up_at for t, s in monitor.samples
                                    if t >= up_at and len(s) > 1), default=0.0)
    if not during:
        failures.append("one: no sample of the instances between the restart and the "
                        "job's end (a job too short for this check)")
    if any(len(s) != 1 for s in during):
        counts = sorted({len(s) for s in during})
        failures.append(f"one: {counts} instances alive at once after the restart "
                        f"({_overlap(monitor.samples, up_at)})")
    # The repair undoes or finishes the move itself: an instance of the job
    # that the reaper had to find and terminate was orphaned by it.
    events = api.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    reaped = [e["message"] for e in events if e["kind"] == "reaped"]
    if reaped:
        failures.append(f"orphans: left to the reaper: {'; '.join(reaped)}")
    # Rows: each says terminated (or failed) once its processes are gone (a
    # terminate in progress writes it when the provider returns).
    def live_rows() -> list[tuple[str, str]]:
        rows = api.get("/api/v1/instances", params={"job_id": job_id}).json()["data"]
        return [(i["id"], i["status"]) for i in rows
                if i["status"] not in ("terminated", "failed")]

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not live_rows(), 10, "the job's instance rows to be terminal", 0.2)
    if rows := live_rows():
        failures.append(f"one: instance rows still live 10 s after the job finished: {rows}")


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _overlap(samples: list[tuple[float, frozenset[str]]], up_at: float) -> str:
    """When, after the restart, more than one instance was alive."""
    extra = [(t - up_at, sorted(s)) for t, s in samples if t >= up_at and len(s) > 1]
    if not extra:
        return "none"
    return f"from +{extra[0][0]:.2f}s to +{extra[-1][0]:.2f}s: {extra[-1][1]}"


# --- the matrix -------------------------------------------------------------------


def run_matrix(phases: tuple[str, ...], runs: int, cfg: Config, workdir: Path,
               progress: Callable[[Result], None] | None = None) -> list[Result]:
    reference = reference_model(workdir, cfg)
    results = []
    for phase in phases:
        points = KILL_POINTS[phase]
        for run in range(1, runs + 1):
            result = run_case(phase, points[(run - 1) % len(points)], cfg, workdir,
                              reference, run=run)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def render(results: list[Result], runs: int) -> str:
    phases = list(dict.fromkeys(r.phase for r in results))
    width = max(20, *(len(r.cell()) for r in results))
    lines = ["phase          " + "".join(f"run {i:<{width - 3}}" for i in range(1, runs + 1))]
    for phase in phases:
        cells = [r.cell() for r in results if r.phase == phase]
        lines.append(f"{phase:<15}" + "".join(f"{c:<{width + 1}}" for c in cells))
    lines.append("")
    lines.append(f"{'phase':<14} {'run':>3}  {'kill point':<18} {'killed in':<14} "
                 f"{'repair':<15} {'up s':>5} {'train s':>7} {'lost':>4} {'disc':>4} "
                 f"{'2nd s':>5} {'blocked':>7}  result")
    for r in results:
        lines.append(
            f"{r.phase:<14} {r.run:>3}  {r.kill_point:<18} {r.killed_in or '-':<14} "
            f"{r.outcome or '-':<15} {_num(r.up_s):>5} {_num(r.train_s):>7} "
            f"{'-' if r.lost_steps is None else r.lost_steps:>4} {r.discarded_steps:>4} "
            f"{_num(r.second_instance_s):>5} "
            f"{'-' if r.target_blocked is None else 'yes' if r.target_blocked else 'no':>7}  "
            f"{'ok' if r.ok else 'FAIL'}")
    failed = [r for r in results if not r.ok]
    if failed:
        lines.append("")
        for r in failed:
            lines.append(f"{r.phase} run {r.run} ({r.kill_point}), home {r.home}:")
            lines.extend(f"  - {f}" for f in r.failures)
    passed = len(results) - len(failed)
    lines.append("")
    lines.append("up s / train s: from the restart until the API answers (the repair is done) / "
                 "until the job trains past its step at the kill; lost: steps lost beyond the "
                 "checkpoint in flight; disc: steps a rolled-back replacement ran past it "
                 "(thrown away); 2nd s: how long after the restarted API answered a second "
                 "instance of the job still had processes; blocked: the move's target offer "
                 "left unavailable to every job after the repair")
    lines.append(f"{passed} of {len(results)} runs passed")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per phase (default 3)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated phases (default: all six)")
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--step-sleep", type=float, default=Config.step_sleep_s)
    parser.add_argument("--boot-delay", type=float, default=Config.boot_delay_s)
    parser.add_argument("--dead", type=float, default=Config.dead_s,
                        help="seconds the plane stays dead before its restart")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the runs' homes go (default: a temporary folder, "
                             "removed unless a run failed; a failed run's home is kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    cfg = Config(steps=args.steps, step_sleep_s=args.step_sleep, boot_delay_s=args.boot_delay,
                 dead_s=args.dead)

    def progress(r: Result) -> None:
        print(f"{r.phase:<14} run {r.run} ({r.kill_point}): "
              f"{'ok' if r.ok else 'FAIL ' + '; '.join(r.failures)}", file=sys.stderr,
              flush=True)

    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpuscout-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_matrix(phases, args.runs, cfg, workdir, progress)
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=1))
    else:
        print(render(results, args.runs))
        print(f"({time.monotonic() - started:.0f} s; {len(phases)} phase(s) x "
              f"{args.runs} run(s), boot delay {cfg.boot_delay_s:g} s, "
              f"{cfg.steps} steps of {cfg.step_sleep_s:g} s)")
    ok = all(r.ok for r in results)
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
