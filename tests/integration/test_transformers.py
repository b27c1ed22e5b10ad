"""The Hugging Face Trainer with ``GpuScoutCallback``, as real processes: the
``hf_digits`` example stopped half-way and run on in its folder (resumed at
an epoch boundary), and moved between two real agents mid-epoch (checkpoint,
pause, restore on a standby replacement), ends with the weights, optimizer
state and torch generator of an uninterrupted run, tensor for tensor."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gpuscout import workload  # noqa: E402
from gpuscout.agent import protocol as p  # noqa: E402
from gpuscout.integrations import transformers as gs_hf  # noqa: E402
from gpuscout.store import open_store  # noqa: E402
from gpuscout.workload.checkpoint import CheckpointStore  # noqa: E402
from gpuscout.workload.runtime import WORK_DIR  # noqa: E402
from tests.integration import test_agent  # noqa: E402
from tests.integration.test_agent import JOB_ID, Agent  # noqa: E402
from tests.integration.test_linreg import standalone_env  # noqa: E402
from tests.torch_states import assert_identical as states_identical  # noqa: E402
from tests.torch_states import load_model, move_between_agents  # noqa: E402

# the fixtures that start real agents and clean up processes
start_agent = test_agent.start_agent
store_url = test_agent.store_url

HF_DIGITS = [sys.executable, "-m", "gpuscout.examples.hf_digits"]
STEPS = 120  # 57 batches an epoch: two epochs and 6 steps
EPOCH = 57
SEED = 4
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# 25 parameters (embeddings 5, the layer 16, pooler 2, classifier 2), and
# AdamW's exp_avg, exp_avg_sq and step of each
MIN_TENSORS = 25 + 3 * 25


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing from the hub, in this process and every one it starts
    (agents copy the environment)."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    yield


def run_hf(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**standalone_env(), **OFFLINE}
    return subprocess.run([*HF_DIGITS, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_identical(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Every tensor equal (torch.equal, same dtype), every other value equal:
    weights, AdamW moments and steps, the torch CPU generator."""
    assert states_identical(got, want) >= MIN_TENSORS
    assert torch.equal(got["torch_rng"], want["torch_rng"])  # dropout drew the same numbers


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """model.pt of an uninterrupted standalone run."""
    folder = tmp_path_factory.mktemp("reference")
    env = {**standalone_env(), **OFFLINE}
    done = subprocess.run([*HF_DIGITS, "--steps", str(STEPS), "--seed", str(SEED),
                           "--checkpoint-every", "0", "--out", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "step 120/120 loss" in done.stderr
    assert not (folder / ".checkpoints" / "checkpoints").exists()  # never checkpointed
    return load_model((folder / "model.pt").read_bytes())


def test_a_run_stopped_half_way_and_run_on_ends_identical(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    # Checkpoints every 19 steps: the half run's last is step 57, the end of
    # the first epoch, so the second run resumes at an epoch boundary (the
    # move below resumes mid-epoch) and redoes steps 58..60.
    common = ["--seed", str(SEED), "--checkpoint-every", "19", "--out", str(tmp_path)]
    half = run_hf("--steps", str(STEPS // 2), *common, cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    rest = run_hf("--steps", str(STEPS), *common, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert f"resuming after step {EPOCH}" in rest.stderr
    assert_identical(load_model((tmp_path / "model.pt").read_bytes()), reference)
    assert not (tmp_path / WORK_DIR).exists()  # no staging or restored folder left
    assert not any((tmp_path / ".hf_digits").iterdir())  # the Trainer's output_dir untouched


def test_moved_between_agents_mid_epoch_ends_identical(
    start_agent: Callable[..., Agent], store_url: str, reference: dict[str, Any]
) -> None:
    command = (f"{shlex.quote(sys.executable)} -m gpuscout.examples.hf_digits "
               f"--steps {STEPS} --seed {SEED} --step-sleep 0.02 --checkpoint-every 0")
    old, new, step = move_between_agents(start_agent, command, steps=STEPS)
    assert step % EPOCH != 0  # mid-epoch
    assert old.call("POST", "/agent/stop").status_code == 202

    health = new.wait(lambda h: h["state"] == "completed", "replacement completes", timeout=60)
    assert health["exit_code"] == 0
    store = open_store(store_url)
    assert_identical(load_model(store.get(f"{p.artifacts_prefix(JOB_ID)}/model.pt")), reference)
    checkpoints = CheckpointStore(store, p.checkpoint_prefix(JOB_ID)).list()
    assert [c.step for c in checkpoints] == [step]  # only the one the move asked for
    files = sorted(checkpoints[0].files)
    assert {f"checkpoint-{step}/{name}" for name in (
        "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
        "trainer_state.json")} <= set(files)


# --- the module in this process -------------------------------------------------


def test_the_callback_is_a_trainer_callback_and_needs_its_trainer(tmp_path: Path) -> None:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    with workload.init(default_dir=tmp_path, environ={}) as run:
        callback = gs_hf.GpuScoutCallback(run)
        assert isinstance(callback, TrainerCallback)
        assert isinstance(callback, gs_hf.GpuScoutCallback)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
        with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
            callback.on_train_begin(args, TrainerState(), TrainerControl())
        with pytest.raises(ValueError, match="checkpoint_every"):
            gs_hf.GpuScoutCallback(run, checkpoint_every=5)


def test_resume_from_checkpoint_fresh_and_foreign(tmp_path: Path) -> None:
    assert gs_hf.resume_from_checkpoint(None) is None
    with workload.init(default_dir=tmp_path, environ={}) as run:
        assert gs_hf.resume_from_checkpoint(run) is None  # fresh start
        run.checkpoint(3, {"w": [1.0]})  # another script's JSON checkpoint
        with pytest.raises(ValueError, match="another script"):
            gs_hf.resume_from_checkpoint(run)


def test_without_transformers_the_callback_names_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with workload.init(default_dir=tmp_path, environ={}) as run:
        with pytest.raises(ImportError, match="pip install transformers"):
            gs_hf.GpuScoutCallback(run)
