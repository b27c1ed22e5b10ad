"""PyTorch Lightning: a ``Trainer.fit`` run that GPU Scout checkpoints, moves
and resumes exactly.

    import lightning as L
    from gpuscout.integrations.lightning import GpuScoutCallback, ResumableDataLoader
    from gpuscout.workload.torch import ResumableSampler

    L.seed_everything(seed, workers=True)
    sampler = ResumableSampler(len(dataset), batch_size=32, seed=seed)
    loader = ResumableDataLoader(dataset, sampler)        # its position is checkpointed
    gpuscout = GpuScoutCallback(checkpoint_every=50)      # or run=workload.init(...)
    trainer = L.Trainer(max_steps=total, deterministic=True, callbacks=[gpuscout])
    trainer.fit(model, loader, ckpt_path=gpuscout.ckpt_path())   # None on a fresh start
    gpuscout.run.save_artifact("model.pt", data)
    gpuscout.close()

Needs Lightning (``pip install lightning``); ``gpuscout.integrations``
itself imports nothing of it.

Each optimizer step is reported to GPU Scout (``Run.step_done``) from
``on_train_batch_end`` with ``trainer.global_step`` as the step. When a
checkpoint is due (the agent asks, e.g. for a move, or every
``checkpoint_every`` steps) it is Lightning's own full checkpoint,
``trainer.save_checkpoint(folder / "last.ckpt")`` (model, optimizers, LR
schedulers, loop progress, the train DataLoader's state when it has one,
callbacks' states), taken at that batch boundary, as ModelCheckpoint's
``every_n_train_steps`` does. This callback's own state in it holds the
random generators (Python, numpy, torch CPU and each CUDA device) as they
were at that boundary. When the agent asks to pause (the old instance of
a move, once its checkpoint is saved) ``step_done`` blocks inside the
callback, so the Trainer stops at that boundary until it is resumed or
stopped. Under an agent, SIGTERM (the agent stopping the job) ends the
process at once, as it does a plain script (Lightning's own handler would
wait for a batch boundary, which a paused run never reaches, and exit 0).

Resuming: ``ckpt_path()`` waits while the instance is a standby
replacement, then fetches the checkpoint the agent names (standalone: the
newest that verifies) and gives the ``last.ckpt`` file to pass to
``trainer.fit(..., ckpt_path=...)``, or None on a fresh start.

What Lightning 2.x restores by itself from a checkpoint taken mid-epoch:
weights, optimizer and scheduler states, ``global_step``, the epoch and
the batch index within it. What it does not: the position in the data
and the random generators. A plain ``DataLoader`` (not stateful: no
``state_dict``/``load_state_dict``) starts the interrupted epoch's
iteration again from its beginning, re-shuffled with a fresh draw, while
the loop counts the batches already done, so the rest of that epoch sees
other samples than the uninterrupted run's (Lightning warns "your
dataloader is not resumable"). A loader that has ``state_dict`` and
``load_state_dict`` (``_Stateful``) is saved in the checkpoint's loop
state and loaded before the first ``iter()`` after the restore; that is
what ``ResumableDataLoader`` is.

Exact after a move (the final weights and optimizer state equal an
uninterrupted run's, tensor for tensor: tests/integration/test_lightning.py)
with: ``ResumableDataLoader`` over a ``ResumableSampler``, this callback,
``seed_everything(seed)``, ``Trainer(deterministic=True)``, the same code,
library versions, hardware kind and thread count, and one process; for a
checkpoint at any step: mid-epoch or at an epoch's end, with gradient
accumulation (checkpoints are taken only at optimizer steps: batches that
accumulate report nothing, so no partial gradient sum is ever lost), and
with ``limit_train_batches`` (the sampler's pass then spans several
Lightning epochs; its position is still the one saved). The random
generators restored are those of the saving run when it took the
checkpoint, so dropout and any draw in the main process match.

Not exact, or not covered:

- a plain ``DataLoader`` (see above): weights differ after a mid-epoch
  resume, and, when it shuffles, after a checkpoint at an epoch's end too:
  the draws of its ``RandomSampler`` (from the global generator, or from
  the loader's own ``generator``) are in no checkpoint, and the restored
  run's ``iter()`` comes before the generators are restored.
- random draws made in DataLoader worker processes (``num_workers > 0``):
  a resumed epoch hands its batches to other workers. The data order is
  exact with workers (the position counts batches delivered to the loop,
  not those prefetched).
- random draws made after this callback's ``on_train_batch_end`` and
  before the next batch is fetched (by later callbacks, or the module's
  ``on_train_batch_end``): the generators are saved before them and
  restored at ``on_train_start``, so the resumed run does not repeat them.
- validation: when validation was due right after the checkpointed batch,
  Lightning's resumed loop counts it as done without running it (its
  metrics, and whatever EarlyStopping or a ReduceLROnPlateau scheduler
  would do with them, are missing). Training without validation, or
  checkpoints on other steps, are unaffected.
- several processes (DDP): refused at ``setup``.
- loggers: what Lightning itself restores, nothing more.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gpuscout.integrations.lightning needs PyTorch Lightning: pip install lightning"
    ) from exc
import torch
from torch.utils.data import DataLoader

from gpuscout import workload
from gpuscout.workload.checkpoint import CheckpointError
from gpuscout.workload.runtime import Run
from gpuscout.workload.torch import (
    ResumableSampler,
    _numpy_rng,
    _python_rng,
    _set_numpy_rng,
    _set_python_rng,
    _set_torch_rng,
    _torch_rng,
)

log = logging.getLogger("gpuscout.integrations.lightning")

CKPT_FILE = "last.ckpt"
STATE_FORMAT = 1


class ResumableDataLoader(DataLoader[Any]):
    """``DataLoader(dataset, batch_sampler=sampler)`` whose position is part
    of Lightning's checkpoint, so a resumed run goes on at the next batch.

    Lightning saves the ``state_dict()`` of a train loader that has one in
    the checkpoint's loop state and calls ``load_state_dict()`` before its
    first ``iter()`` after a restore. The position counts batches
    *delivered* (handed out by the iterator), not those the sampler gave
    to worker processes ahead of time. ``len()`` is a whole epoch of the
    sampler (Lightning counts the batches of an epoch already done itself).
    Iterating it never draws from the global torch generator: it has a
    generator of its own, seeded with the sampler's seed, unless
    ``generator=`` is given. ``kwargs`` go to ``DataLoader`` and must not
    hold ``batch_size``, ``shuffle``, ``sampler``, ``drop_last`` or
    ``batch_sampler``.
    """

    def __init__(self, dataset: Any, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a gpuscout.workload.torch.ResumableSampler, "
                            f"got {type(sampler).__name__}")
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, batch_sampler=sampler, **kwargs)
        self._resumable = sampler
        self._position: tuple[int, int] | None = None  # (epoch, delivered) of the last iter()

    def __len__(self) -> int:
        return self._resumable.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        state = self._resumable.state_dict()
        epoch, done = int(state["epoch"]), int(state["batch"])
        if done >= self._resumable.batches_per_epoch:
            epoch, done = epoch + 1, 0
        self._position = (epoch, done)
        # Made before the sampler is asked for anything (worker processes
        # prefetch at once): the position above is where this pass starts.
        return self._deliver(super().__iter__(), epoch, done)

    def _deliver(self, batches: Iterator[Any], epoch: int, done: int) -> Iterator[Any]:
        for batch in batches:
            done += 1
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's configuration and the position of delivered batches."""
        state: dict[str, Any] = dict(self._resumable.state_dict())
        if self._position is not None:
            state["epoch"], state["batch"] = self._position
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Go on from ``state_dict``'s position (StateMismatch if it is
        another sampler's: other length, batch size, seed...)."""
        self._resumable.load_state_dict(state_dict)
        self._position = None


def _rng_state() -> dict[str, Any]:
    return {"python": _python_rng(), "numpy": _numpy_rng(), "torch": _torch_rng()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    _set_python_rng(state["python"])
    _set_numpy_rng(state["numpy"])
    _set_torch_rng(state["torch"])


def _loss_of(outputs: Any) -> float | None:
    """The loss of a training_step's output (a tensor or {"loss": tensor})."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    if isinstance(outputs, int | float):
        return float(outputs)
    return None


def ckpt_path(run: Run | GpuScoutCallback | None) -> str | None:
    """The checkpoint file to resume from, for ``trainer.fit(...,
    ckpt_path=...)``; None on a fresh start. See ``GpuScoutCallback.ckpt_path``
    (the way to resume); for a ``Run``, the same without the callback's
    bookkeeping; for None (no GPU Scout run), None."""
    if run is None:
        return None
    if isinstance(run, GpuScoutCallback):
        return run.ckpt_path()
    restored = run.restore_dir()
    if restored is None:
        return None
    step, folder = restored
    path = Path(folder) / CKPT_FILE
    if not path.is_file():
        raise CheckpointError(f"the checkpoint of step {step} holds no {CKPT_FILE}: it was not "
                              "saved by GpuScoutCallback")
    return str(path)


class GpuScoutCallback(pl.Callback):
    """Reports each optimizer step to GPU Scout, checkpoints when due,
    pauses when asked; see the module.

    ``run``: a ``gpuscout.workload`` run; None: one is made on first use
    with ``workload.init(checkpoint_every=checkpoint_every,
    default_dir=default_dir)`` (standalone, checkpoints go to
    ``<default_dir>/.checkpoints``) and closed by ``close()`` (or ``with``).
    Giving ``run`` with ``checkpoint_every`` or ``default_dir`` is a
    ValueError (the run has its own).
    """

    def __init__(self, run: Run | None = None, checkpoint_every: int | None = None, *,
                 default_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if run is not None and (checkpoint_every is not None or default_dir is not None):
            raise ValueError("give checkpoint_every and default_dir to workload.init() when "
                             "passing run=")
        if checkpoint_every is not None and checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 or None: only when asked)")
        self._run = run
        self._owns_run = run is None
        self._checkpoint_every = checkpoint_every
        self._default_dir = default_dir if default_dir is not None else "."
        self._restored_file: Path | None = None  # what ckpt_path() gave, until fit has read it
        self._resolved = False  # ckpt_path() was called
        self.restored_step: int | None = None  # the step ckpt_path() found
        self._reported: int | None = None  # the last step reported
        self._total_steps: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = workload.init(checkpoint_every=self._checkpoint_every,
                                      default_dir=self._default_dir)
        return self._run

    def ckpt_path(self) -> str | None:
        """The ``last.ckpt`` to pass as ``trainer.fit(..., ckpt_path=...)``,
        or None on a fresh start; call it once, before ``fit``.

        Under an agent this first waits while the instance is a standby
        replacement, then fetches the step the agent names; standalone the
        newest checkpoint that verifies. The file lives in a folder the run
        owns, deleted once ``fit`` has read it (its ``on_train_start``, or
        its end) or by ``close()``.
        Raises as ``Run.restore_dir``, and CheckpointError for a
        checkpoint that holds no ``last.ckpt``.
        """
        self._drop_restored()
        path = ckpt_path(self.run)
        self._resolved = True
        self._restored_file = Path(path) if path is not None else None
        last = self.run.last_checkpoint
        self.restored_step = last.step if path is not None and last is not None else None
        return path

    def close(self) -> None:
        """Close the run if this callback made it (idempotent)."""
        self._drop_restored()
        if self._owns_run and self._run is not None:
            self._run.close()

    def __enter__(self) -> GpuScoutCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop_restored(self) -> None:
        """Delete the restored checkpoint's folder (Lightning has read it)."""
        if self._restored_file is not None:
            shutil.rmtree(self._restored_file.parent, ignore_errors=True)
            self._restored_file = None

    # --- Lightning hooks ----------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise RuntimeError("GpuScoutCallback supports one training process; this Trainer "
                               f"runs {trainer.world_size} (devices x nodes)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self._resolved and trainer.ckpt_path is None:
            self._refuse_unresolved_start()
        if self.restored_step is not None and step != self.restored_step:
            raise CheckpointError(f"GPU Scout restored the checkpoint of step "
                                  f"{self.restored_step} but the Trainer starts at step {step}: "
                                  "pass ckpt_path=callback.ckpt_path() to trainer.fit")
        self._drop_restored()  # loaded: Lightning has dropped the file's contents too
        self._reported = step
        self._total_steps = _total_steps(trainer)
        if self.run.managed:
            _die_on_sigterm()
        if self._rng_to_restore is not None:
            # As late as possible before the first batch is fetched: the
            # restored generators are those the saving run had at this point.
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._drop_restored()  # a fit that had nothing left to train never started

    def _refuse_unresolved_start(self) -> None:
        run = self.run
        if run.managed:
            raise RuntimeError("under GPU Scout, pass ckpt_path=callback.ckpt_path() to "
                               "trainer.fit: a replacement instance must resume the checkpoint "
                               "it is given")
        latest = run.checkpoints.latest()
        if latest is not None:
            raise RuntimeError(f"a checkpoint of step {latest.step} exists for this run; pass "
                               "ckpt_path=callback.ckpt_path() to trainer.fit to resume it (or "
                               "delete the checkpoints to start over)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._reported is not None and step <= self._reported:
            return  # accumulating gradients: no optimizer step in this batch

        def save(folder: Path) -> None:
            trainer.save_checkpoint(folder / CKPT_FILE, weights_only=False)

        self._reported = step
        self.run.step_done(step, loss=_loss_of(outputs), total_steps=self._total_steps,
                           files=save)

    def state_dict(self) -> dict[str, Any]:
        """Saved in each Lightning checkpoint: the random generators now."""
        return {"format": STATE_FORMAT, "rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT or "rng" not in state_dict:
            log.warning("the checkpoint's GpuScoutCallback state has another format: random "
                        "generators not restored")
            return
        self._rng_to_restore = state_dict["rng"]


def _die_on_sigterm() -> None:
    """SIGTERM ends the process at once, by that signal, after Lightning's
    own handler (installed for this ``fit``, which restores the one before
    it when ``fit`` ends) has run.

    Alone, Lightning's handler only sets a flag and the loop raises
    ``SIGTERMException`` (a ``SystemExit``: exit code 0) at the next batch
    boundary: a paused run blocked in ``step_done`` never reaches it (the
    agent SIGKILLs it after its grace period), and a running one would
    exit 0, which the agent reads as completed.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    lightning_handler = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        if callable(lightning_handler):
            lightning_handler(signum, frame)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimated = float(trainer.estimated_stepping_batches)
    except Exception:  # an iterable loader without a length, say
        return None
    return int(estimated) if math.isfinite(estimated) else None


__all__ = ["CKPT_FILE", "GpuScoutCallback", "ResumableDataLoader", "ckpt_path"]
