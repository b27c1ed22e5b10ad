"""Save and restore a whole PyTorch training state, bit for bit.

    from gpuscout import workload
    from gpuscout.workload import torch as gs_torch

    sampler = gs_torch.ResumableSampler(len(dataset), batch_size=32, seed=0)
    loader = gs_torch.resumable_loader(dataset, sampler)
    run = workload.init(checkpoint_every=50)
    resumed = gs_torch.resume(run, model=model, optimizer=opt, scheduler=sched,
                              sampler=sampler)          # (step, extra) or None
    start = resumed[0] if resumed else 0
    ...
        run.step_done(step, loss=loss, total_steps=total,
                      files=gs_torch.saver(model=model, optimizer=opt,
                                           scheduler=sched, sampler=sampler))

A state folder holds these files:

- ``model.pt`` and ``optimizer.pt``: ``torch.save`` of the model's and the
  optimizer's state_dicts (the large part), one file each so that a restore
  holds no second copy of the model: ``model.pt`` is read through a memory
  map, copied into the model's own tensors and unmapped before
  ``optimizer.pt`` is read, whose tensors become the optimizer's state.
  (Format 1 kept both in one ``weights.pt``; such folders still load.)
- ``trainer.pt``: the LR scheduler's and the gradient scaler's state_dicts
  and the torch random generators (CPU, and every CUDA device when CUDA is
  available).
- ``trainer.json``: the format, which parts were saved, Python's ``random``
  and numpy's global generator, the sampler's position, and ``extra`` (a
  JSON object of the script's own, floats exact).

The .pt files load with ``weights_only=True`` (no code runs on load), and
onto the CPU first (``map_location``): ``load_state_dict`` then copies each
tensor onto the device of the model's or optimizer's own tensors, so a
checkpoint written on a GPU loads on another machine.

Exactness: a run restored from a state folder goes on exactly as the run
that saved it, given the same code, library versions, hardware kind and
thread count, deterministic algorithms (``torch.use_deterministic_algorithms``)
and a data order that depends only on the sampler (``ResumableSampler``).
What is not saved: other generators (``torch.Generator`` objects of the
script's own, DataLoader worker seeds beyond the sampler's), gradients
(``zero_grad`` runs before each step), and anything outside model,
optimizer, scheduler and scaler (put small values in ``extra``).

Importing this module imports torch; ``gpuscout.workload`` does not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from gpuscout.workload.runtime import Run, decode_state, encode_state

log = logging.getLogger("gpuscout.workload.torch")

FORMAT = 2
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
PART_FILES = {"model": MODEL_FILE, "optimizer": OPTIMIZER_FILE}
WEIGHTS_FILE = "weights.pt"  # format 1: model and optimizer in one file (still read)
TRAINER_FILE = "trainer.pt"
META_FILE = "trainer.json"

Extra = Mapping[str, Any]


class StateMismatch(ValueError):
    """A state folder does not fit what it is loaded into: a part asked for
    was not saved, or the sampler's configuration differs."""


# --- the data position -------------------------------------------------------


class ResumableSampler(Sampler[list[int]]):
    """A batch sampler whose position (epoch, batches done) is saved, so a
    DataLoader resumes at the next batch, not the next epoch.

    Build the loader with ``resumable_loader(dataset, sampler)``, or as
    ``DataLoader(dataset, batch_sampler=sampler, generator=<a torch.Generator
    of its own>)``: a DataLoader without a generator draws one number from
    the global torch generator at every ``iter()``, and a resumed run starts
    one more iteration (mid-epoch) than an uninterrupted one, which would
    shift every later random draw (dropout...). One pass of
    ``iter()`` yields the remaining batches of the current epoch (lists of
    ``batch_size`` indices in ``[0, dataset_len)``, the last one shorter
    unless ``drop_last``), then moves to the next epoch. The order of epoch
    ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``
    (or ``0..n-1`` without ``shuffle``): it depends on nothing else, and the
    sampler never touches the global generators.

    Position: with ``num_workers=0`` (the default) the DataLoader asks for a
    batch exactly when the loop takes one, so the position counts the
    batches the loop has had. With worker processes the DataLoader asks
    ahead (``prefetch_factor * num_workers`` batches): iterate
    ``sampler.follow(loader)`` instead of ``loader``, and the position
    counts batches delivered to the loop. Breaking out of an epoch keeps
    the position: the next ``iter()`` goes on from there; ``load_state_dict``
    ends a pass under way (its iterator stops), the next one starts at the
    loaded position. Random draws made by the dataset inside worker
    processes are not covered (a resumed epoch hands its batches to other
    workers): keep them out of the dataset, or use ``num_workers=0``.

    Raises ValueError for ``dataset_len < 1``, ``batch_size < 1``, a
    negative seed, or ``drop_last`` with fewer rows than one batch.
    """

    def __init__(self, dataset_len: int, *, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if dataset_len < 1 or batch_size < 1:
            raise ValueError(f"dataset_len and batch_size must be >= 1, got {dataset_len}, "
                             f"{batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if drop_last and dataset_len < batch_size:
            raise ValueError("drop_last with fewer rows than one batch yields nothing")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.batch = 0  # batches of ``epoch`` done
        self._following = 0
        self._generation = 0  # bumped by load_state_dict: ends passes under way

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.batch_size
        return math.ceil(self.dataset_len / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """Every index of ``epoch``, in the order its batches take them."""
        if not self.shuffle:
            return list(range(self.dataset_len))
        rng = np.random.default_rng([self.seed, epoch])
        return [int(i) for i in rng.permutation(self.dataset_len)]

    def _normalized(self) -> tuple[int, int]:
        if self.batch >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields (the rest of this epoch)."""
        epoch, batch = self._normalized()
        return self.batches_per_epoch - batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self._normalized()
        order = self.order(epoch)
        size, count = self.batch_size, self.batches_per_epoch
        if not self._following:
            self.epoch, self.batch = epoch, start
        generation = self._generation
        for index in range(start, count):
            if self._generation != generation:
                return  # load_state_dict moved the position: this pass is over
            if not self._following:
                self.batch = index + 1
            yield order[index * size:(index + 1) * size]

    def follow(self, loader: DataLoader[Any]) -> Iterator[Any]:
        """Iterate ``loader`` (built on this sampler) for the rest of this
        epoch, counting the batches delivered rather than those asked for:
        exact with worker processes. Yields what the loader yields."""
        if loader.batch_sampler is not self:
            raise ValueError("follow(loader): the loader's batch_sampler is not this sampler")
        epoch, start = self._normalized()
        self.epoch, self.batch = epoch, start
        self._following += 1
        try:
            for done, item in enumerate(loader, start=start + 1):
                self.batch = done
                yield item
        finally:
            self._following -= 1

    def state_dict(self) -> dict[str, int | bool]:
        """The configuration and the position, JSON-able."""
        return {"dataset_len": self.dataset_len, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the position of ``state``; StateMismatch if its configuration
        (length, batch size, seed, shuffle, drop_last) is not this one's."""
        mine = self.state_dict()
        for key in ("dataset_len", "batch_size", "seed", "shuffle", "drop_last"):
            if state.get(key) != mine[key]:
                raise StateMismatch(f"sampler {key} is {mine[key]!r}, the checkpoint's is "
                                    f"{state.get(key)!r}: resuming would not be exact")
        epoch, batch = state.get("epoch"), state.get("batch")
        if not (isinstance(epoch, int) and isinstance(batch, int) and epoch >= 0
                and 0 <= batch <= self.batches_per_epoch):
            raise StateMismatch(f"sampler position {epoch!r}/{batch!r} is not valid")
        self.epoch, self.batch = epoch, batch
        self._generation += 1


def resumable_loader(dataset: Any, sampler: ResumableSampler,
                     **kwargs: Any) -> DataLoader[Any]:
    """``DataLoader(dataset, batch_sampler=sampler, **kwargs)`` with a
    generator of its own (seeded with the sampler's seed), so iterating it
    never draws from the global torch generator. ``kwargs`` must not hold
    ``batch_size``, ``shuffle``, ``sampler``, ``drop_last`` or
    ``batch_sampler`` (the sampler decides those; ValueError from
    DataLoader)."""
    generator = kwargs.pop("generator", None)
    if generator is None:
        generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, **kwargs)


# --- random generators ---------------------------------------------------------


def _python_rng() -> list[Any]:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _set_python_rng(state: list[Any]) -> None:
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def _numpy_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng(state: Mapping[str, Any]) -> None:
    np.random.set_state((state["kind"], np.asarray(state["keys"], dtype=np.uint32),
                         state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _torch_rng() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def _set_torch_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = list(state.get("cuda") or [])
    if not cuda:
        return
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices != len(cuda):
        log.warning("checkpoint has the CUDA generators of %d device(s), this machine has %d: "
                    "restoring %d; CUDA random draws may differ from the saving run",
                    len(cuda), devices, min(devices, len(cuda)))
    for index in range(min(devices, len(cuda))):
        torch.cuda.set_rng_state(cuda[index], device=index)


# --- whole state -----------------------------------------------------------------


def save_state(
    folder: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    sampler: ResumableSampler | None = None,
    extra: Extra | None = None,
) -> None:
    """Write the training state into ``folder`` (created if absent):
    ``model.pt``, ``optimizer.pt`` (with an optimizer), ``trainer.pt`` and
    ``trainer.json`` (see the module).

    ``scheduler``: an LR scheduler (anything with ``state_dict()``);
    ``scaler``: a ``torch.amp.GradScaler``; ``extra``: a JSON object of
    the script's own (numpy values accepted; TypeError if not JSON-able).
    All random generators are saved: Python ``random``, numpy's global,
    torch CPU and each CUDA device when CUDA is available. Does not touch
    any generator or tensor. Raises what torch.save and the disk raise.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    weights: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        weights["optimizer"] = optimizer.state_dict()
    trainer: dict[str, Any] = {"torch_rng": _torch_rng()}
    if scheduler is not None:
        trainer["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        trainer["scaler"] = scaler.state_dict()
    meta = {
        "format": FORMAT,
        "parts": sorted([*weights, *(k for k in trainer if k != "torch_rng")]),
        "python_random": _python_rng(),
        "numpy_random": _numpy_rng(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "extra": dict(extra) if extra is not None else {},
        "torch_version": torch.__version__,
    }
    meta_bytes = encode_state(meta)  # before any file: a bad extra writes nothing
    with _without_crc32():
        for part, state in weights.items():
            torch.save(state, target / PART_FILES[part])
        torch.save(trainer, target / TRAINER_FILE)
    (target / META_FILE).write_bytes(meta_bytes)


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """torch.save without the zip format's CRC-32 of each tensor: the
    checkpoint's manifest holds each file's sha256, checked on restore, so
    the CRC-32 is a second check of the same bytes, and it halves the speed
    of a save (a 1 GiB state: 3.5 s against 1.8 s on this project's 2-core
    machine). torch >= 2.6 has the switch; older ones keep their default."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def load_state(
    folder: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    sampler: ResumableSampler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a state folder written by ``save_state`` into the objects given
    and return its ``extra`` dict.

    Every object given must have been saved (StateMismatch otherwise);
    parts saved but not asked for are ignored. The model loads strictly
    (RuntimeError on missing or unexpected keys, or shapes that differ).
    ``restore_rng``: also set the Python, numpy and torch generators (CUDA
    ones on as many devices as both machines have; a warning if the counts
    differ). ``weights_only=False`` only for a trusted folder whose
    scheduler state holds objects torch's safe loader refuses.
    FileNotFoundError if a file is missing (before anything changes);
    ValueError if ``trainer.json`` has another format. Peak memory: the
    state once, plus the model's tensors mapped from ``model.pt`` while they
    are copied in (file pages, dropped before the optimizer's are read).
    """
    source = Path(folder)
    meta = decode_state((source / META_FILE).read_bytes())
    if meta.get("format") not in (1, FORMAT):
        raise ValueError(f"{source / META_FILE}: format {meta.get('format')!r} != {FORMAT}")
    parts = set(meta.get("parts") or [])
    wanted = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    for name, obj in wanted.items():
        if obj is not None and name not in parts:
            raise StateMismatch(f"{source} holds no {name} state (saved: {sorted(parts)})")
    if sampler is not None and meta.get("sampler") is None:
        raise StateMismatch(f"{source} holds no sampler position")

    def load(name: str, *, mmap: bool = False) -> Any:
        return torch.load(source / name, map_location=map_location,
                          weights_only=weights_only, mmap=mmap)

    one_file = meta["format"] == 1
    files = [WEIGHTS_FILE] if one_file else [
        MODEL_FILE, *([OPTIMIZER_FILE] if optimizer is not None else [])]
    for name in files:
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name}: no such file")
    trainer = load(TRAINER_FILE)
    if sampler is not None:
        sampler.load_state_dict(meta["sampler"])  # checked before anything changes
    if one_file:
        weights = load(WEIGHTS_FILE)
        model.load_state_dict(weights["model"])
        if optimizer is not None:
            optimizer.load_state_dict(weights["optimizer"])
    else:
        model.load_state_dict(load(MODEL_FILE, mmap=True))  # unmapped on return
        if optimizer is not None:
            optimizer.load_state_dict(load(OPTIMIZER_FILE))
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(trainer["scaler"])
    if restore_rng:
        _set_python_rng(meta["python_random"])
        _set_numpy_rng(meta["numpy_random"])
        _set_torch_rng(trainer["torch_rng"])
    extra = meta.get("extra")
    return dict(extra) if isinstance(extra, dict) else {}


# --- plugging into gpuscout.workload -------------------------------------------------


def saver(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    sampler: ResumableSampler | None = None,
    extra: Extra | Callable[[], Extra] | None = None,
) -> Callable[[Path], None]:
    """The ``files=`` function of ``Run.step_done``: ``save_state`` into the
    folder it is given. ``extra`` may be a function, called at save time."""

    def save(folder: Path) -> None:
        save_state(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                   scaler=scaler, sampler=sampler,
                   extra=extra() if callable(extra) else extra)

    return save


def resume(
    run: Run,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    sampler: ResumableSampler | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the run's checkpoint (``run.restore_dir()``) into the objects
    given: ``(step, extra)``, or None on a fresh start (nothing changed).
    The restored folder is deleted once loaded. Raises as ``restore_dir``
    and ``load_state``."""
    restored = run.restore_dir()
    if restored is None:
        return None
    step, folder = restored
    try:
        extra = load_state(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, sampler=sampler, restore_rng=restore_rng)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return step, extra


__all__ = [
    "META_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "TRAINER_FILE", "WEIGHTS_FILE",
    "ResumableSampler", "StateMismatch",
    "load_state", "resumable_loader", "resume", "save_state", "saver",
]
