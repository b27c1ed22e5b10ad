"""Example job that does not import GPU Scout: a plain PyTorch script.

    python plain_digits.py --steps N [--seed K] [--step-sleep S] [--save-every M]

A small CNN on scikit-learn's bundled 8x8 digits (no download), written as
any PyTorch user writes a script for SLURM or SageMaker. It follows the
checkpoint-folder convention GPU Scout's agent keeps (see the README,
"Scripts that do not import GPU Scout"):

- it resumes from the files in ``$GPUSCOUT_CHECKPOINT_DIR`` (``./checkpoint``
  when unset) if ``STEP`` is there;
- it saves every ``--save-every`` steps, on ``SIGUSR1`` (a move or a spot
  notice: then it exits 0 after the save) and at the end: ``state.pt`` first,
  then ``STEP`` (the number of completed steps) under a temporary name,
  renamed over the old one;
- ``state.pt`` holds the whole training state: model, Adam, the LR schedule,
  the random generators (Python, numpy, torch) and the position in the
  data (epoch and batch), so a run resumed from any save ends with the same
  weights, tensor for tensor, as one never interrupted (CPU, deterministic
  algorithms, one thread).

Nothing here imports ``gpuscout``: copy the file into a project folder and
run it as ``python plain_digits.py``; ``python -m
gpuscout.examples.plain_digits`` runs the same code.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

BATCH_SIZE = 32
LEARNING_RATE = 3e-3
LR_STEP = 100
LR_GAMMA = 0.5

stop_requested = False


def on_sigusr1(signum: int, frame: Any) -> None:
    global stop_requested
    stop_requested = True  # acted on at the next step boundary


def save(folder: Path, state: dict[str, Any], step: int) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "state.pt")
    tmp = folder / ".STEP.tmp"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, folder / "STEP")  # STEP last: the save is complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small CNN on the digits data.")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save-every", type=int, default=25)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from torch import nn

    signal.signal(signal.SIGUSR1, on_sigusr1)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(16 * 4 * 4, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_STEP, gamma=LR_GAMMA)
    batches = len(images) // BATCH_SIZE  # per epoch; the last partial batch is dropped

    folder = Path(os.environ.get("GPUSCOUT_CHECKPOINT_DIR") or "checkpoint")
    step = 0
    if (folder / "STEP").exists():
        state = torch.load(folder / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from step {step}", flush=True)

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
                "step": step}

    model.train()
    loss_fn = nn.CrossEntropyLoss()
    while step < args.steps:
        epoch, position = divmod(step, batches)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
            args.seed * 1_000_003 + epoch))
        index = order[position * BATCH_SIZE:(position + 1) * BATCH_SIZE]
        optimizer.zero_grad()
        loss = loss_fn(model(images[index]), labels[index])
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if stop_requested:
            save(folder, training_state(), step)
            print(f"SIGUSR1: saved step {step}, exiting", flush=True)
            return 0
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save(folder, training_state(), step)
    print(f"done: {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
