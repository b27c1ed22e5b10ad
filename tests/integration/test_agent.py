"""The real agent (``python -m gpuscout.agent``) as a subprocess on loopback,
running the real example job against a file store: health and progress,
checkpoint-and-pause at a step boundary, resume, a standby replacement
restored mid-run that ends with the uninterrupted run's model bit for bit,
forwarding to the job's endpoints, tokens, and no process left behind."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuscout.agent import protocol as p
from gpuscout.examples import linreg
from gpuscout.joblog import read_instance
from gpuscout.store import open_store

JOB_ID = "job-1"
TOKEN = "s3cret-token"
MODEL_KEY = f"{p.artifacts_prefix(JOB_ID)}/model.json"


def linreg_command(steps: int, *, seed: int = 5, sleep: float = 0.02, every: int = 10) -> str:
    return (f"{shlex.quote(sys.executable)} -m gpuscout.examples.linreg --steps {steps} "
            f"--step-sleep {sleep} --seed {seed} --checkpoint-every {every}")


def reference(seed: int, steps: int) -> bytes:
    return linreg.encode_model(*linreg.train(seed, steps), steps)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- processes, read from /proc ----------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[3])


def alive(pid: int) -> bool:
    """Running; a zombie (exited, not reaped by a non-reaping init) is gone."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def job_processes(agent_pid: int) -> set[int]:
    """The agent's children and everything in the sessions they lead."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    leaders = {pid for pid, (_, ppid, _) in table.items() if ppid == agent_pid}
    return {pid for pid, (state, _, sid) in table.items()
            if (sid in leaders or pid in leaders) and state != "Z"}


# --- the agent under test ------------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    url: str
    token: str | None
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def call(self, method: str, path: str, *, json: Any = None, auth: bool = True,
             timeout: float = 30) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        return self.client.request(method, path, json=json, headers=headers, timeout=timeout)

    def health(self) -> dict[str, Any]:
        answer = self.client.get("/agent/health")
        assert answer.status_code == 200
        return dict(answer.json())

    def wait(self, ready: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if ready(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {health}\n{self.log_text()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def start_agent(tmp_path: Path, store_url: str) -> Iterator[Callable[..., Agent]]:
    """Start agents; at the end stop each (SIGTERM, then SIGKILL) and kill
    whatever of their jobs is left, so no test leaks a process."""
    agents: list[Agent] = []

    def start(command: str, *, instance_id: str = "i-a", standby: bool = False,
              token: str | None = None, wait_up: bool = True,
              mode: str | None = "library", env: dict[str, str] | None = None) -> Agent:
        """``mode``: how an earlier instance found the job checkpoints
        (agent/ckptdir.py); a replacement starts a library job's command at
        once, in standby, and any other's only on the restored folder."""
        if mode is not None:
            open_store(store_url).put(p.checkpoint_mode_key(JOB_ID), mode.encode())
        port = free_port()
        workdir = tmp_path / instance_id
        workdir.mkdir(exist_ok=True)
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
        env.update(extra)
        env.update({
            p.ENV_INSTANCE_ID: instance_id, p.ENV_JOB_ID: JOB_ID,
            p.ENV_AGENT_HOST: "127.0.0.1", p.ENV_AGENT_PORT: str(port),
            p.ENV_STORE_URL: store_url, p.ENV_COMMAND: command,
            p.ENV_STANDBY: "1" if standby else "0", p.ENV_WORKDIR: str(workdir),
        })
        if token:
            env[p.ENV_AGENT_TOKEN] = token
        log = tmp_path / f"{instance_id}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gpuscout.agent"], env=env,
                                    stdout=out, stderr=out)
        agent = Agent(proc, f"http://127.0.0.1:{port}", token, log)
        agents.append(agent)
        if wait_up:
            deadline = time.monotonic() + 20
            while True:
                try:
                    agent.health()
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, agent.log_text()
                    assert time.monotonic() < deadline, agent.log_text()
                    time.sleep(0.02)
        return agent

    yield start
    for agent in agents:
        leftovers = job_processes(agent.proc.pid) if agent.proc.poll() is None else set()
        if agent.proc.poll() is None:
            agent.proc.terminate()
            try:
                agent.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(timeout=5)
        for pid in leftovers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        agent.client.close()


def model(store_url: str) -> bytes:
    return open_store(store_url).get(MODEL_KEY)


# --- the tests ---------------------------------------------------------------


def test_agent_runs_the_job_reports_progress_and_forwards_its_endpoints(
    start_agent: Callable[..., Agent], store_url: str
) -> None:
    agent = start_agent(linreg_command(40))
    health = agent.wait(lambda h: h["state"] == "running" and h["step"] >= 2, "first steps")
    assert (health["instance_id"], health["job_id"], health["total_steps"]) == ("i-a", JOB_ID, 40)
    assert health["first_step"] == 1 and health["first_step_at"] <= health["last_step_at"]
    assert isinstance(health["loss"], float)

    status = agent.call("GET", "/status")
    assert status.status_code == 200
    assert status.headers["x-gpuscout-instance-id"] == "i-a"
    assert status.json()["instance_id"] == "i-a" and status.json()["total_steps"] == 40
    predicted = agent.call("POST", "/predict", json={"x": [[0.5] * 8]})
    assert predicted.status_code == 200 and len(predicted.json()["y"]) == 1
    bad = agent.call("POST", "/predict", json={"x": [[0.5] * 3]})
    assert bad.status_code == 400 and "8 numbers" in bad.json()["error"]

    health = agent.wait(lambda h: h["state"] == "completed", "completion")
    assert health["exit_code"] == 0 and health["step"] == 40
    assert health["last_checkpoint_step"] == 40
    assert model(store_url) == reference(5, 40)
    # the job is done and its server with it: the agent still answers for it
    gone = agent.call("GET", "/status")
    assert gone.status_code == 503 and "not up" in gone.json()["error"]


def test_checkpoint_pauses_at_the_next_step_boundary_and_resume_goes_on(
    start_agent: Callable[..., Agent], store_url: str
) -> None:
    agent = start_agent(linreg_command(60))
    agent.wait(lambda h: h["state"] == "running" and h["step"] >= 3, "first steps")

    asked = time.monotonic()
    answer = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    answered_in = time.monotonic() - asked
    assert answer.status_code == 200, answer.text
    step, key = answer.json()["step"], answer.json()["key"]
    assert 3 <= step < 60 and key
    print(f"\n/agent/checkpoint(pause) answered in {answered_in * 1000:.1f} ms at step {step}")
    assert answered_in < 2.0

    health = agent.health()
    assert health["state"] == "paused" and health["step"] == step
    assert health["last_checkpoint_step"] == step and health["last_checkpoint_key"] == key
    assert health["last_step_at"] == answer.json()["last_step_at"]
    time.sleep(0.4)  # twenty step times: nothing may move while paused
    assert agent.health()["step"] == step
    assert agent.call("GET", "/status").json()["step"] == step
    # asking again while paused answers at once with the same checkpoint
    again = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 1})
    assert again.status_code == 200 and again.json()["key"] == key

    assert agent.call("POST", "/agent/resume").status_code == 200
    agent.wait(lambda h: h["state"] == "running" and h["step"] > step, "steps after resume")
    health = agent.wait(lambda h: h["state"] == "completed", "completion")
    assert health["exit_code"] == 0
    assert model(store_url) == reference(5, 60)


@pytest.mark.parametrize("named_step", [True, False], ids=["named-step", "latest"])
def test_standby_replacement_resumes_after_the_checkpoint_and_ends_identical(
    start_agent: Callable[..., Agent], store_url: str, named_step: bool
) -> None:
    # make-before-break: the replacement boots in standby while the old trains
    old = start_agent(linreg_command(120), instance_id="i-old")
    new = start_agent(linreg_command(120), instance_id="i-new", standby=True)
    old.wait(lambda h: h["state"] == "running" and h["step"] >= 8, "old instance training")
    time.sleep(0.5)  # time for its workload to start and ask for its target
    health = new.health()
    assert health["state"] == "standby" and health["step"] is None

    answer = old.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    time.sleep(0.2)
    assert new.health()["state"] == "standby"  # standby waits for /agent/restore only

    released = time.time()
    restore = new.call("POST", "/agent/restore", json={"step": step if named_step else None})
    assert restore.status_code == 202, restore.text
    health = new.wait(lambda h: h["state"] == "running" and h["step"] > step, "first step")
    assert health["first_step"] == step + 1
    first_step_s = health["first_step_at"] - released
    print(f"\n/agent/restore -> first step done on the replacement: {first_step_s * 1000:.1f} ms"
          f" (step {step + 1}, includes one 20 ms step)")
    assert first_step_s < 2.0
    # a retried restore is harmless; another step is refused
    assert new.call("POST", "/agent/restore",
                    json={"step": step if named_step else None}).status_code == 202
    assert new.call("POST", "/agent/restore", json={"step": step + 5}).status_code == 409

    assert old.health()["step"] == step  # the old side never ran past the checkpoint
    old_pids = job_processes(old.proc.pid)
    assert old_pids
    assert old.call("POST", "/agent/stop").status_code == 202
    stopped = old.wait(lambda h: h["state"] == "failed", "old side stopped")
    assert stopped["error"].startswith("stopped on request")
    assert not any(alive(pid) for pid in old_pids)

    health = new.wait(lambda h: h["state"] == "completed", "replacement completes")
    assert health["exit_code"] == 0 and health["first_step"] == step + 1
    assert model(store_url) == reference(5, 120)


def test_restore_of_a_missing_step_fails_the_replacement(
    start_agent: Callable[..., Agent],
) -> None:
    new = start_agent(linreg_command(50), instance_id="i-new", standby=True)
    assert new.call("POST", "/agent/restore", json={"step": 30}).status_code == 202
    health = new.wait(lambda h: h["state"] == "failed", "replacement fails")
    assert health["exit_code"] == 1 and health["step"] is None
    # The job's stderr is in its error (and its log), not in the agent's log.
    assert "NoCheckpoint" in health["error"]
    assert "NoCheckpoint" not in new.log_text()


def test_restore_of_a_missing_step_fails_a_folder_jobs_replacement(
    start_agent: Callable[..., Agent],
) -> None:
    new = start_agent("sleep 30", instance_id="i-new", standby=True, mode="dir")
    assert new.call("POST", "/agent/restore", json={"step": 30}).status_code == 202
    health = new.wait(lambda h: h["state"] == "failed", "replacement fails")
    assert health["error"] == (
        "command could not start: could not restore the checkpoint of step 30 into "
        "GPUSCOUT_CHECKPOINT_DIR: no checkpoint of step 30 under jobs/job-1/checkpoints/")
    assert health["failed_phase"] == "command" and health["checkpoint_mode"] == "dir"


def test_sigterm_to_a_standby_agent_ends_its_waiting_workload(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent(linreg_command(50), standby=True)
    time.sleep(0.8)  # its workload is up and long-polling for a restore target
    pids = job_processes(agent.proc.pid)
    assert pids
    stopping = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=15) == 0, agent.log_text()
    assert time.monotonic() - stopping < 5
    assert not [pid for pid in pids if alive(pid)]


def test_workload_without_progress_reports(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent("sleep 30")
    answer = agent.call("GET", "/status")
    assert answer.status_code == 503 and answer.json()["error"] == "the workload's server is not up"
    timeout = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 0.2})
    assert timeout.status_code == 504
    assert agent.health()["state"] == "starting"
    assert agent.call("GET", "/agent/nope").status_code == 404
    assert agent.call("POST", "/agent/restore", json={"step": 3}).status_code == 409
    bad = agent.call("POST", "/agent/checkpoint", json={"timeout_s": -1})
    assert bad.status_code == 422 and "timeout_s" in bad.text


@pytest.mark.parametrize(
    ("command", "state", "code"), [("true", "completed", 0), ("exit 3", "failed", 3)]
)
def test_exit_code_is_recorded(
    start_agent: Callable[..., Agent], command: str, state: str, code: int
) -> None:
    agent = start_agent(command)
    health = agent.wait(lambda h: h["state"] == state, state)
    assert health["exit_code"] == code
    refused = agent.call("POST", "/agent/checkpoint", json={"timeout_s": 1})
    assert refused.status_code == 409 and "not running" in refused.json()["error"]


def test_token_guards_calls_that_change_state(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent("sleep 30", token=TOKEN)
    assert agent.call("GET", "/agent/health", auth=False).status_code == 200
    for path in ("/agent/checkpoint", "/agent/resume", "/agent/restore", "/agent/stop"):
        assert agent.call("POST", path, json={}, auth=False).status_code == 401, path
        wrong = agent.client.post(path, json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    assert agent.call("POST", "/agent/resume").status_code == 200
    # the workload's own loopback calls need no token
    progress = agent.client.post("/workload/progress", json={"step": 1, "loss": 0.5})
    assert progress.status_code == 200 and progress.json() == {"action": "continue"}


def test_sigterm_stops_the_whole_job_and_the_agent(start_agent: Callable[..., Agent]) -> None:
    # a background process in the job's command must go too
    agent = start_agent(f"sleep 300 & {linreg_command(100000)}")
    agent.wait(lambda h: h["state"] == "running", "training")
    pids = job_processes(agent.proc.pid)
    assert len(pids) >= 2, pids  # bash, sleep, python (or sleep + python)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=15) == 0, agent.log_text()
    assert not [pid for pid in pids if alive(pid)]


def test_bad_configuration_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
    env.update({p.ENV_JOB_ID: JOB_ID, p.ENV_STORE_URL: (tmp_path / "s").as_uri()})
    done = subprocess.run([sys.executable, "-m", "gpuscout.agent"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"{p.ENV_COMMAND} is required" in done.stderr
    env.update({p.ENV_COMMAND: "true", p.ENV_AGENT_PORT: "http"})
    done = subprocess.run([sys.executable, "-m", "gpuscout.agent"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and p.ENV_AGENT_PORT in done.stderr


def test_logs_are_not_one_line_per_step(start_agent: Callable[..., Agent],
                                        store_url: str) -> None:
    agent = start_agent(linreg_command(30, sleep=0.0))
    agent.wait(lambda h: h["state"] == "completed", "completion")
    text = agent.log.read_text()
    assert "/workload/progress" not in text
    assert "state running -> completed" in text
    # What the job prints goes to the job's log in the store (shipped before
    # the agent reports the command's end), never to the agent's own log.
    assert "trained 30 steps" not in text
    job_log, _ = read_instance(open_store(store_url), JOB_ID, "i-a")
    assert any(line.endswith("trained 30 steps") or "trained 30 steps" in line
               for line in job_log), job_log


def test_a_restore_that_skips_a_damaged_checkpoint_says_which(
    start_agent: Callable[..., Agent], store_url: str
) -> None:
    from gpuscout.workload.checkpoint import CheckpointStore

    first = start_agent(linreg_command(200, every=10), instance_id="i-first")
    first.wait(lambda h: (h["last_checkpoint_step"] or 0) >= 30, "checkpoints")
    assert first.call("POST", "/agent/stop").status_code == 202
    first.wait(lambda h: h["state"] == "failed", "stopped")
    store = open_store(store_url)
    newest, previous = CheckpointStore(store, p.checkpoint_prefix(JOB_ID)).list()[-2:][::-1]
    store.put(f"{newest.key}/state.json", b"{}")  # altered after its manifest

    second = start_agent(linreg_command(200, every=10), instance_id="i-second")
    health = second.wait(lambda h: h["state"] == "running", "running")
    assert health["first_step"] == previous.step + 1
    assert [c["key"] for c in health["skipped_checkpoints"]] == [newest.key]
    assert "state.json" in health["skipped_checkpoints"][0]["reason"]
    assert second.wait(lambda h: h["state"] == "completed", "completion")["exit_code"] == 0
    assert model(store_url) == reference(5, 200)
