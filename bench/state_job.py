"""The training job of ``bench/migration.py --state-mib N``: a real PyTorch
state of about N MiB (an MLP's weights and Adam's two moments: a third
each), checkpointed and restored through ``gpuscout.workload.torch``.

    python bench/state_job.py --state-mib 1024 --steps 1000000 --report-dir DIR

Every step is one forward and backward pass on a small batch and one Adam
update of the whole state. By default each weight's Adam update runs in the
backward pass as soon as its gradient is ready, and the gradient is freed
at once (PyTorch's "optimizer step in backward",
https://pytorch.org/tutorials/intermediate/optimizer_step_in_backward_tutorial.html):
the process holds the state, one layer's gradient and the torch runtime,
as memory-conscious training of large models does. ``--keep-gradients``
trains the classic way (``backward()`` then ``step()``), which holds every
gradient too: a third more than the state. The optimizer is one ``Adam``
either way, so its ``state_dict`` (what a checkpoint saves) is the same.

Once a second (and at exit) it writes
``DIR/<instance id>.json``: the peak resident memory (VmHWM, bytes) of its
own process and of its agent (its parent), and its own peak after its first
step (before any checkpoint on a fresh start: what training alone takes),
for the benchmark's memory target.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from gpuscout import workload
from gpuscout.workload import torch as gs_torch

WIDTH = 2048  # one layer: WIDTH x WIDTH float32 = 16 MiB of weights


def peak_rss(pid: int) -> int | None:
    """VmHWM of ``pid`` in bytes (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build(state_mib: int) -> nn.Module:
    layer_bytes = WIDTH * WIDTH * 4
    layers = max(1, round(state_mib * 2**20 / 3 / layer_bytes))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-mib", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--keep-gradients", action="store_true",
                        help="backward() then step(): every gradient held at once")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the other core is the agent's and the store's

    report = Path(args.report_dir) / f"{os.environ.get('GPUSCOUT_INSTANCE_ID', 'local')}.json"

    def write_report() -> None:
        data = {"workload": peak_rss(os.getpid()), "agent": peak_rss(os.getppid()),
                "state_bytes": state_bytes, **first}
        tmp = report.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, report)

    def reporter() -> None:
        while True:
            time.sleep(1.0)
            write_report()

    def on_term(signum: int, frame: object) -> None:
        write_report()
        sys.exit(0)

    model = build(args.state_mib)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if not args.keep_gradients:
        def step_in_backward(param: torch.Tensor) -> None:
            # Adam skips parameters without a gradient: this steps this one alone.
            optimizer.step()
            param.grad = None

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(step_in_backward)
    params = sum(p.numel() for p in model.parameters())
    state_bytes = params * 4 * 3
    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=reporter, daemon=True).start()

    x = torch.randn(8, WIDTH)
    first: dict[str, object] = {}
    with workload.init(checkpoint_every=0) as run:
        resumed = gs_torch.resume(run, model=model, optimizer=optimizer)
        step = resumed[0] if resumed else 0
        while step < args.steps:
            loss = model(x).pow(2).mean()
            if args.keep_gradients:
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                optimizer.step()
            else:
                loss.backward()  # each weight updated and its gradient freed on the way
            step += 1
            if not first:  # training alone (a fresh start), or restore and training
                first.update(first_step_peak=peak_rss(os.getpid()), fresh=resumed is None)
            run.step_done(step, loss=float(loss), total_steps=args.steps,
                          files=gs_torch.saver(model=model, optimizer=optimizer))
    write_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
