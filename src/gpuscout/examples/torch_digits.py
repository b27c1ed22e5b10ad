"""Example job: a small CNN on scikit-learn's bundled 8x8 digits, in PyTorch.

    python -m gpuscout.examples.torch_digits --steps N [--seed K] [--step-sleep S]
        [--out DIR] [--checkpoint-every M] [--port P] [--threads T]

Needs the ``torch`` extra (``pip install 'gpuscout[torch]'``). The data is
``sklearn.datasets.load_digits`` (1797 images, shipped with scikit-learn,
no download). One step is one batch of 32 images: Adam, a step LR schedule,
dropout, shuffled batches from a ``ResumableSampler``; the whole training
state (model, optimizer, scheduler, random generators, data position) is
checkpointed as files through ``gpuscout.workload`` and
``gpuscout.workload.torch``.

Exactness: on the CPU with deterministic algorithms and a fixed thread
count (``--threads``, default 1), a run restored from a checkpoint, here or
after a move under the control plane, ends with the same weights and
optimizer state, tensor for tensor, as a run that was never interrupted.

Endpoints (``--port`` standalone; under the agent, through its address):
``GET /status`` -> {"instance_id", "step", "loss", "total_steps"}.
Writes ``model.pt`` at the end: ``torch.save`` of {"model": state_dict,
"optimizer": state_dict, "steps": N, "seed": K, "accuracy": float} (load
with ``torch.load(path, weights_only=True)``), into ``--out`` standalone or
the job's artifacts under the control plane.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpuscout import workload
from gpuscout.examples.linreg import _non_negative_int, _port, _positive_int, _seconds

BATCH_SIZE = 32
LEARNING_RATE = 3e-3
LR_STEP = 100  # steps between LR decays
LR_GAMMA = 0.5
LOG_EVERY = 20

log = logging.getLogger("gpuscout.examples.torch_digits")


def build_parser() -> argparse.ArgumentParser:
    return digits_parser(
        "torch_digits", "Train a small CNN on the 8x8 digits data set (GPU Scout example job).")


def digits_images() -> tuple[Any, Any]:
    """scikit-learn's bundled 8x8 digits as tensors: images (N, 1, 8, 8) in
    [0, 1] (float32) and labels (N,) (int64). Needs torch and scikit-learn."""
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.long)


def digits_cnn() -> Any:
    """The small CNN the torch and Lightning examples train (10 classes)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(16 * 4 * 4, 10),
    )


def serve_status(run: workload.Run, example: str, port: int | None, total_steps: int,
                 progress: Callable[[], tuple[int | None, float | None]]) -> bool:
    """Serve the digits examples' ``GET /status`` -> {"instance_id", "step",
    "loss", "total_steps"}; ``progress()`` gives (step, loss) now (a loss
    that is not finite reads as null). False, after saying why on stderr,
    when ``port`` cannot be served."""

    def status(_: workload.Request) -> dict[str, Any]:
        step, loss = progress()
        return {"instance_id": run.instance_id, "step": step,
                "loss": loss if loss is not None and math.isfinite(loss) else None,
                "total_steps": total_steps}

    try:
        run.serve({"GET /status": status}, port=port)
    except OSError as exc:
        print(f"{example}: cannot serve on port {port}: {exc}", file=sys.stderr)
        return False
    return True


def digits_parser(example: str, description: str) -> argparse.ArgumentParser:
    """The options every digits example takes (torch_digits, lightning_digits,
    hf_digits): the same job shape under three frameworks."""
    parser = argparse.ArgumentParser(prog=f"python -m gpuscout.examples.{example}",
                                     description=description)
    parser.add_argument("--steps", type=_positive_int, required=True,
                        help="total training steps (batches of 32)")
    parser.add_argument("--step-sleep", type=_seconds, default=0.0,
                        help="extra seconds per step, to simulate a slower GPU (default 0)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the weights, dropout and batch order (default 0)")
    parser.add_argument("--out", default=".",
                        help="folder for model.pt and, standalone, .checkpoints/ (default .)")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=25,
                        help="checkpoint every M steps; 0: only when the agent asks (default 25)")
    parser.add_argument("--port", type=_port, default=None,
                        help="standalone: serve /status on this port")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads; keep it fixed across runs for exactness "
                             "(default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import sklearn  # type: ignore[import-untyped]  # noqa: F401  (digits_images needs it)
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        from gpuscout.workload import torch as gs_torch
    except ImportError as exc:
        print(f"torch_digits: {exc.name} is not installed; "
              "install the extra: pip install 'gpuscout[torch]'", file=sys.stderr)
        return 3

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    images, labels = digits_images()
    dataset = TensorDataset(images, labels)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_STEP, gamma=LR_GAMMA)
    sampler = gs_torch.ResumableSampler(len(dataset), batch_size=BATCH_SIZE, seed=args.seed)
    loader = gs_torch.resumable_loader(dataset, sampler)
    loss_fn = nn.CrossEntropyLoss()

    run = workload.init(checkpoint_every=args.checkpoint_every, default_dir=args.out)
    with run:
        live: dict[str, Any] = {"step": None, "loss": None}

        if not serve_status(run, "torch_digits", args.port, args.steps,
                            lambda: (live["step"], live["loss"])):
            return 1

        start = 0
        foreign = (f"does not belong to --seed {args.seed} --steps {args.steps}; use "
                   "another --out or delete its .checkpoints folder")
        try:
            resumed = gs_torch.resume(run, model=model, optimizer=optimizer,
                                      scheduler=scheduler, sampler=sampler)
        except gs_torch.StateMismatch as exc:  # another seed's data order, say
            print(f"torch_digits: the checkpoint found ({exc}) {foreign}", file=sys.stderr)
            return 2
        if resumed is not None:
            start, extra = resumed
            if extra.get("seed") != args.seed or start > args.steps:
                print(f"torch_digits: the checkpoint found (step {start}, seed "
                      f"{extra.get('seed')}) {foreign}", file=sys.stderr)
                return 2
            log.info("resuming after step %d", start)
        live["step"] = start

        save = gs_torch.saver(model=model, optimizer=optimizer, scheduler=scheduler,
                              sampler=sampler, extra={"seed": args.seed})
        model.train()
        step = start
        while step < args.steps:
            for x, y in loader:  # the rest of the current epoch
                step += 1
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = float(loss.item())
                if args.step_sleep:
                    time.sleep(args.step_sleep)
                live.update(step=step, loss=value)
                if step % LOG_EVERY == 0 or step == args.steps:
                    log.info("step %d/%d loss %.4f lr %.2e", step, args.steps, value,
                             scheduler.get_last_lr()[0])
                run.step_done(step, loss=value, total_steps=args.steps, files=save)
                if step == args.steps:
                    break

        model.eval()
        with torch.no_grad():
            accuracy = float((model(images).argmax(1) == labels).float().mean())
        model.train()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "steps": args.steps, "seed": args.seed, "accuracy": accuracy}, buffer)
        where = run.save_artifact("model.pt", buffer.getvalue())
        log.info("trained %d steps (accuracy on the data %.3f); model written to %s",
                 args.steps, accuracy, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
