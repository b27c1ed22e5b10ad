"""Hugging Face ``Trainer`` runs that move with GPU Scout, exactly.

    from gpuscout.integrations.transformers import GpuScoutCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    gpuscout = GpuScoutCallback(trainer=trainer)   # adds itself to the trainer
    trainer.train(resume_from_checkpoint=gpuscout.resume_from_checkpoint())

``GpuScoutCallback(run=None, *, trainer=None, checkpoint_every=None,
default_dir=".")`` is a ``transformers.TrainerCallback``. ``run``: a
``gpuscout.workload`` run (None: the callback makes one with
``workload.init(checkpoint_every=..., default_dir=...)``, standalone
or under an agent as the environment says). It needs the trainer: give
``trainer=`` or call ``attach(trainer)``, which adds the callback to the
trainer's callbacks unless it is there already (it may also be passed in
``Trainer(callbacks=[...])`` and attached afterwards).

At every ``on_step_end`` it reports the completed optimizer step
(``state.global_step``), the Trainer's last logged loss and
``state.max_steps`` with ``run.step_done``. When a checkpoint is due (the
agent asks, before a move or a spot reclaim, or ``checkpoint_every``) the
callback has the Trainer write its own full checkpoint
(``Trainer._save_checkpoint``: weights, ``optimizer.pt``,
``scheduler.pt``, the scaler, ``rng_state.pth``, ``trainer_state.json``)
into the checkpoint's staging folder, as ``checkpoint-<step>/``, at this
step boundary; the Trainer's ``output_dir``, its rotation and its hub
pushes are left alone. This is what transformers' own just-in-time
checkpoint callback (``enable_jit_checkpoint``) does from ``on_step_end``.
Why not ``control.should_save`` and ``on_save``: whether a checkpoint is
due is known only inside ``step_done``, which must have the files before
it returns (then it may pause), while a save requested through ``control``
happens after ``on_step_end`` has returned. ``resume_from_checkpoint()``
restores the run's checkpoint (``run.restore_dir()``; under an agent it
waits while the replacement is on standby) and returns the folder for
``trainer.train(resume_from_checkpoint=...)``, None on a fresh start;
the module function ``resume_from_checkpoint(run_or_none)`` does the same
for a run of one's own (None: no GPU Scout, None). The restored folder is
deleted once the Trainer has read it (its first step, or the end of
``train``).

Exactness. A run moved (or restarted from a checkpoint) ends with the same
weights, optimizer and scheduler state and torch generator, tensor for
tensor, as a run never interrupted, given the same code, library versions,
hardware kind, thread count and deterministic algorithms, and the Trainer's
defaults for what follows. ``tests/integration/test_transformers.py``
checks it for the ``hf_digits`` example (a BERT with dropout, AdamW, a
warm-up schedule, shuffled batches): moved mid-epoch between two agents,
and stopped half-way then run on from a checkpoint at an epoch boundary.

- data order: with the default sampler (``RandomSampler``, which
  accelerate replaces with its ``SeedableRandomSampler``:
  ``accelerator_config.use_seedable_sampler=True``), an epoch's order is a
  function of ``data_seed`` (else the torch seed the Trainer set from
  ``seed``) and the epoch only, and the resumed Trainer skips
  the batches of the current epoch already trained (``ignore_data_skip``
  False, the default): the remaining batches are those the uninterrupted
  run took.
- random generators: Python's, numpy's, torch's CPU one and the current
  CUDA device's are saved and restored (``rng_state.pth``), so dropout
  draws go on as in the uninterrupted run.

Not exact, by the Trainer's own resume logic (seen with transformers 5.24
and accelerate 1.15 on the ``hf_digits`` setup, 57 batches an epoch,
resumed vs. uninterrupted):

- after a mid-epoch resume the Trainer restores the generators only after
  it has fetched the first batch (gradient-accumulation chunk) of the
  resumed epoch: randomness drawn while collating or loading that batch
  (``DataCollatorForLanguageModeling`` masking, random augmentation in the
  dataset) comes from the new process's generators, and every draw after
  it is shifted (a collator masking with ``torch.rand``: weights differ
  after a resume at step 40, equal after one at 57 or 114, epoch ends).
- ``use_seedable_sampler=False``: a ``RandomSampler`` draws each epoch's
  order from the global generator when the epoch starts, and the resumed
  epoch's order is drawn before the generators are restored: weights
  differ after a resume at step 80 (mid-epoch), equal at 114 (an epoch end).
- with ``dataloader_num_workers > 0`` the workers' seeds of a resumed
  epoch are drawn before the generators are restored (randomness in
  workers differs; the batches themselves do not).
- bookkeeping that is not training state: the loss the Trainer logs for
  the first logging window after a resume averages only the steps since
  the resume, ``train_loss``/``train_runtime`` in ``train()``'s metrics
  cover this process only, and ``total_flos`` may differ in its last bits
  (summed in other groups).
- ``ignore_data_skip=True`` (starts the epoch over) and
  ``save_only_model=True`` (no optimizer, scheduler or generators) make a
  resume inexact; the callback warns. Multi-process training
  (``world_size > 1``) is refused: every rank would have to save together.
  Hyperparameter search trials are not supported.

At an epoch boundary (a checkpoint of an epoch's last step) the first
three are exact too: the generators are restored before the next epoch's
first draw.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from gpuscout.workload.runtime import Run, init

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger("gpuscout.integrations.transformers")

INSTALL_HINT = "pip install transformers accelerate"
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _trainer_callback() -> type:
    """``transformers.TrainerCallback``; ImportError naming the install."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(
            f"GpuScoutCallback needs Hugging Face transformers ({exc}): {INSTALL_HINT}"
        ) from exc
    return TrainerCallback  # type: ignore[no-any-return]


# Each class (GpuScoutCallback or a subclass) with TrainerCallback mixed in.
_WITH_BASE: dict[type, type] = {}


def resume_from_checkpoint(run: Run | None) -> str | None:
    """The Trainer checkpoint folder to resume from, for
    ``trainer.train(resume_from_checkpoint=...)``: the run's checkpoint
    restored (``run.restore_dir()``: under an agent, the step it names,
    after its standby; else the newest that verifies). None on a fresh
    start, or when ``run`` is None (no GPU Scout). The folder is the run's:
    deleted by ``run.close()`` or the next restore. ValueError if the
    checkpoint is not a Trainer checkpoint of its step (another script's).
    """
    if run is None:
        return None
    restored = run.restore_dir()
    if restored is None:
        return None
    step, folder = restored
    return str(_trainer_checkpoint(folder, step))


def _trainer_checkpoint(folder: Path, step: int) -> Path:
    """The Trainer checkpoint inside a restored folder: ``checkpoint-<step>``
    (what the callback writes), else the folder itself if it is one."""
    candidates = [folder / f"{CHECKPOINT_PREFIX}-{step}", folder]
    found = next((c for c in candidates if (c / TRAINER_STATE).is_file()), None)
    if found is None:
        raise ValueError(
            f"the checkpoint of step {step} holds no Hugging Face Trainer checkpoint "
            f"({CHECKPOINT_PREFIX}-{step}/{TRAINER_STATE}): it was saved by another script")
    try:
        saved_step = json.loads((found / TRAINER_STATE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{found / TRAINER_STATE} is not a Trainer state: {exc}") from None
    if saved_step != step:
        raise ValueError(f"the checkpoint of step {step} holds the Trainer state of step "
                         f"{saved_step}")
    return found


class GpuScoutCallback:
    """Reports each optimizer step of a ``Trainer`` to GPU Scout and has the
    Trainer write its full checkpoint when one is due (see the module).

    Made without transformers installed it raises ImportError naming
    ``pip install transformers accelerate``; made with it, the instance is a
    ``transformers.TrainerCallback`` (the class is mixed with it on first
    use, so importing this module imports no transformers).

    ``step`` and ``loss``: the last step reported and the last loss the
    Trainer logged (``logging_steps``), for a status endpoint. ``restored_step``:
    the step ``resume_from_checkpoint()`` restored, or None.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        base = _trainer_callback()
        if not issubclass(cls, base):
            mixed = _WITH_BASE.get(cls)
            if mixed is None:
                mixed = type(cls.__name__, (cls, base), {
                    "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__,
                })
                _WITH_BASE[cls] = mixed
            cls = mixed
        return object.__new__(cls)

    def __init__(
        self,
        run: Run | None = None,
        *,
        trainer: Trainer | None = None,
        checkpoint_every: int | None = None,
        default_dir: str = ".",
    ) -> None:
        if run is not None and checkpoint_every is not None:
            raise ValueError("checkpoint_every is for the run the callback makes; with run= "
                             "give it to workload.init(checkpoint_every=...)")
        self._owns_run = run is None
        self.run: Run = run if run is not None else init(checkpoint_every=checkpoint_every,
                                                         default_dir=default_dir)
        self.trainer: Trainer | None = None
        self.step: int | None = None
        self.loss: float | None = None
        self.restored_step: int | None = None
        self._restored: Path | None = None  # the folder to delete once the Trainer read it
        if trainer is not None:
            self.attach(trainer)

    # --- setup -----------------------------------------------------------

    def attach(self, trainer: Trainer) -> Self:
        """Use ``trainer`` to save checkpoints; add this callback to its
        callbacks unless it is there already. Returns the callback."""
        if self.trainer is not None and self.trainer is not trainer:
            raise ValueError("this GpuScoutCallback is attached to another Trainer already")
        self.trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(cast(Any, self))
        return self

    def resume_from_checkpoint(self) -> str | None:
        """The checkpoint folder for ``trainer.train(resume_from_checkpoint=...)``,
        None on a fresh start (see the module function). Sets ``restored_step``."""
        self._drop_restored()
        path = resume_from_checkpoint(self.run)
        if path is None:
            self.restored_step = None
            return None
        self.restored_step = self.run.last_checkpoint.step if self.run.last_checkpoint else None
        self._restored = Path(path)
        log.info("resuming the Trainer from the checkpoint of step %s", self.restored_step)
        return path

    def close(self) -> None:
        """Delete a restored folder left; close the run if the callback made it."""
        self._drop_restored()
        if self._owns_run:
            self.run.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Trainer events ----------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError("GpuScoutCallback needs its Trainer to save checkpoints: "
                               "GpuScoutCallback(trainer=trainer) or callback.attach(trainer)")
        if args.world_size > 1:
            raise RuntimeError("GpuScoutCallback supports single-process training only "
                               f"(world_size is {args.world_size})")
        if args.ignore_data_skip:
            log.warning("ignore_data_skip=True: a resumed run starts its epoch over; "
                        "GPU Scout moves will not be exact")
        if getattr(args, "save_only_model", False):
            log.warning("save_only_model=True: checkpoints hold no optimizer, scheduler or "
                        "random state; GPU Scout moves will not be exact")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float):
            self.loss = float(loss)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        # By now the Trainer has read the restored checkpoint, generators included.
        self._drop_restored()
        step = int(state.global_step)
        self.step = step
        self.run.step_done(step, loss=self.loss, total_steps=state.max_steps or None,
                           files=self._save)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self._drop_restored()

    # --- internals ---------------------------------------------------------

    def _save(self, folder: Path) -> None:
        """The ``files=`` function: the Trainer's own checkpoint of this step,
        written to ``folder/checkpoint-<step>``."""
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("GpuScoutCallback is not attached to a Trainer")
        if not callable(getattr(trainer, "_save_checkpoint", None)):
            raise RuntimeError(f"{type(trainer).__name__} has no _save_checkpoint: this "
                               "transformers version is not supported")
        target = folder / f"{CHECKPOINT_PREFIX}-{trainer.state.global_step}"
        args = trainer.args
        push_to_hub = args.push_to_hub

        def output_dir(trial: Any = None) -> str:
            return str(folder)

        # Into the staging folder, not output_dir: no rotation of the user's
        # checkpoints, no hub push of a GPU Scout one.
        trainer._get_output_dir = output_dir  # type: ignore[method-assign]
        args.push_to_hub = False
        try:
            trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        finally:
            del trainer._get_output_dir
            args.push_to_hub = push_to_hub
        if not (target / TRAINER_STATE).is_file():
            import transformers

            raise RuntimeError(f"the Trainer wrote no {target.name}/{TRAINER_STATE}: "
                               f"transformers {transformers.__version__} saves elsewhere")

    def _drop_restored(self) -> None:
        if self._restored is not None:
            # The run's own folder (restore_dir), the checkpoint folder in it.
            owned = self._restored.parent if self._restored.name.startswith(
                f"{CHECKPOINT_PREFIX}-") else self._restored
            shutil.rmtree(owned, ignore_errors=True)
            self._restored = None


__all__ = ["GpuScoutCallback", "INSTALL_HINT", "resume_from_checkpoint"]
