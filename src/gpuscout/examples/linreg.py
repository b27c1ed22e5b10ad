"""Example job: linear regression trained by mini-batch SGD with numpy.

    python -m gpuscout.examples.linreg --steps N [--step-sleep S] [--seed K]
        [--out DIR] [--checkpoint-every M] [--port P]

Exactness: the data set is generated from the seed, and step s draws its
minibatch from an RNG seeded with (seed, s), so the state after step s
depends only on the state after step s-1. A run restored from the
checkpoint of step s (coef, intercept as exact JSON floats) therefore ends
with the same model, bit for bit, as a run that was never interrupted.

Endpoints (``--port`` standalone; under the agent, through its address):
``GET /status`` -> {"instance_id", "step", "loss", "total_steps"};
``POST /predict`` {"x": [[8 numbers], ...]} -> {"y": [...]}.
Writes ``model.json`` {"coef", "intercept", "steps"} at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpuscout import workload

N_FEATURES = 8
N_ROWS = 4096
BATCH_SIZE = 64
LEARNING_RATE = 0.05
NOISE = 0.1

log = logging.getLogger("gpuscout.examples.linreg")

Vector = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Dataset:
    x: NDArray[np.float64]  # (N_ROWS, N_FEATURES)
    y: Vector  # (N_ROWS,)
    true_coef: Vector
    true_intercept: float


def make_dataset(seed: int) -> Dataset:
    rng = np.random.default_rng([seed, 0xDA7A])
    true_coef = rng.normal(0.0, 2.0, N_FEATURES)
    true_intercept = float(rng.normal(0.0, 1.0))
    x = rng.normal(0.0, 1.0, (N_ROWS, N_FEATURES))
    y = x @ true_coef + true_intercept + rng.normal(0.0, NOISE, N_ROWS)
    return Dataset(x, y, true_coef, true_intercept)


def sgd_step(
    data: Dataset, coef: Vector, intercept: float, *, seed: int, step: int
) -> tuple[Vector, float, float]:
    """Run step ``step`` (1-based) from the given model; return the new
    model and the minibatch's mean squared error before the update."""
    rng = np.random.default_rng([seed, step])
    rows = rng.integers(0, N_ROWS, BATCH_SIZE)
    x, y = data.x[rows], data.y[rows]
    error = x @ coef + intercept - y
    loss = float(np.mean(error * error))
    coef = coef - LEARNING_RATE * (2.0 / BATCH_SIZE) * (x.T @ error)
    intercept = intercept - LEARNING_RATE * 2.0 * float(np.mean(error))
    return coef, intercept, loss


def train(seed: int, steps: int) -> tuple[Vector, float]:
    """The model after ``steps`` uninterrupted steps (the reference of the
    exactness contract; the CLI runs the same ``sgd_step`` sequence)."""
    data = make_dataset(seed)
    coef, intercept = np.zeros(N_FEATURES), 0.0
    for step in range(1, steps + 1):
        coef, intercept, _ = sgd_step(data, coef, intercept, seed=seed, step=step)
    return coef, intercept


def checkpoint_state(coef: Vector, intercept: float, step: int, seed: int) -> dict[str, Any]:
    """The state saved at a checkpoint; the seed guards against resuming
    another run's checkpoints."""
    return {"coef": coef.tolist(), "intercept": intercept, "step": step, "seed": seed}


def encode_model(coef: Vector, intercept: float, steps: int) -> bytes:
    """model.json's bytes: {"coef": [...], "intercept": float, "steps": N}."""
    return json.dumps({"coef": coef.tolist(), "intercept": intercept, "steps": steps}).encode()


@dataclass(slots=True)
class Live:
    """What the endpoints read while the training loop runs. Replaced as a
    whole object per step, so a reader never sees half an update."""

    step: int | None  # None until restore() decided where training starts
    loss: float | None
    coef: Vector
    intercept: float


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be within 0..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpuscout.examples.linreg",
        description="Train a linear regression by mini-batch SGD (GPU Scout example job).",
    )
    parser.add_argument("--steps", type=_positive_int, required=True, help="total SGD steps")
    parser.add_argument("--step-sleep", type=_seconds, default=0.0,
                        help="extra seconds per step, to simulate a slower GPU (default 0)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the data set and of the minibatches (default 0)")
    parser.add_argument("--out", default=".",
                        help="folder for model.json and, standalone, .checkpoints/ (default .)")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=10,
                        help="checkpoint every M steps; 0: only when the agent asks (default 10)")
    parser.add_argument("--port", type=_port, default=None,
                        help="standalone: serve /status and /predict on this port")
    return parser


def _predict_handler(live: list[Live]) -> workload.runtime.Handler:
    def predict(request: workload.Request) -> dict[str, Any]:
        body = request.json()
        rows = body.get("x") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == N_FEATURES
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)
            for row in rows
        ):
            raise workload.BadRequest(
                f'"x" must be a list of rows of {N_FEATURES} numbers, e.g. '
                f'{{"x": [[{", ".join(["0.0"] * N_FEATURES)}]]}}'
            )
        model = live[0]
        if not rows:
            return {"y": []}
        y = np.asarray(rows, dtype=np.float64) @ model.coef + model.intercept
        return {"y": y.tolist()}

    return predict


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = workload.init(checkpoint_every=args.checkpoint_every, default_dir=args.out)
    with run:
        data = make_dataset(args.seed)
        live = [Live(None, None, np.zeros(N_FEATURES), 0.0)]

        def status(_: workload.Request) -> dict[str, Any]:
            now = live[0]
            loss = now.loss if now.loss is not None and math.isfinite(now.loss) else None
            return {"instance_id": run.instance_id, "step": now.step, "loss": loss,
                    "total_steps": args.steps}

        try:
            run.serve({"GET /status": status, "POST /predict": _predict_handler(live)},
                      port=args.port)
        except OSError as exc:
            print(f"linreg: cannot serve on port {args.port}: {exc}", file=sys.stderr)
            return 1

        coef, intercept, start = np.zeros(N_FEATURES), 0.0, 0
        restored = run.restore()
        if restored is not None:
            start, state = restored
            if state.get("seed") != args.seed or start > args.steps:
                print(f"linreg: the checkpoint found (step {start}, seed {state.get('seed')}) "
                      f"does not belong to --seed {args.seed} --steps {args.steps}; "
                      "use another --out or delete its .checkpoints folder", file=sys.stderr)
                return 2
            coef = np.asarray(state["coef"], dtype=np.float64)
            intercept = float(state["intercept"])
            log.info("resuming after step %d", start)
        live[0] = Live(start, None, coef, intercept)

        for step in range(start + 1, args.steps + 1):
            coef, intercept, loss = sgd_step(data, coef, intercept, seed=args.seed, step=step)
            if args.step_sleep:
                time.sleep(args.step_sleep)
            live[0] = Live(step, loss, coef, intercept)
            run.step_done(
                step, loss=loss, total_steps=args.steps,
                state=functools.partial(checkpoint_state, coef, intercept, step, args.seed),
            )

        where = run.save_artifact("model.json", encode_model(coef, intercept, args.steps))
        log.info("trained %d steps; model written to %s", args.steps, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
