"""The PyTorch example job as a real process: killed and started again in
its folder, and moved between two real agents (checkpoint, pause, restore on
a standby replacement), it ends with the weights and optimizer state of an
uninterrupted run, tensor for tensor."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from gpuscout.agent import protocol as p  # noqa: E402
from gpuscout.store import open_store  # noqa: E402
from gpuscout.workload.checkpoint import CheckpointStore  # noqa: E402
from gpuscout.workload.runtime import (  # noqa: E402
    STANDALONE_CHECKPOINT_DIR,
    STANDALONE_CHECKPOINT_PREFIX,
    WORK_DIR,
)
from tests.integration import test_agent, test_linreg  # noqa: E402
from tests.integration.test_agent import JOB_ID, Agent  # noqa: E402
from tests.integration.test_linreg import standalone_env  # noqa: E402
from tests.torch_states import assert_identical, load_model, move_between_agents  # noqa: E402

# the fixtures that start real agents and clean up processes
start_agent = test_agent.start_agent
store_url = test_agent.store_url
procs = test_linreg.procs

DIGITS = [sys.executable, "-m", "gpuscout.examples.torch_digits"]
STEPS = 120  # two epochs of 57 batches and a bit, one LR decay (at 100)
SEED = 4
TENSORS = 6 + 13  # at least: 6 parameters; their Adam moments and step counts


def run_digits(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DIGITS, *args], cwd=cwd, env=standalone_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """model.pt of an uninterrupted standalone run."""
    folder = tmp_path_factory.mktemp("reference")
    done = run_digits("--steps", str(STEPS), "--seed", str(SEED), "--out", str(folder),
                      cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "step 120/120 loss" in done.stderr
    return load_model((folder / "model.pt").read_bytes())


def test_killed_standalone_run_resumes_and_ends_identical(
    tmp_path: Path, reference: dict[str, Any], procs: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    args = ["--steps", str(STEPS), "--seed", str(SEED), "--step-sleep", "0.03",
            "--checkpoint-every", "10", "--out", str(out)]
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen([*DIGITS, *args], cwd=tmp_path, env=standalone_env(),
                                 stdout=log, stderr=log)
    procs.append(first)
    checkpoints = CheckpointStore(
        open_store((out / STANDALONE_CHECKPOINT_DIR).resolve().as_uri()),
        STANDALONE_CHECKPOINT_PREFIX)
    deadline = time.monotonic() + 60
    latest = None
    while time.monotonic() < deadline:
        latest = checkpoints.latest() if (out / STANDALONE_CHECKPOINT_DIR).is_dir() else None
        if latest is not None and latest.step >= 40:  # mid-epoch (57 batches an epoch)
            break
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    assert latest is not None and latest.step >= 40
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert not (out / "model.pt").exists()
    assert sorted(latest.files) == ["model.pt", "optimizer.pt", "trainer.json", "trainer.pt"]

    second = run_digits(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in second.stderr.splitlines() if "resuming after step" in line]
    assert resumed, second.stderr
    assert latest.step <= int(resumed[0].rsplit(" ", 1)[1]) < STEPS
    assert assert_identical(load_model((out / "model.pt").read_bytes()),
                            reference) >= TENSORS
    assert not (out / WORK_DIR).exists()  # no staging or restored folder left


def test_a_run_stopped_half_way_and_run_on_ends_identical(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    common = ["--seed", str(SEED), "--checkpoint-every", "20", "--out", str(tmp_path)]
    half = run_digits("--steps", str(STEPS // 2), *common, cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    rest = run_digits("--steps", str(STEPS), *common, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "resuming after step 60" in rest.stderr
    assert assert_identical(load_model((tmp_path / "model.pt").read_bytes()),
                            reference) >= TENSORS

    other = run_digits("--steps", str(STEPS), "--seed", str(SEED + 1), "--out", str(tmp_path),
                       cwd=tmp_path)
    assert other.returncode == 2 and "does not belong to --seed" in other.stderr


def test_moved_between_agents_mid_run_ends_identical(
    start_agent: Callable[..., Agent], store_url: str, reference: dict[str, Any]
) -> None:
    command = (f"{shlex.quote(sys.executable)} -m gpuscout.examples.torch_digits "
               f"--steps {STEPS} --seed {SEED} --step-sleep 0.03 --checkpoint-every 0")
    old, new, step = move_between_agents(start_agent, command, steps=STEPS)
    assert old.call("POST", "/agent/stop").status_code == 202

    health = new.wait(lambda h: h["state"] == "completed", "replacement completes", timeout=60)
    assert health["exit_code"] == 0
    model_key = f"{p.artifacts_prefix(JOB_ID)}/model.pt"
    assert assert_identical(load_model(open_store(store_url).get(model_key)),
                            reference) >= TENSORS
    checkpoints = CheckpointStore(open_store(store_url), p.checkpoint_prefix(JOB_ID)).list()
    assert [c.step for c in checkpoints] == [step]  # only the one the move asked for
