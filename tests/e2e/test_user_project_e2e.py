"""A user's own project, end to end, as a new user runs it: `gpuscout up`
started from a shell whose PATH does not hold the virtual environment, a
project folder with a train.py that imports gpuscout.workload and numpy, a
requirements.txt installed by `setup`, envs and a secret; submitted with the
CLI as written in the README; moved by the scout and by hand; completed
with the model of a standalone run; its log read and followed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuscout.providers.code_bundle import build_wheel
from tests.e2e.conftest import wait

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
GPUSCOUT = VENV_BIN / "gpuscout"  # the README's `.venv/bin/gpuscout`
CANARY = "canary-8c1f0e5d-secret-value"
STEPS = 400

TRAIN_PY = """\
import json, os, sys, time
import numpy as np
from gpuscout import workload

TOTAL = int(sys.argv[1])
assert not os.path.exists("data/big.bin"), "ignored files must not be shipped"
print("python", sys.executable, "label", os.environ.get("RUN_LABEL"), flush=True)
if os.path.isdir("wheels"):
    import hello_pkg  # installed by setup, from the project's wheels/ folder
    print("hello_pkg", hello_pkg.GREETING, flush=True)
print("the secret is", os.environ["WANDB_API_KEY"], flush=True)

run = workload.init(checkpoint_every=20)
restored = run.restore()
start, state = restored if restored else (0, {"w": [0.0, 0.0]})
w = np.array(state["w"])
target = np.array([3.0, -2.0])
for step in range(start + 1, TOTAL + 1):
    rng = np.random.default_rng(step)
    w = w - 0.05 * (w - target) + rng.normal(0, 1e-3, 2)
    loss = float(((w - target) ** 2).sum())
    if step % 10 == 0:
        print(f"step {step} loss {loss:.6f}", flush=True)
    time.sleep(0.04)
    run.step_done(step, loss=loss, total_steps=TOTAL, state=lambda: {"w": w.tolist()})
run.save_artifact("model.json", json.dumps({"w": w.tolist()}).encode())
print("done", flush=True)
"""

JOB_YAML = f"""\
name: my-project
workdir: .
setup: >-
  pip install -r requirements.txt &&
  pip install --no-index --no-deps wheels/hello_pkg-0.1-py3-none-any.whl &&
  python -c "import numpy; print('setup ok')"
command: python train.py {STEPS}
envs:
  RUN_LABEL: hello
resources: {{gpus: 1, cpus: 1, memory_gb: 1}}
expected_duration_hours: 0.01
budget_usd: 5
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _project(root: Path) -> Path:
    project = root / "my project"
    (project / "data").mkdir(parents=True)
    (project / "train.py").write_text(TRAIN_PY)
    (project / "requirements.txt").write_text("numpy\n")
    (project / ".gitignore").write_text("data/\n")
    (project / "data" / "big.bin").write_bytes(b"\0" * 1024)
    (project / "job.yaml").write_text(JOB_YAML)
    # A package of the user's own, installed by setup into the job's own
    # environment on each instance (never into GPU Scout's).
    package = root / "hello_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("GREETING = 'hi from hello_pkg'\n")
    wheel = build_wheel(package, name="hello_pkg", version="0.1",
                        metadata="Metadata-Version: 2.1\nName: hello_pkg\nVersion: 0.1\n")
    (project / "wheels").mkdir()
    (project / "wheels" / wheel.filename).write_bytes(wheel.data)
    return project


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`gpuscout up` in a shell without the venv on PATH (and no VIRTUAL_ENV)."""
    home, port = tmp_path / "home", _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPUSCOUT_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=str(tmp_path), GPUSCOUT_HOME=str(home),
               GPUSCOUT_BOOT_DELAY_S="1", GPUSCOUT_MIN_DWELL_S="0",
               GPUSCOUT_SCOUT_INTERVAL_S="1", GPUSCOUT_RECONCILE_INTERVAL_S="0.2")
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([str(GPUSCOUT), "up", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _up(url) or proc.poll() is not None, 60, "gpuscout up")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        token = (home / "api_token").read_text().strip()
        yield {"url": url, "env": env, "home": home, "token": token,
               "api": httpx.Client(base_url=url, timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        subprocess.run(["pkill", "-f", str(home)], check=False)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _cli(plane: dict[str, Any], *args: str, cwd: Path, **extra_env: str) -> str:
    env = {**plane["env"], "GPUSCOUT_URL": plane["url"], **extra_env}
    done = subprocess.run([str(GPUSCOUT), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _the_jobs_own(lines: list[str]) -> list[str]:
    """A job's log lines without the markers and without what a replacement
    ran under a move that did not complete: "rolled back", or still
    "moving" when the log was read (a move the job's end cut short, not yet
    rolled back)."""
    kept, own = True, []
    for line in lines:
        if line.startswith("-- "):
            kept = "rolled back" not in line and not line.startswith("-- moving from")
        elif kept:
            own.append(line)
    return own


def test_a_users_project_runs_moves_and_completes_with_its_logs(
        plane: dict[str, Any], tmp_path: Path) -> None:
    api: httpx.Client = plane["api"]
    project = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The README's words: export the token, submit the job file (workdir: .
    # is the job file's folder, wherever the command runs).
    plane["env"]["GPUSCOUT_API_TOKEN"] = plane["token"]
    # The secret comes from the shell, not the job file (which ships with
    # the project folder), as SkyPilot's --secret does.
    job_id = _cli(plane, "submit", str(project / "job.yaml"), "--secret", "WANDB_API_KEY",
                  cwd=elsewhere, WANDB_API_KEY=CANARY).strip()

    followed: list[str] = []
    follower = threading.Thread(target=lambda: followed.extend(
        _cli(plane, "logs", job_id, "--follow", cwd=elsewhere).splitlines()), daemon=True)
    follower.start()

    def job() -> dict[str, Any]:
        return api.get(f"/api/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def step_at_least(n: int) -> bool:
        j = job()
        assert j["status"] not in ("failed", "cancelled"), j
        return j["status"] == "running" and (j["progress"]["step"] or 0) >= n

    wait(lambda: step_at_least(30), 120, "the job to run")
    # A scout move: another offer becomes much cheaper.
    current = job()["offer_id"]
    offers = api.get("/api/v1/offers").json()["data"]
    target = next(o for o in offers if o["id"] != current and o["gpus"] >= 1
                  and o["available"] and o["capacity"] == "spot")
    _cli(plane, "market", "set", target["id"], "--price", "0.001", cwd=elsewhere)
    wait(lambda: any(m["status"] == "completed"
                     for m in api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]),
         120, "the scout's move")
    moved_at = job()["progress"]["step"]
    wait(lambda: step_at_least(moved_at + 10), 60, "training after the move")
    # A user's move to a named offer, whatever it costs (the scout's target
    # is now the cheapest): --yes confirms without a terminal.
    here = job()["offer_id"]
    other = next(o["id"] for o in api.get("/api/v1/offers").json()["data"]
                 if o["id"] != here and o["gpus"] >= 1 and o["available"])
    _cli(plane, "migrate", job_id, "--to", other, "--yes", cwd=elsewhere)
    wait(lambda: sum(m["status"] == "completed" for m in
                     api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]) >= 2,
         120, "the manual move")
    final = wait(lambda: job() if job()["status"] in ("completed", "failed") else None, 120,
                 "completion")
    assert final["status"] == "completed", final
    moves = api.get(f"/api/v1/jobs/{job_id}/migrations").json()["data"]
    completed = sum(m["status"] == "completed" for m in moves)
    # (The scout may move the job back to the cheap offer after the manual
    # move: no dwell here; a move the job's end cut short is rolled back.)
    assert completed >= 2 and all(m["status"] != "in_progress" for m in moves)

    # The model equals a standalone run's, bit for bit.
    standalone = tmp_path / "standalone"
    standalone.mkdir()
    subprocess.run([sys.executable, str(project / "train.py"), str(STEPS)], cwd=standalone,
                   check=True, timeout=120, capture_output=True,
                   env={**plane["env"], "WANDB_API_KEY": "x" * 8,
                        "PYTHONPATH": str(tmp_path)})  # (hello_pkg's folder)
    artifact = api.get(f"/api/v1/jobs/{job_id}/artifacts/model.json")
    assert artifact.status_code == 200
    assert json.loads(artifact.content) == json.loads((standalone / "model.json").read_text())

    # One log across the three instances: setup output on each, the job's
    # python, steps in order, a marker per placement and move, no secret.
    text = _cli(plane, "logs", job_id, cwd=elsewhere)
    lines = text.splitlines()
    assert lines[0].startswith("-- placed on i-")
    assert sum(line.startswith("-- moved from i-") for line in lines) == completed
    assert sum(line.endswith("setup ok") for line in lines) >= completed + 1
    assert any("Requirement already satisfied: numpy" in line for line in lines)
    # The job's python: its own environment on the instance, layered on GPU
    # Scout's; what setup installed there is not in GPU Scout's.
    assert any("/jobenv/bin/python label hello" in line for line in lines), text
    assert sum(line.endswith("hello_pkg hi from hello_pkg") for line in lines) >= 3
    assert subprocess.run([sys.executable, "-c", "import hello_pkg"],
                          capture_output=True).returncode != 0
    assert any("the secret is ***" in line for line in lines) and CANARY not in text
    # Each step once, in order (what a rolled-back replacement ran is not the
    # job's: it is under its own marker).
    own = _the_jobs_own(lines)
    steps = [int(line.split("step ")[1].split()[0]) for line in own if " step " in line]
    assert steps == sorted(steps) and steps[-1] == STEPS and len(set(steps)) == len(steps), (
        [m["error"] for m in moves], text)
    # The job's last line is its own "done" (a replacement rolled back after
    # the job ended logs after it, under its marker).
    assert own[-1].endswith("done"), text
    tail = _cli(plane, "logs", job_id, "--tail", "3", cwd=elsewhere).splitlines()
    assert tail == lines[-3:]

    # --follow streamed the lines as they came and ended with the job, once
    # its moves had settled: its last marker is not a move still "moving".
    # (A stream interleaves instances' lines as it finds them: a line an old
    # instance writes after its replacement's marker came out follows it.)
    follower.join(30)
    assert not follower.is_alive()
    assert any(line.endswith("done") for line in followed)
    markers = [line for line in followed if line.startswith("-- ")]
    assert any(m.startswith("-- moved from") for m in markers), followed
    assert not markers[-1].startswith("-- moving from"), followed

    # The canary secret is nowhere but in the job's environment.
    home: Path = plane["home"]
    seen = [api.get(path).text for path in (
        f"/api/v1/jobs/{job_id}", "/api/v1/jobs", f"/api/v1/jobs/{job_id}/events?limit=1000",
        f"/api/v1/jobs/{job_id}/logs", "/metrics", "/api/v1/instances")]
    assert all(CANARY not in body for body in seen)
    assert json.loads(seen[0])["spec"]["secrets"] == ["WANDB_API_KEY"]
    for path in home.rglob("*"):  # the database, user-data, instance logs, the store
        if path.is_file() and path.name != "secrets_key":
            assert CANARY.encode() not in path.read_bytes(), path


CRASHING = """\
import sys
from gpuscout import workload

run = workload.init(checkpoint_every=1)
restored = run.restore()
start = restored[0] if restored else 0
for step in range(start + 1, start + 4):
    run.step_done(step, loss=1.0 / step, total_steps=100, state=lambda: {"step": step})
print("about to fail", flush=True)
raise ValueError(f"boom after step {start + 3}")
"""


def test_a_command_that_raises_restarts_from_its_checkpoint_then_fails(
        e2e: Any, tmp_path: Path) -> None:
    """Real agents and processes: the exception's last line is the job's
    error; with max_restarts_on_errors: 2 it runs three times in all, each
    run resuming from the checkpoint the one before saved."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHING)
    body = {"name": "crash", "command": f"python {script}", "max_restarts_on_errors": 2,
            "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1}}
    response = e2e.api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = e2e.wait(lambda: (j := e2e.job(job_id))["status"] == "failed" and j, 90, "failure")
    assert job["restarts"] == 2
    assert job["error"].startswith("command exited with code 1; last lines of stderr:")
    assert job["error"].splitlines()[-1] == "ValueError: boom after step 9"
    assert job["progress"]["step"] == 9  # 3 steps per run, each run from the last checkpoint
    events = e2e.wait(lambda: [e for e in e2e.api.get(f"/api/v1/jobs/{job_id}/events").json()[
        "data"] if e["kind"] == "failed"] and e2e.api.get(
            f"/api/v1/jobs/{job_id}/events").json()["data"], 10, "the failed event")
    assert [e["kind"] for e in events].count("restart") == 2
    failed = [e for e in events if e["kind"] == "failed"]
    assert len(failed) == 1 and "ValueError: boom after step 9" in failed[0]["message"]
    log = e2e.api.get(f"/api/v1/jobs/{job_id}/logs").text
    assert log.count("about to fail") == 3 and log.count("-- recovered on i-") == 2
    # `logs --follow` ends with the job and, for scripts, says it failed.
    done = subprocess.run([str(GPUSCOUT), "logs", job_id, "--follow"], capture_output=True,
                          text=True, timeout=60, env={**os.environ,
                                                      "GPUSCOUT_URL": e2e.server.url})
    assert done.returncode == 1 and done.stdout.count("about to fail") == 3
    assert done.stderr.strip() == f"error: job {job_id} failed: ValueError: boom after step 9"


REPO = Path(__file__).resolve().parents[2]


def readme_block(after: str) -> str:
    """The fenced block that follows the README line starting with ``after``."""
    text = (REPO / "README.md").read_text()
    start = text.index(after)
    fence = text.index("```", start)
    body = text.index("\n", fence) + 1
    return text[body:text.index("```", body)]


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The README's "Submit your own job" words, copied as they are: `gpuscout
    up` and the commands run by bash from the GPU Scout folder, in a shell
    whose PATH has no virtual environment, with the project in ~/my-project."""
    home = tmp_path / "user"
    project = home / "my-project"
    project.mkdir(parents=True)
    for name in ("train.py", "requirements.txt", "job.yaml"):
        (project / name).write_text(readme_block(f"`~/my-project/{name}`:"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPUSCOUT_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=str(home),
               GPUSCOUT_BOOT_DELAY_S="1")  # (5 s by default)
    port = _free_port()
    up = readme_block("GPU Scout folder, in any shell").strip()
    assert up == ".venv/bin/gpuscout up"
    env["GPUSCOUT_URL"] = f"http://127.0.0.1:{port}"
    env["GPUSCOUT_PORT"] = str(port)
    with (tmp_path / "up.log").open("wb") as log:
        server = subprocess.Popen(["bash", "-c", up], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait(lambda: _up(env["GPUSCOUT_URL"]) or server.poll() is not None, 60, "up")
        assert server.poll() is None, (tmp_path / "up.log").read_text()
        commands = [line.split("#")[0].strip() for line in
                    readme_block("Then, from the GPU Scout folder").splitlines()]
        script = ""
        outputs = []
        job_id = ""
        for command in filter(None, commands):
            command = command.replace("JOB_ID", job_id)
            done = subprocess.run(["bash", "-c", script + command], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            if command.startswith("export "):
                script += command + "\n"
            if " submit " in command:
                job_id = done.stdout.strip().splitlines()[-1]
            outputs.append(done.stdout)
        followed = outputs[2].splitlines()
        assert followed[0].startswith("-- placed on i-")
        assert any("Requirement already satisfied: numpy" in line for line in followed)
        assert followed[-1].endswith("step 2000 loss 0.00000") or " step 2000 " in followed[-1]
        assert "completed" in outputs[3]
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        subprocess.run(["pkill", "-f", str(home)], check=False)
