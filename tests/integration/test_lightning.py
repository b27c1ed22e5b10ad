"""The Lightning example job (``gpuscout.examples.lightning_digits``: a
``Trainer`` with ``GpuScoutCallback`` and ``ResumableDataLoader``) as a real
process: stopped with a checkpoint and run on in its folder (mid-epoch and
at an epoch's end), and moved between two real agents mid-run (checkpoint
and pause at a step boundary, restore on a standby replacement), it ends
with the weights and optimizer state of an uninterrupted run.

Expected exact, tensor for tensor (torch.equal, same dtype): every tensor of
``model.pt``: the CNN's 6 parameters and Adam's state for each of them
(``exp_avg``, ``exp_avg_sq``, ``step``), and the other values in it (the
optimizer's param_groups with the scheduled learning rate, the accuracy).
This holds because the data position is in the checkpoint (the loader is
stateful) and the random generators are restored (dropout); a plain
DataLoader, or no generator restore, ends with other weights (see the
``gpuscout.integrations.lightning`` docstring).
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

if find_spec("lightning") is None:  # not importorskip: importing Lightning takes seconds
    pytest.skip("lightning is not installed (pip install lightning)", allow_module_level=True)
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

DIGITS = [sys.executable, "-m", "gpuscout.examples.lightning_digits"]
STEPS = 120  # two epochs of 57 batches and a bit, one LR decay (at 100)
SEED = 4
TENSORS = 6 + 6 * 3  # 6 parameters; Adam's exp_avg, exp_avg_sq and step of each


class Digits:
    """One run of the example as a process, its stderr into a file."""

    def __init__(self, *args: str, cwd: Path, name: str) -> None:
        self.log = cwd / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*DIGITS, *args], cwd=cwd, env=standalone_env(),
                                         stdout=out, stderr=out)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """(exit code, output) once it has ended."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return code, self.log.read_text(errors="replace")


class Reference:
    """The uninterrupted run, started at once, waited for on first use (it
    runs while a test's own processes start: Lightning takes seconds to
    import)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.run = Digits("--steps", str(STEPS), "--seed", str(SEED), "--checkpoint-every",
                          "0", "--out", str(folder), cwd=folder, name="reference")
        self._model: dict[str, Any] | None = None

    def model(self) -> dict[str, Any]:
        if self._model is None:
            code, output = self.run.finish()
            assert code == 0, output
            assert "step 120/120 loss" in output
            assert not (self.folder / STANDALONE_CHECKPOINT_DIR / STANDALONE_CHECKPOINT_PREFIX
                        ).exists()
            self._model = load_model((self.folder / "model.pt").read_bytes())
        return self._model


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """model.pt of an uninterrupted standalone run."""
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.run.proc.poll() is None:  # a test failed before waiting for it
        ref.run.proc.kill()
        ref.run.proc.wait(timeout=10)


def test_integrations_package_imports_no_framework_and_names_the_install() -> None:
    code = (
        "import sys\n"
        "import gpuscout.integrations\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
        "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
        "try:\n"
        "    import gpuscout.integrations.lightning\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install lightning" in done.stdout


def test_runs_stopped_and_run_on_in_their_folders_end_identical(
    tmp_path: Path, reference: Reference, procs: list[subprocess.Popen[bytes]]
) -> None:
    # 57 batches an epoch: step 60 is the 3rd batch of epoch 1, step 57 the
    # last of epoch 0. Each first run ends with a checkpoint of its last step
    # (a run killed after that checkpoint leaves the same folder behind).
    # The runs of both cases go side by side.
    cases = {"mid-epoch": (60, 20), "epoch-end": (57, 19)}
    folders = {name: tmp_path / name for name in cases}

    def common(name: str) -> list[str]:
        return ["--seed", str(SEED), "--checkpoint-every", str(cases[name][1]),
                "--out", str(folders[name])]

    firsts = {name: Digits("--steps", str(first), *common(name), cwd=tmp_path,
                           name=f"{name}-first") for name, (first, _) in cases.items()}
    procs.extend(run.proc for run in firsts.values())
    for name, (first, _) in cases.items():
        code, output = firsts[name].finish()
        assert code == 0, output
        checkpoints = CheckpointStore(
            open_store((folders[name] / STANDALONE_CHECKPOINT_DIR).resolve().as_uri()),
            STANDALONE_CHECKPOINT_PREFIX)
        latest = checkpoints.latest()
        assert latest is not None and latest.step == first
        assert sorted(latest.files) == ["last.ckpt"]
    # another seed's data order is refused, not silently mixed in
    foreign = tmp_path / "foreign"
    shutil.copytree(folders["mid-epoch"], foreign)
    other = Digits("--steps", str(STEPS), "--seed", str(SEED + 1), "--out", str(foreign),
                   cwd=tmp_path, name="foreign")
    procs.append(other.proc)

    rests = {name: Digits("--steps", str(STEPS), *common(name), cwd=tmp_path,
                          name=f"{name}-rest") for name in cases}
    procs.extend(run.proc for run in rests.values())
    for name, (first, _) in cases.items():
        code, output = rests[name].finish()
        assert code == 0, output
        assert f"resuming after step {first}" in output
        assert "not resumable" not in output  # Lightning's warning for a plain DataLoader
        assert assert_identical(load_model((folders[name] / "model.pt").read_bytes()),
                                reference.model()) == TENSORS
        assert not (folders[name] / WORK_DIR).exists()  # no staging or restored folder left
    code, output = other.finish()
    assert code == 2 and "does not belong to --seed" in output, output


def test_moved_between_agents_mid_run_ends_identical(
    start_agent: Callable[..., Agent], store_url: str, reference: Reference
) -> None:
    command = (f"{shlex.quote(sys.executable)} -m gpuscout.examples.lightning_digits "
               f"--steps {STEPS} --seed {SEED} --step-sleep 0.03 --checkpoint-every 0")
    old, new, step = move_between_agents(start_agent, command, steps=STEPS)
    assert old.health()["state"] == "paused"  # GpuScoutCallback blocks in the Trainer
    assert old.call("POST", "/agent/stop").status_code == 202
    # stopped while paused in the callback: it dies by SIGTERM at once, not
    # SIGKILLed after the agent's grace period (Lightning alone would wait
    # for a batch boundary that a paused run never reaches)
    health = old.wait(lambda h: h["state"] == "failed", "old instance stopped", timeout=5)
    assert health["exit_code"] == -signal.SIGTERM

    health = new.wait(lambda h: h["state"] == "completed", "replacement completes", timeout=60)
    assert health["exit_code"] == 0 and health["step"] == STEPS
    model_key = f"{p.artifacts_prefix(JOB_ID)}/model.pt"
    assert assert_identical(load_model(open_store(store_url).get(model_key)),
                            reference.model()) == TENSORS
    checkpoints = CheckpointStore(open_store(store_url), p.checkpoint_prefix(JOB_ID)).list()
    assert [c.step for c in checkpoints] == [step]  # only the one the move asked for
