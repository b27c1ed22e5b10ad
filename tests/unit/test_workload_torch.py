"""gpuscout.workload.torch: a whole training state saved and loaded bit for
bit (model, optimizer, scheduler, scaler, every random generator, the data
position), the resumable sampler, and the plug into the workload runtime."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gpuscout import workload  # noqa: E402
from gpuscout.workload import torch as gs_torch  # noqa: E402


@pytest.fixture(autouse=True)
def _global_rngs() -> Iterator[None]:
    """Tests set the global generators: put them back afterwards."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)


class Trainer:
    """A small model with every kind of state: parameters, buffers
    (batch norm), dropout (torch generator), Adam moments, an LR schedule, a
    gradient scaler, and batches from a ResumableSampler."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Dropout(0.3), nn.Linear(16, 3))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.7)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        data = torch.Generator().manual_seed(99)
        self.dataset = TensorDataset(torch.randn(50, 6, generator=data),
                                     torch.randint(0, 3, (50,), generator=data))
        self.sampler = gs_torch.ResumableSampler(50, batch_size=8, seed=seed)
        self.loader = gs_torch.resumable_loader(self.dataset, self.sampler)
        self._batches: Iterator[Any] | None = None

    def next_batch(self) -> Any:
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    def step(self) -> None:
        x, y = self.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss = loss + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "sampler": self.sampler}


def tensors(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested state_dict, by path."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(tensors(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list | tuple):
        return tensors(dict(enumerate(value)), prefix)
    return {prefix.rstrip("."): value}


def assert_same(a: Any, b: Any) -> None:
    flat_a, flat_b = tensors(a), tensors(b)
    assert flat_a.keys() == flat_b.keys()
    for key, left in flat_a.items():
        right = flat_b[key]
        if isinstance(left, torch.Tensor):
            assert isinstance(right, torch.Tensor) and left.dtype == right.dtype, key
            assert torch.equal(left, right), key
        else:
            assert left == right, key


def snapshot(t: Trainer) -> dict[str, Any]:
    return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(),
            "sampler": t.sampler.state_dict()}


def clone(state: Any) -> Any:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in
            tensors(state).items()}


def draws() -> tuple[float, float, Any]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_round_trip_restores_every_tensor_and_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    first = Trainer(seed=5)
    for _ in range(11):  # across an epoch boundary (7 batches per epoch)
        first.step()
    gs_torch.save_state(tmp_path / "ck", **first.parts(), extra={"note": 0.1 + 0.2})
    saved = clone(snapshot(first))
    py, npy, cpu = draws()  # what the uninterrupted run draws next
    for _ in range(9):
        first.step()
    final = clone(snapshot(first))

    random.seed(123)  # scramble everything the load must restore
    np.random.seed(123)
    second = Trainer(seed=6)
    second.sampler = gs_torch.ResumableSampler(50, batch_size=8, seed=5)
    second.loader = gs_torch.resumable_loader(second.dataset, second.sampler)
    second.step()
    extra = gs_torch.load_state(tmp_path / "ck", **second.parts())
    assert extra == {"note": 0.1 + 0.2}
    assert_same(clone(snapshot(second)), saved)
    assert second.optimizer.param_groups[0]["lr"] == saved["scheduler._last_lr.0"]
    py2, npy2, cpu2 = draws()
    assert (py2, npy2) == (py, npy) and torch.equal(cpu2, cpu)

    # the draws above were the first run's too: both go on identically
    for _ in range(9):
        second.step()
    assert_same(clone(snapshot(second)), final)


def test_files_and_their_formats(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    t.step()
    gs_torch.save_state(tmp_path, model=t.model, optimizer=t.optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        gs_torch.MODEL_FILE, gs_torch.OPTIMIZER_FILE, gs_torch.TRAINER_FILE,
        gs_torch.META_FILE])
    meta = json.loads((tmp_path / gs_torch.META_FILE).read_text())
    assert meta["format"] == 2 and meta["parts"] == ["model", "optimizer"]
    assert meta["sampler"] is None and meta["extra"] == {}
    for name in (gs_torch.MODEL_FILE, gs_torch.OPTIMIZER_FILE, gs_torch.TRAINER_FILE):
        torch.load(tmp_path / name, weights_only=True)  # the safe loader reads each


def test_a_format_1_folder_one_weights_file_still_loads_exactly(tmp_path: Path) -> None:
    """Checkpoints written before the model and the optimizer had a file
    each (format 1: both in weights.pt) restore as before."""
    t = Trainer(seed=1)
    for _ in range(3):
        t.step()
    gs_torch.save_state(tmp_path, model=t.model, optimizer=t.optimizer)
    both = {"model": torch.load(tmp_path / gs_torch.MODEL_FILE, weights_only=True),
            "optimizer": torch.load(tmp_path / gs_torch.OPTIMIZER_FILE, weights_only=True)}
    torch.save(both, tmp_path / gs_torch.WEIGHTS_FILE)
    for name in (gs_torch.MODEL_FILE, gs_torch.OPTIMIZER_FILE):
        (tmp_path / name).unlink()
    meta = json.loads((tmp_path / gs_torch.META_FILE).read_text())
    (tmp_path / gs_torch.META_FILE).write_text(json.dumps({**meta, "format": 1}))
    def weights(t: Trainer) -> Any:
        return clone({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()})

    saved = weights(t)
    other = Trainer(seed=2)
    gs_torch.load_state(tmp_path, model=other.model, optimizer=other.optimizer)
    assert_same(weights(other), saved)


def test_a_missing_optimizer_file_is_refused_before_the_model_changes(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    t.step()
    gs_torch.save_state(tmp_path, model=t.model, optimizer=t.optimizer)
    (tmp_path / gs_torch.OPTIMIZER_FILE).unlink()
    other = Trainer(seed=2)
    before = clone(other.model.state_dict())
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        gs_torch.load_state(tmp_path, model=other.model, optimizer=other.optimizer)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_asking_for_a_part_that_was_not_saved_is_refused(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    gs_torch.save_state(tmp_path, model=t.model, optimizer=t.optimizer)
    before = clone(t.model.state_dict())
    other = Trainer(seed=2)
    for part in ("scheduler", "scaler", "sampler"):
        with pytest.raises(gs_torch.StateMismatch, match=part):
            gs_torch.load_state(tmp_path, model=other.model, **{part: other.parts()[part]})
    assert not torch.equal(other.model[0].weight, before["0.weight"])  # nothing loaded


def test_sampler_of_another_configuration_is_refused(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    gs_torch.save_state(tmp_path, model=t.model, sampler=t.sampler)
    for other in (gs_torch.ResumableSampler(50, batch_size=8, seed=2),
                  gs_torch.ResumableSampler(51, batch_size=8, seed=1),
                  gs_torch.ResumableSampler(50, batch_size=4, seed=1),
                  gs_torch.ResumableSampler(50, batch_size=8, seed=1, shuffle=False)):
        with pytest.raises(gs_torch.StateMismatch, match="not be exact"):
            gs_torch.load_state(tmp_path, model=t.model, sampler=other)


def test_extra_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    with pytest.raises(TypeError):
        gs_torch.save_state(tmp_path / "ck", model=t.model, extra={"x": object()})
    assert list((tmp_path / "ck").iterdir()) == []


def test_loading_without_the_generators_leaves_them(tmp_path: Path) -> None:
    t = Trainer(seed=1)
    gs_torch.save_state(tmp_path, model=t.model)
    torch.manual_seed(77)
    expected = torch.rand(3)
    torch.manual_seed(77)
    gs_torch.load_state(tmp_path, model=t.model, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


# --- the sampler ------------------------------------------------------------------------


def flat_batches(sampler: gs_torch.ResumableSampler, count: int) -> list[list[int]]:
    """The next ``count`` batches, starting new epochs as they end."""
    out: list[list[int]] = []
    while len(out) < count:
        for batch in sampler:
            out.append(batch)
            if len(out) == count:
                break
    return out


def test_sampler_epochs_are_seeded_permutations() -> None:
    sampler = gs_torch.ResumableSampler(10, batch_size=4, seed=3)
    assert sampler.batches_per_epoch == 3 and len(sampler) == 3
    epochs = [sum(flat_batches(sampler, 3), []) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [len(b) for b in flat_batches(gs_torch.ResumableSampler(10, batch_size=4, seed=3),
                                         3)] == [4, 4, 2]
    again = gs_torch.ResumableSampler(10, batch_size=4, seed=3)
    assert [sum(flat_batches(again, 3), []) for _ in range(3)] == epochs
    plain = gs_torch.ResumableSampler(10, batch_size=4, seed=3, shuffle=False, drop_last=True)
    assert flat_batches(plain, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


@pytest.mark.parametrize("cut", [1, 5, 6, 7, 13, 14, 20])
def test_sampler_resumes_at_the_next_batch_across_epochs(cut: int) -> None:
    """Stopped after ``cut`` batches (mid-epoch, at an epoch's end, in a
    later epoch), saved as JSON and loaded into a new sampler, the index
    order goes on exactly as in the uninterrupted run."""
    uninterrupted = flat_batches(gs_torch.ResumableSampler(45, batch_size=7, seed=11), 24)
    first = gs_torch.ResumableSampler(45, batch_size=7, seed=11)
    head = flat_batches(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] * 7 + state["batch"] == cut  # 7 batches per epoch
    resumed = gs_torch.ResumableSampler(45, batch_size=7, seed=11)
    resumed.load_state_dict(state)
    assert head + flat_batches(resumed, 24 - cut) == uninterrupted


def test_a_dataloader_resumes_mid_epoch_without_touching_the_global_generator() -> None:
    dataset = TensorDataset(torch.arange(30))
    sampler = gs_torch.ResumableSampler(30, batch_size=4, seed=2)
    loader = gs_torch.resumable_loader(dataset, sampler)
    reference = [b[0].tolist() for _ in range(3) for b in loader]  # three epochs

    sampler = gs_torch.ResumableSampler(30, batch_size=4, seed=2)
    loader = gs_torch.resumable_loader(dataset, sampler)
    got = []
    for (batch,) in loader:
        got.append(batch.tolist())
        if len(got) == 5:
            break  # stopped mid-epoch
    restarted = gs_torch.ResumableSampler(30, batch_size=4, seed=2)
    restarted.load_state_dict(sampler.state_dict())
    before = torch.get_rng_state()
    loader = gs_torch.resumable_loader(dataset, restarted)
    while len(got) < len(reference):
        got.extend(b[0].tolist() for b in loader)
    assert got == reference
    assert torch.equal(torch.get_rng_state(), before)


def test_follow_counts_batches_delivered_not_prefetched() -> None:
    dataset = TensorDataset(torch.arange(40))
    sampler = gs_torch.ResumableSampler(40, batch_size=4, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, prefetch_factor=2,
                        generator=torch.Generator().manual_seed(0))
    order = sampler.order(0)
    for done, (batch,) in enumerate(sampler.follow(loader), start=1):
        assert batch.tolist() == order[(done - 1) * 4:done * 4]
        assert sampler.state_dict()["batch"] == done  # not the 4 asked for ahead
        if done == 3:
            break
    rest = [b[0].tolist() for b in sampler.follow(loader)]
    assert sum(rest, []) == order[12:]
    assert sampler.state_dict()["batch"] == 10 and len(sampler) == 10  # next: a new epoch
    with pytest.raises(ValueError, match="batch_sampler"):
        next(sampler.follow(DataLoader(dataset, batch_size=4)))


@pytest.mark.parametrize(
    "kwargs",
    [{"dataset_len": 0, "batch_size": 1, "seed": 0}, {"dataset_len": 5, "batch_size": 0, "seed": 0},
     {"dataset_len": 5, "batch_size": 1, "seed": -1},
     {"dataset_len": 3, "batch_size": 4, "seed": 0, "drop_last": True}])
def test_sampler_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        gs_torch.ResumableSampler(**kwargs)


# --- with the runtime ----------------------------------------------------------------------


def test_saver_and_resume_through_the_runtime(tmp_path: Path) -> None:
    first = Trainer(seed=4)
    with workload.init(checkpoint_every=4, default_dir=tmp_path, environ={}) as run:
        assert gs_torch.resume(run, **first.parts()) is None
        save = gs_torch.saver(**first.parts(), extra=lambda: {"at": first.sampler.batch})
        for step in range(1, 11):
            first.step()
            run.step_done(step, loss=0.0, total_steps=10, files=save)
            if step == 8:
                at_8 = clone(snapshot(first))

    second = Trainer(seed=9)
    second.sampler = gs_torch.ResumableSampler(50, batch_size=8, seed=4)
    second.loader = gs_torch.resumable_loader(second.dataset, second.sampler)
    with workload.init(checkpoint_every=4, default_dir=tmp_path, environ={}) as run:
        resumed = gs_torch.resume(run, **second.parts())
        assert resumed == (8, {"at": 1})  # 8 batches: one into the second epoch
        assert not any((tmp_path / ".gpuscout-work").glob("restore-*"))  # deleted once loaded
    assert_same(clone(snapshot(second)), at_8)


def test_importing_the_workload_library_does_not_import_torch() -> None:
    code = ("import sys, gpuscout.workload, gpuscout.examples.linreg; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_digits_examples_status_endpoint(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    from gpuscout import workload
    from gpuscout.examples.torch_digits import serve_status

    now: list[tuple[int | None, float | None]] = [(None, None)]
    with workload.init(default_dir=tmp_path, environ={}) as run, \
            workload.init(default_dir=tmp_path, environ={}) as other:
        assert serve_status(run, "torch_digits", 0, 50, lambda: now[0])
        port = run._server.port  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/status"
        assert httpx.get(url).json() == {"instance_id": "standalone", "step": None,
                                         "loss": None, "total_steps": 50}
        now[0] = (7, float("nan"))  # a diverged loss reads as null
        assert httpx.get(url).json()["step"] == 7 and httpx.get(url).json()["loss"] is None
        now[0] = (8, 0.25)
        assert httpx.get(url).json()["loss"] == 0.25
        assert not serve_status(other, "hf_digits", port, 50, lambda: now[0])
    assert capsys.readouterr().err.startswith(f"hf_digits: cannot serve on port {port}: ")
