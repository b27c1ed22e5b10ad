"""The example job run standalone as a real process: exact, resumable,
serving its endpoints, and strict about its command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gpuscout.examples import linreg
from gpuscout.store import open_store
from gpuscout.workload.checkpoint import CheckpointStore
from gpuscout.workload.runtime import STANDALONE_CHECKPOINT_DIR, STANDALONE_CHECKPOINT_PREFIX

LINREG = [sys.executable, "-m", "gpuscout.examples.linreg"]


def standalone_env() -> dict[str, str]:
    """The test's environment without any GPUSCOUT_* (a run outside the
    control plane must not pick up a store or agent from the caller)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reference(seed: int, steps: int) -> bytes:
    return linreg.encode_model(*linreg.train(seed, steps), steps)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts; all killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def run_linreg(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINREG, *args], cwd=cwd, env=standalone_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_two_standalone_runs_with_the_same_seed_are_bit_identical(tmp_path: Path) -> None:
    models = []
    for name in ("a", "b"):
        done = run_linreg("--steps", "40", "--seed", "7", "--out", str(tmp_path / name),
                          cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        models.append((tmp_path / name / "model.json").read_bytes())
    assert models[0] == models[1] == reference(7, 40)
    other = run_linreg("--steps", "40", "--seed", "8", "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "c" / "model.json").read_bytes() != models[0]


def test_default_out_is_the_current_folder(tmp_path: Path) -> None:
    done = run_linreg("--steps", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model.json").read_bytes() == reference(0, 3)


def test_killed_run_resumes_from_its_last_checkpoint_and_ends_identical(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    args = ["--steps", "80", "--step-sleep", "0.02", "--seed", "3", "--checkpoint-every", "10",
            "--out", str(out)]
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen([*LINREG, *args], cwd=tmp_path, env=standalone_env(),
                             stdout=log, stderr=log)
    procs.append(first)
    checkpoints = None
    deadline = time.monotonic() + 30
    latest = None
    while time.monotonic() < deadline:
        if checkpoints is None and (out / STANDALONE_CHECKPOINT_DIR).is_dir():
            store = open_store((out / STANDALONE_CHECKPOINT_DIR).resolve().as_uri())
            checkpoints = CheckpointStore(store, STANDALONE_CHECKPOINT_PREFIX)
        latest = checkpoints.latest() if checkpoints is not None else None
        if latest is not None and latest.step >= 20:
            break
        assert first.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    assert latest is not None and latest.step >= 20
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert not (out / "model.json").exists()

    second = run_linreg(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in second.stderr.splitlines() if "resuming after step" in line]
    assert resumed, second.stderr
    resumed_step = int(resumed[0].rsplit(" ", 1)[1])
    assert latest.step <= resumed_step < 80
    assert (out / "model.json").read_bytes() == reference(3, 80)


def test_checkpoints_of_another_seed_are_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert run_linreg("--steps", "10", "--seed", "1", "--out", out, cwd=tmp_path).returncode == 0
    done = run_linreg("--steps", "10", "--seed", "2", "--out", out, cwd=tmp_path)
    assert done.returncode == 2
    assert "does not belong to --seed 2" in done.stderr and "Traceback" not in done.stderr


def test_standalone_endpoints(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [*LINREG, "--steps", "100000", "--step-sleep", "0.01", "--port", str(port),
         "--out", str(tmp_path)],
        cwd=tmp_path, env=standalone_env(), stdout=log, stderr=log,
    )
    procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            status = httpx.get(f"{base}/status").json()
            if (status["step"] or 0) >= 2:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert status["instance_id"] == "standalone"
    assert status["total_steps"] == 100000
    assert isinstance(status["loss"], float)

    rows = [[1.0] * 8, [0.0] * 8]
    answer = httpx.post(f"{base}/predict", json={"x": rows})
    assert answer.status_code == 200
    assert len(answer.json()["y"]) == 2 and all(isinstance(y, float) for y in answer.json()["y"])
    for bad in ({"x": [[1.0] * 7]}, {"x": "nope"}, {"y": rows}, [1, 2], {"x": [["a"] * 8]}):
        answer = httpx.post(f"{base}/predict", json=bad)
        assert answer.status_code == 400, bad
        assert '"x" must be a list of rows of 8 numbers' in answer.json()["error"]
    answer = httpx.post(f"{base}/predict", content=b"{not json")
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
    assert httpx.get(f"{base}/predict").status_code == 405
    assert httpx.get(f"{base}/nope").status_code == 404


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--steps", "0"],
        ["--steps", "ten"],
        ["--steps", "5", "--step-sleep", "-1"],
        ["--steps", "5", "--step-sleep", "nan"],
        ["--steps", "5", "--seed", "-3"],
        ["--steps", "5", "--checkpoint-every", "x"],
        ["--steps", "5", "--port", "70000"],
        ["--steps", "5", "--bogus"],
    ],
)
def test_bad_command_line_is_a_usage_error(tmp_path: Path, argv: list[str]) -> None:
    done = run_linreg(*argv, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "model.json").exists()


def test_sgd_learns_the_true_model() -> None:
    data = linreg.make_dataset(11)
    coef, intercept = linreg.train(11, 600)
    np.testing.assert_allclose(coef, data.true_coef, atol=0.05)
    assert abs(intercept - data.true_intercept) < 0.05
