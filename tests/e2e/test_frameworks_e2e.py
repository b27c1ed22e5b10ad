"""Real framework jobs under the whole control plane, on real processes:
a Lightning job, a Hugging Face Trainer job and a plain PyTorch script that
does not import GPU Scout (GPUSCOUT_CHECKPOINT_DIR and SIGUSR1) are each
moved by the scout, by a spot notice and by hand, and end with the very
weights and optimizer state of an uninterrupted run (the README states
what is exact for each). The torch example's own run is test_torch_e2e."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuscout import workdir
from gpuscout.agent import protocol as p
from gpuscout.workload.checkpoint import CheckpointStore
from tests.e2e.conftest import E2E
from tests.e2e.test_migration_e2e import G4_SPOT_B, P3_SPOT_A, assert_clean_move, no_g4dn_spot

torch = pytest.importorskip("torch")  # installed by `make test` (torch==2.13.0, CPU)

from gpuscout.examples import plain_digits  # noqa: E402
from tests.torch_states import assert_identical, load_model  # noqa: E402

pytestmark = pytest.mark.e2e

SEED = 3
# Hugging Face: nothing from the hub, here and in every process started.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GPUSCOUT_")},
            **OFFLINE}


def example(name: str, steps: int) -> Callable[[E2E, Path], dict[str, Any]]:
    """A job running ``python -m gpuscout.examples.<name>``."""
    def body(e2e: E2E, tmp_path: Path) -> dict[str, Any]:
        return {"command": f"python -m gpuscout.examples.{name} --steps {steps} --seed {SEED} "
                           "--step-sleep 0.03 --checkpoint-every 25"}
    return body


def example_reference(name: str, steps: int, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "reference"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", f"gpuscout.examples.{name}", "--steps",
                           str(steps), "--seed", str(SEED), "--checkpoint-every", "0",
                           "--out", str(out)], cwd=out, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_model((out / "model.pt").read_bytes())


def example_result(e2e: E2E, job_id: str) -> dict[str, Any]:
    artifact = e2e.api.get(f"/api/v1/jobs/{job_id}/artifacts/model.pt")
    assert artifact.status_code == 200
    return load_model(artifact.content)


def plain_job(steps: int) -> Callable[[E2E, Path], dict[str, Any]]:
    """The user's own folder holding train.py: plain_digits.py's code, which
    imports torch, numpy and scikit-learn, and never gpuscout."""
    def body(e2e: E2E, tmp_path: Path) -> dict[str, Any]:
        project = tmp_path / "project"
        project.mkdir()
        source = inspect.getsource(plain_digits)
        assert "gpuscout" not in source.replace("GPUSCOUT_CHECKPOINT_DIR", "").split(
            '"""', 2)[2]  # the code after the docstring names no gpuscout module
        (project / "train.py").write_text(source)
        packed = workdir.pack(project)
        try:
            answer = e2e.api.post("/api/v1/workdirs", content=packed.path.read_bytes(),
                                  headers={"Content-Type": "application/gzip"})
        finally:
            packed.path.unlink()
        assert answer.status_code == 201, answer.text
        return {"command": f"python train.py --steps {steps} --seed {SEED} "
                           "--step-sleep 0.03 --save-every 25",
                "workdir": answer.json()["ref"]}
    return body


def plain_reference(steps: int, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "reference"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", inspect.getsource(plain_digits),
                           "--steps", str(steps), "--seed", str(SEED), "--save-every", "0"],
                          cwd=out, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return comparable(torch.load(out / "checkpoint" / "state.pt", weights_only=False))


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """The script's state with numpy's generator state as a list (an array
    compares element-wise)."""
    kind, keys, *rest = state["numpy_rng"]
    return {**state, "numpy_rng": (kind, keys.tolist(), *rest)}


def plain_result(e2e: E2E, job_id: str) -> dict[str, Any]:
    """The job's last checkpoint: the script's final save, uploaded by the agent."""
    store = CheckpointStore(e2e.service.ctx.store, p.checkpoint_prefix(job_id))
    info, files = store.load(None)
    assert files["STEP"].strip() == str(info.step).encode()
    return comparable(torch.load(io.BytesIO(files["state.pt"]), weights_only=False))


CASES = {
    # name: (steps, job body, reference, result, tensors compared at least)
    "lightning": (1000, example("lightning_digits", 1000),
                  lambda tmp: example_reference("lightning_digits", 1000, tmp),
                  example_result, 24),
    "transformers": (1000, example("hf_digits", 1000),
                     lambda tmp: example_reference("hf_digits", 1000, tmp),
                     example_result, 25 + 3 * 25),
    "plain-script": (1000, plain_job(1000), lambda tmp: plain_reference(1000, tmp),
                     plain_result, 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_framework_job_moved_three_ways_ends_with_the_uninterrupted_state(
        e2e: E2E, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    steps, make_body, reference, result, min_tensors = CASES[case]
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)  # the agents' environment is this one's
    no_g4dn_spot(e2e)
    body = {"name": case, **make_body(e2e, tmp_path), "expected_duration_hours": 0.01,
            "resources": {"gpus": 1, "cpus": 1, "memory_gb": 1}}
    response = e2e.api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = e2e.wait_status(job_id, "running", timeout_s=60)
    assert job["offer_id"] == P3_SPOT_A
    e2e.wait_step(job_id, 50, timeout_s=90)

    def moved(count: int, reason: str) -> dict[str, Any]:
        try:
            move = e2e.wait_migration(job_id, count, timeout_s=120)
        except AssertionError:
            events = e2e.api.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
            raise AssertionError((e2e.migrations(job_id), [(e["kind"], e["message"])
                                                            for e in events[-15:]])) from None
        assert_clean_move(e2e, move, reason=reason)
        e2e.wait_step(job_id, min(move["resume_step"] + 25, steps), timeout_s=90)
        return move

    e2e.patch_offer(G4_SPOT_B, available=True)  # the scout moves it: 66% cheaper
    moved(1, "price")
    instance = e2e.job(job_id)["instance_id"]
    assert e2e.api.post(f"/api/v1/instances/{instance}/interrupt").status_code == 202
    moved(2, "preemption")
    manual = e2e.manual_move(job_id)
    assert manual.status_code == 202, manual.text
    moved(3, "manual")

    job = e2e.wait_status(job_id, "completed", timeout_s=240)
    assert job["progress"]["step"] == steps
    assert assert_identical(result(e2e, job_id), reference(tmp_path)) >= min_tensors
