"""Scripts that do not import GPU Scout, under the real agent: the
GPUSCOUT_CHECKPOINT_DIR folder and SIGUSR1 (gpuscout.agent.ckptdir).

The script here is plain Python: a deterministic state (a running hash of
the steps) saved as ``state.json`` then ``STEP``, a SIGUSR1 handler that
saves at the next step boundary and exits 0. Its result after any number of
moves must equal the uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpuscout.agent import protocol as p
from gpuscout.joblog import read_instance
from gpuscout.store import open_store
from gpuscout.workload.checkpoint import CheckpointStore
from tests.integration.test_agent import (
    JOB_ID,
    Agent,
    alive,
    job_processes,
    start_agent,
    store_url,
)

__all__ = ["start_agent", "store_url"]  # test_agent.py's fixtures

SCRIPT = r'''
import hashlib, json, os, signal, sys, time
from pathlib import Path

steps, every, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
handle = sys.argv[4] == "handle"
folder = Path(os.environ["GPUSCOUT_CHECKPOINT_DIR"])
stop = False
if handle:
    def on_usr1(signum, frame):
        global stop
        stop = True
    signal.signal(signal.SIGUSR1, on_usr1)

def save(step, digest):
    (folder / "state.json").write_text(json.dumps({"step": step, "digest": digest}))
    (folder / ".STEP.tmp").write_text(str(step))
    os.replace(folder / ".STEP.tmp", folder / "STEP")

step, digest = 0, ""
if (folder / "STEP").exists():
    state = json.loads((folder / "state.json").read_text())
    step, digest = state["step"], state["digest"]
    print(f"resumed at {step}", flush=True)
while step < steps:
    step += 1
    digest = hashlib.sha256(f"{digest}:{step}".encode()).hexdigest()
    time.sleep(sleep)
    if stop:
        save(step, digest)
        print(f"saved {step} on SIGUSR1", flush=True)
        sys.exit(0)
    if step == steps or (every and step % every == 0):
        save(step, digest)
print("done", flush=True)
'''


def expected(steps: int) -> str:
    digest = ""
    for step in range(1, steps + 1):
        digest = hashlib.sha256(f"{digest}:{step}".encode()).hexdigest()
    return digest


@pytest.fixture
def command(tmp_path: Path) -> Callable[..., str]:
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT)

    def make(steps: int, *, every: int = 10, sleep: float = 0.02, handle: bool = True) -> str:
        return (f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {steps} {every} "
                f"{sleep} {'handle' if handle else 'ignore'}")

    return make


def checkpoints(store_url: str) -> CheckpointStore:
    return CheckpointStore(open_store(store_url), p.checkpoint_prefix(JOB_ID))


def final_state(store_url: str) -> dict[str, object]:
    info, files = checkpoints(store_url).load(None)
    assert set(files) == {"STEP", "state.json"}
    assert int(files["STEP"]) == info.step
    return dict(json.loads(files["state.json"]))


def test_saves_become_verified_checkpoints_and_the_mode_is_recorded(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str
) -> None:
    agent = start_agent(command(60, every=10), mode=None)
    health = agent.wait(lambda h: h["last_checkpoint_step"] is not None, "a first save")
    assert health["checkpoint_mode"] == "dir" and health["state"] == "running"
    health = agent.wait(lambda h: h["state"] == "completed", "completion", timeout=60)
    assert health["step"] == 60 and health["last_checkpoint_step"] == 60
    steps = [info.step for info in checkpoints(store_url).list()]
    assert steps[-1] == 60 and set(steps) <= set(range(10, 61, 10)), steps
    assert final_state(store_url) == {"step": 60, "digest": expected(60)}
    assert open_store(store_url).get(p.checkpoint_mode_key(JOB_ID)) == b"dir"


def test_a_pause_signals_the_script_which_saves_and_exits_and_resume_starts_it_again(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str
) -> None:
    agent = start_agent(command(150, every=0), mode="dir")
    agent.wait(lambda h: h["state"] == "running", "running")
    time.sleep(0.5)
    pids = job_processes(agent.proc.pid)
    answer = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    assert 5 <= step < 150
    health = agent.wait(lambda h: not any(alive(pid) for pid in pids) and
                        h["state"] == "paused", "the script exits, paused")
    assert health["step"] == step and health["last_checkpoint_step"] == step
    assert final_state(store_url) == {"step": step, "digest": expected(step)}
    # asking again while paused answers at once with the same save
    again = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 1})
    assert again.status_code == 200 and again.json()["step"] == step
    job_log, _ = read_instance(open_store(store_url), JOB_ID, "i-a")
    assert any("SIGUSR1 to process" in line for line in job_log), job_log
    assert any(f"saved {step} on SIGUSR1" in line for line in job_log), job_log

    # a move rolled back: the command starts again on its own save
    assert agent.call("POST", "/agent/resume").status_code == 200
    health = agent.wait(lambda h: h["state"] == "completed", "completion", timeout=60)
    assert health["exit_code"] == 0
    assert final_state(store_url) == {"step": 150, "digest": expected(150)}


def test_a_standby_replacement_starts_the_command_only_on_the_restored_folder(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str
) -> None:
    old = start_agent(command(200, every=25), instance_id="i-old", mode=None)
    old.wait(lambda h: h["checkpoint_mode"] == "dir" and h["step"] is not None, "first save")
    new = start_agent(command(200, every=25), instance_id="i-new", standby=True, mode=None)
    health = new.wait(lambda h: h["restore_waiting"], "replacement ready in standby")
    assert health["state"] == "standby" and not job_processes(new.proc.pid)

    answer = old.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    released = time.time()
    assert new.call("POST", "/agent/restore", json={"step": step}).status_code == 202
    health = new.wait(lambda h: h["state"] == "running", "replacement running")
    assert health["checkpoint_mode"] == "dir"
    assert health["first_step"] == step + 1 and health["step"] == step
    print(f"\nrestore -> command started on the restored folder: "
          f"{(health['first_step_at'] - released) * 1000:.0f} ms")
    assert old.wait(lambda h: h["state"] == "paused", "old paused")["step"] == step
    assert old.call("POST", "/agent/stop").status_code == 202

    health = new.wait(lambda h: h["state"] == "completed", "replacement completes", timeout=60)
    assert health["last_checkpoint_step"] == 200
    assert final_state(store_url) == {"step": 200, "digest": expected(200)}


def test_a_script_without_a_handler_is_paused_on_its_last_save(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str
) -> None:
    # SIGUSR1's default action kills the script: the move takes its last save
    agent = start_agent(command(500, every=5, handle=False), mode=None)
    first = agent.wait(lambda h: (h["last_checkpoint_step"] or 0) >= 10, "saves")
    answer = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    assert step >= first["last_checkpoint_step"] and step % 5 == 0
    health = agent.wait(lambda h: h["state"] == "paused", "paused")
    assert health["last_checkpoint_step"] == step
    assert final_state(store_url) == {"step": step, "digest": expected(step)}


def test_a_silent_command_is_taken_for_a_folder_job_after_the_grace(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str,
) -> None:
    # no periodic save, no call to the agent: after GPUSCOUT_PLAIN_MODE_AFTER_S
    # a checkpoint request signals it, and it saves on SIGUSR1 only
    agent = start_agent(command(1000, every=0), mode=None,
                        env={p.ENV_PLAIN_MODE_AFTER_S: "1"})
    assert agent.health()["checkpoint_mode"] is None
    answer = agent.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    assert agent.wait(lambda h: h["state"] == "paused", "paused")["checkpoint_mode"] == "dir"
    assert final_state(store_url) == {"step": step, "digest": expected(step)}


def test_a_fresh_instance_of_a_folder_job_starts_on_its_newest_checkpoint(
    start_agent: Callable[..., Agent], command: Callable[..., str], store_url: str
) -> None:
    # recovery: the old instance is gone; a new one (not standby) restores
    # the newest verified checkpoint into the folder before the command starts
    first = start_agent(command(300, every=10), instance_id="i-first", mode=None)
    first.wait(lambda h: (h["last_checkpoint_step"] or 0) >= 30, "saves")
    orphans = job_processes(first.proc.pid)
    first.proc.kill()  # the machine is gone, its job with it
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    newest, previous = checkpoints(store_url).list()[-1], checkpoints(store_url).list()[-2]
    # the newest is damaged: the restore takes the one before and says so
    open_store(store_url).put(f"{newest.key}/state.json", b"{}")
    second = start_agent(command(300, every=10), instance_id="i-second", mode=None)
    health = second.wait(lambda h: h["state"] == "completed", "completion", timeout=60)
    assert health["first_step"] == previous.step + 1
    assert [c["key"] for c in health["skipped_checkpoints"]] == [newest.key]
    assert "state.json" in health["skipped_checkpoints"][0]["reason"]
    assert final_state(store_url) == {"step": 300, "digest": expected(300)}


# --- the README's script ----------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
PLACEHOLDER = "...                                                # one training step"
README_PRELUDE = """\
import sys
import torch
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
total = int(sys.argv[1])

def train_step(step):
    import time
    x = torch.linspace(-1, 1, 64).reshape(8, 8) * step  # the data of that step
    optimizer.zero_grad()
    loss = ((model(x) - 1.0) ** 2).mean()
    loss.backward()
    optimizer.step()
    time.sleep(0.01)
"""
README_EPILOGUE = """
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "final.pt")
"""


def readme_script() -> str:
    text = README.read_text()
    start = text.index("**Scripts that do not import GPU Scout**")
    body = text.index("\n", text.index("```python", start)) + 1
    block = text[body:text.index("```", body)]
    assert PLACEHOLDER in block
    return README_PRELUDE + block.replace(PLACEHOLDER, "train_step(step)") + README_EPILOGUE


def test_the_readmes_plain_script_moves_and_ends_as_an_uninterrupted_run(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")  # installed by `make test` (torch==2.13.0, CPU)
    from tests.torch_states import assert_identical

    script = tmp_path / "readme_train.py"
    script.write_text(readme_script())
    reference = tmp_path / "reference"
    reference.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}
    done = subprocess.run([sys.executable, str(script), "400"], cwd=reference, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} 400"
    old = start_agent(command, instance_id="i-old", mode=None)
    old.wait(lambda h: (h["last_checkpoint_step"] or 0) >= 100, "a first save", timeout=60)
    new = start_agent(command, instance_id="i-new", standby=True, mode=None)
    new.wait(lambda h: h["restore_waiting"], "replacement ready")
    answer = old.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 20})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    assert step >= 100
    assert new.call("POST", "/agent/restore", json={"step": step}).status_code == 202
    new.wait(lambda h: h["state"] == "completed", "replacement completes", timeout=60)
    moved = torch.load(tmp_path / "i-new" / "final.pt")
    want = torch.load(reference / "final.pt")
    assert assert_identical(moved, want) == 2 + 2 * 3  # weight, bias; Adam's moments, steps
