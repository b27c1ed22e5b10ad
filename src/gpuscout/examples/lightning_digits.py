"""Example job: torch_digits' small CNN on scikit-learn's bundled 8x8 digits,
trained by a PyTorch Lightning ``Trainer`` with ``GpuScoutCallback``.

    python -m gpuscout.examples.lightning_digits --steps N [--seed K] [--step-sleep S]
        [--out DIR] [--checkpoint-every M] [--port P] [--threads T]

Needs Lightning and scikit-learn (``pip install lightning scikit-learn``).
The data is ``sklearn.datasets.load_digits`` (1797 images, no download);
one step is one batch of 32 images (57 batches an epoch): Adam, a step LR
schedule stepped every optimizer step, dropout, shuffled batches from a
``ResumableSampler`` through ``ResumableDataLoader``, ``Trainer(max_steps=N,
deterministic=True)`` on the CPU after ``seed_everything(K, workers=True)``.
Checkpoints are Lightning's own (``last.ckpt``), taken by the callback at
a step boundary when the agent asks or every ``--checkpoint-every`` steps,
and resumed with ``trainer.fit(..., ckpt_path=callback.ckpt_path())``.

Exactness: with a fixed thread count (``--threads``, default 1), a run
resumed from a checkpoint (standalone in the same ``--out``, or after a
move under the control plane), mid-epoch or not, ends with the same
weights and optimizer state, tensor for tensor, as an uninterrupted run
(see ``gpuscout.integrations.lightning`` for what this rests on).

Endpoints (``--port`` standalone; under the agent, through its address):
``GET /status`` -> {"instance_id", "step", "loss", "total_steps"}.
Writes ``model.pt`` at the end: ``torch.save`` of {"model": the CNN's
state_dict, "optimizer": Adam's state_dict, "steps": N, "seed": K,
"accuracy": float} (load with ``torch.load(path, weights_only=True)``),
into ``--out`` standalone or the job's artifacts under the control plane.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import warnings
from typing import Any

from gpuscout import workload
from gpuscout.examples.torch_digits import (
    digits_cnn,
    digits_images,
    digits_parser,
    serve_status,
)

BATCH_SIZE = 32
LEARNING_RATE = 3e-3
LR_STEP = 100  # steps between LR decays
LR_GAMMA = 0.5
LOG_EVERY = 20

log = logging.getLogger("gpuscout.examples.lightning_digits")


def build_parser() -> argparse.ArgumentParser:
    return digits_parser(
        "lightning_digits",
        "Train a small CNN on the 8x8 digits data set with PyTorch Lightning (GPU Scout example "
        "job).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import lightning.pytorch as pl
        import sklearn  # type: ignore[import-untyped]  # noqa: F401  (digits_images needs it)
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        from gpuscout.integrations.lightning import GpuScoutCallback, ResumableDataLoader
        from gpuscout.workload import torch as gs_torch
    except ImportError as exc:
        print(f"lightning_digits: {exc.name or exc} is not installed; "
              "pip install lightning scikit-learn", file=sys.stderr)
        return 3

    # CPU only, one process, quiet: no progress bar, logger or model summary.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # tips, device lines
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    images, labels = digits_images()
    dataset = TensorDataset(images, labels)
    sampler = gs_torch.ResumableSampler(len(dataset), batch_size=BATCH_SIZE, seed=args.seed)
    loader = ResumableDataLoader(dataset, sampler)
    live: dict[str, Any] = {"step": None, "loss": None}

    class DigitsCNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = digits_cnn()
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = self.loss_fn(self.net(x), y)
            if args.step_sleep:
                time.sleep(args.step_sleep)
            return loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            step, value = self.trainer.global_step, float(outputs["loss"])
            live.update(step=step, loss=value)
            if step % LOG_EVERY == 0 or step == args.steps:
                lr = self.trainer.optimizers[0].param_groups[0]["lr"]
                log.info("step %d/%d loss %.4f lr %.2e", step, args.steps, value, lr)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_STEP,
                                                        gamma=LR_GAMMA)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model = DigitsCNN()
    run = workload.init(checkpoint_every=args.checkpoint_every, default_dir=args.out)
    with run:
        if not serve_status(run, "lightning_digits", args.port, args.steps,
                            lambda: (live["step"], live["loss"])):
            return 1

        callback = GpuScoutCallback(run=run)
        path = callback.ckpt_path()  # None on a fresh start
        foreign = (f"does not belong to --seed {args.seed} --steps {args.steps}; use "
                   "another --out or delete its .checkpoints folder")
        start = callback.restored_step or 0
        if start > args.steps:
            print(f"lightning_digits: the checkpoint found (step {start}) {foreign}",
                  file=sys.stderr)
            return 2
        if path is not None:
            log.info("resuming after step %d", start)
        live["step"] = start

        trainer = pl.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, deterministic=True,
            callbacks=[callback], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=args.out,
        )
        try:
            trainer.fit(model, loader, ckpt_path=path)
        except gs_torch.StateMismatch as exc:  # another seed's data order, say
            print(f"lightning_digits: the checkpoint found ({exc}) {foreign}", file=sys.stderr)
            return 2

        net = model.net
        net.eval()
        with torch.no_grad():
            accuracy = float((net(images).argmax(1) == labels).float().mean())
        buffer = io.BytesIO()
        torch.save({"model": net.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                    "steps": args.steps, "seed": args.seed, "accuracy": accuracy}, buffer)
        where = run.save_artifact("model.pt", buffer.getvalue())
        log.info("trained %d steps (accuracy on the data %.3f); model written to %s",
                 args.steps, accuracy, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
