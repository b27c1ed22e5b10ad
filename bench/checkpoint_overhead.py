"""What periodic checkpoints cost a training loop: async (the default
``step_done`` path) against synchronous, against none.

A real PyTorch model trains on the CPU: a stack of large Linear layers
with Adam, sized so that its whole training state (model parameters and
Adam's two moments, about 3x the parameters, written by
``gpuscout.workload.torch.save_state``) is about ``--state-mib`` MiB. Three
configurations train side by side in one run, alternating, each in its own
``workload.Run`` with its own checkpoint store:

- ``none``: ``run.step_done(step, files=...)`` every step, no checkpoint
  is ever due (``checkpoint_every=None``);
- ``async``: the same with ``checkpoint_every`` set: the state is staged
  at the step boundary (``save_state`` into a local folder) and uploaded,
  hashed and its staging folder deleted in a background thread while
  training goes on (see ``gpuscout.workload.runtime``);
- ``sync``: as ``none``, plus ``run.checkpoint_files(step, ...)`` at the
  same steps inside the loop: the old behaviour, training waits for the
  upload.

A round gives each configuration ``--interval-s`` seconds of training (one
checkpoint interval), in turns of about ``--chunk-s`` seconds (the order
rotates from turn to turn), so changes in the machine's load hit all three
alike. The first step of a round checkpoints (its step number is a
multiple of the async run's ``checkpoint_every``), and every turn ends with
``run.flush()``, counted in its time: an upload never overlaps another
configuration's turn, and if it outlasted the turn the wait is counted.
steps/s of a configuration = its steps / its time, over all rounds; the
ratios are async/none and sync/none (the target is async >= 0.95;
CheckFreq's published bar is 3.5 % overhead).

Besides, the async cost is measured from its own steps, which other work
on the machine disturbs less: what the checkpoint step blocked (the
staging), plus how much longer than the round's other steps were the steps
that ran while the upload did, as a fraction of an interval. The store is a
FileStore in a temporary folder (fsync'd, as always), or with ``--s3`` an
S3Store on moto's server (its own process, on the same CPUs), or with
``--link-mib-s`` a FileStore whose writes last as long as sending their
bytes over a link that fast would (a network upload, not CPU-bound); old
checkpoints are pruned after each one, outside the timing.

    .venv/bin/python bench/checkpoint_overhead.py [--state-mib 256] [--rounds N]
        [--interval-s 30] [--chunk-s 5] [--batch 256] [--threads T]
        [--s3 | --link-mib-s MIB_S] [--control] [--dump-steps] [--json]

Defaults take about 5 minutes (3 rounds x 3 configurations x 30 s, plus
the model's build). With ``--json`` the last line of the output is one
JSON object; ``--dump-steps`` prints every step's seconds. Other work on
the machine is noise in every configuration alike; the per-round ratios
show how much, and ``--control`` adds a second ``none`` configuration
(about a third more time), whose ratio to the first is the noise floor.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gpuscout import workload
from gpuscout.store import FileDigest, FileStore, ObjectStore, S3Store
from gpuscout.workload import torch as gs_torch
from gpuscout.workload.checkpoint import CheckpointStore

MiB = 1024 * 1024
LAYERS = 4
CONFIGS = ("none", "async", "sync")
CONTROL = "none2"  # --control: a second "none", the noise floor
# checkpoint_every of the async run; each round's first step is a multiple.
EVERY = 1_000_000


def build(state_mib: int, batch: int, seed: int = 0) -> tuple[
        torch.nn.Module, torch.optim.Optimizer, Callable[[], float]]:
    """A model whose params + Adam's two moments are ~``state_mib`` MiB,
    its optimizer, and one training step (returns the loss)."""
    params = state_mib * MiB / 4 / 3  # float32; params, exp_avg, exp_avg_sq
    width = max(16, int(math.sqrt(params / LAYERS)))
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for index in range(LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if index < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = torch.randn(batch, width)
    targets = torch.randn(batch, width)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, optimizer, step


class SlowLinkStore(FileStore):
    """A FileStore whose writes take as long as sending their bytes over a
    link of ``mib_s`` MiB/s would (sleeping: the link, not this machine's
    CPUs, is the bottleneck, as for an upload to S3 from a cloud instance)."""

    def __init__(self, root: Path, mib_s: float) -> None:
        super().__init__(root)
        self.bytes_per_s = mib_s * MiB

    def put(self, key: str, data: bytes) -> None:
        start = time.perf_counter()
        super().put(key, data)
        time.sleep(max(0.0, len(data) / self.bytes_per_s - (time.perf_counter() - start)))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        start = time.perf_counter()
        digest = super().put_file(key, path)
        time.sleep(max(0.0, digest.size / self.bytes_per_s - (time.perf_counter() - start)))
        return digest


@contextlib.contextmanager
def moto_store() -> Iterator[ObjectStore]:
    """An S3Store on a fresh bucket of moto's server (bench/store.py's)."""
    import boto3  # type: ignore[import-untyped]

    spec = importlib.util.spec_from_file_location(
        "_bench_store", Path(__file__).with_name("store.py"))
    assert spec is not None and spec.loader is not None
    bench_store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_store)
    with bench_store.moto_server() as (url, secret):
        session = boto3.session.Session(aws_access_key_id=secret, aws_secret_access_key=secret,
                                        region_name="us-east-1")
        yield S3Store(f"s3://bench-{uuid.uuid4().hex[:12]}", endpoint_url=url,
                      session=session, create_bucket=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-s", type=float, default=30.0,
                        help="seconds of training between checkpoints")
    parser.add_argument("--chunk-s", type=float, default=5.0,
                        help="seconds each configuration trains before the next one's turn")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--s3", action="store_true", help="S3Store on moto's server")
    parser.add_argument("--link-mib-s", type=float, default=None,
                        help="FileStore behind a link of this many MiB/s (a network upload)")
    parser.add_argument("--control", action="store_true",
                        help=f"add a second no-checkpoint configuration ({CONTROL}): how far "
                        "two identical ones differ here (the noise floor)")
    parser.add_argument("--dump-steps", action="store_true",
                        help="print each training step's seconds, per configuration")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = CONFIGS + ((CONTROL,) if args.control else ())
    load_before = os.getloadavg()

    model, optimizer, train_step = build(args.state_mib, args.batch)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    for _ in range(3):  # warm-up, and Adam's moments exist from here on
        train_step()
    turns = max(1, round(args.interval_s / args.chunk_s))
    turn_s = args.interval_s / turns
    save = gs_torch.saver(model=model, optimizer=optimizer)

    with tempfile.TemporaryDirectory(prefix="gpuscout-bench-ckpt-") as tmp, \
            (moto_store() if args.s3 else contextlib.nullcontext(
                FileStore(Path(tmp) / "store") if args.link_mib_s is None
                else SlowLinkStore(Path(tmp) / "store", args.link_mib_s))) as store:
        runs = {
            name: workload.Run(
                checkpoints=CheckpointStore(store, f"bench/{name}/checkpoints"),
                checkpoint_every=EVERY if name == "async" else None,
                instance_id="bench", default_dir=Path(tmp) / name)
            for name in configs
        }
        # per configuration and round: seconds, and each step's (start, train seconds)
        elapsed = {name: [0.0] * args.rounds for name in configs}
        next_step = {name: 0 for name in configs}
        steps: dict[str, list[list[tuple[float, float]]]] = {
            name: [[] for _ in range(args.rounds)] for name in configs}
        blocked: dict[str, list[float]] = {name: [] for name in configs}
        uploads: list[tuple[float, float]] = []  # async: (staged at, stored at), wall clock
        flush_wait: list[float] = []
        for round_no in range(args.rounds):
            # A round starts at the next multiple of EVERY: its first step
            # checkpoints (step numbers may jump; the Run does not mind).
            first = EVERY * (round_no + 1)
            for name in configs:
                next_step[name] = first
            for turn in range(turns):
                shift = (round_no + turn) % len(configs)
                for name in configs[shift:] + configs[:shift]:
                    run = runs[name]
                    start = time.perf_counter()
                    while time.perf_counter() - start < turn_s:
                        step = next_step[name]
                        next_step[name] += 1
                        at = time.time()
                        before = time.perf_counter()
                        loss = train_step()
                        after = time.perf_counter()
                        steps[name][round_no].append((at, after - before))
                        run.step_done(step, loss=loss, files=save)
                        if name == "sync" and step % EVERY == 0:
                            run.checkpoint_files(step, save)
                        if step == first:
                            blocked[name].append(time.perf_counter() - after)
                            staged_at = time.time()
                    before = time.perf_counter()
                    run.flush()  # nothing of this turn overlaps the next one
                    if name == "async" and turn == 0:
                        flush_wait.append(time.perf_counter() - before)
                    elapsed[name][round_no] += time.perf_counter() - start
                    if name in ("async", "sync") and turn == 0:
                        last = run.last_checkpoint
                        assert last is not None and last.step == first, (name, last, first)
                        if name == "async":
                            uploads.append((staged_at, last.created_at.timestamp()))
                        run.checkpoints.prune(keep=1, verify=False)
            print(f"round {round_no + 1}/{args.rounds}: " + ", ".join(
                f"{name} {len(steps[name][round_no]) / elapsed[name][round_no]:.3f} steps/s"
                for name in configs)
                + f"; checkpoint step blocked async {blocked['async'][-1]:.2f} s, "
                f"sync {blocked['sync'][-1]:.2f} s; async upload took "
                f"{uploads[-1][1] - uploads[-1][0]:.2f} s in the background", flush=True)
        for run in runs.values():
            run.close()
    load_after = os.getloadavg()

    # The async cost from its own steps, which is less sensitive to other
    # work on the machine than comparing configurations: what the checkpoint
    # step blocked, plus how much longer the steps that ran during the
    # upload took than the round's other steps.
    interference = []
    for round_no, (staged_at, stored_at) in enumerate(uploads):
        timeline = steps["async"][round_no]
        # the steps that started while the upload ran (the first one starts
        # as step_done returns: a hair before staged_at was read)
        during = [took for at, took in timeline if staged_at - 0.01 <= at <= stored_at]
        others = [took for at, took in timeline if not staged_at - 0.01 <= at <= stored_at]
        base = statistics.median(others) if others else statistics.median(during)
        interference.append(sum(took - base for took in during))
    round_s = statistics.median(elapsed["none"])
    async_cost = [b + i for b, i in zip(blocked["async"], interference, strict=True)]

    count = {name: [len(timeline) for timeline in steps[name]] for name in configs}
    rate = {name: sum(count[name]) / sum(elapsed[name]) for name in configs}
    per_round = {name: [round(count[name][i] / elapsed[name][i]
                              / (count["none"][i] / elapsed["none"][i]), 3)
                        for i in range(args.rounds)] for name in configs if name != "none"}
    step_s = statistics.median(took for name in configs for timeline in steps[name]
                               for _, took in timeline)
    result: dict[str, Any] = {
        "settings": {
            "state_mib": round(state_bytes / MiB, 1), "median_step_s": round(step_s, 3),
            "interval_s": args.interval_s, "turns_per_interval": turns,
            "steps": {name: sum(count[name]) for name in configs},
            "rounds": args.rounds, "batch": args.batch,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "store": "S3Store/moto" if args.s3 else "FileStore" + (
                f" behind {args.link_mib_s:g} MiB/s" if args.link_mib_s else ""),
            "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "steps_per_s": {name: round(rate[name], 4) for name in configs},
        "async_over_none": round(rate["async"] / rate["none"], 3),
        "sync_over_none": round(rate["sync"] / rate["none"], 3),
        **({f"{CONTROL}_over_none": round(rate[CONTROL] / rate["none"], 3)}
           if args.control else {}),
        "per_round": per_round,
        "checkpoint_step_blocked_s": {name: round(statistics.median(blocked[name]), 2)
                                      for name in ("async", "sync")},
        "async_upload_s": round(statistics.median(b - a for a, b in uploads), 2),
        "async_flush_wait_s": round(statistics.median(flush_wait), 2),
        "async_steps_slowed_during_upload_s": round(statistics.median(interference), 2),
        "async_own_cost_fraction": round(statistics.median(async_cost) / round_s, 4),
        # where each configuration's time went: its training steps (their
        # median, and their sum) and everything else (step_done, flush)
        "median_step_s": {name: round(statistics.median(
            took for timeline in steps[name] for _, took in timeline), 3) for name in configs},
        "train_s": {name: round(sum(took for timeline in steps[name] for _, took in timeline), 1)
                    for name in configs},
        "outside_steps_s": {name: round(sum(elapsed[name]) - sum(
            took for timeline in steps[name] for _, took in timeline), 1) for name in configs},
    }
    s = result["settings"]
    print(f"\nstate {s['state_mib']} MiB (model + Adam), median step {s['median_step_s']} s, "
          f"a checkpoint every {args.interval_s:g} s of training, in turns of {turn_s:.1f} s, "
          f"{args.rounds} rounds; {s['torch_threads']} torch threads, {s['cpus']} CPUs, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}; {s['store']}")
    print(f"{'config':<8}{'steps/s':>10}{'vs none':>10}{'per round':>24}{'ckpt blocks':>13}")
    for name in configs:
        ratio = f"{rate[name] / rate['none']:.3f}"
        rounds = ", ".join(f"{r:.3f}" for r in per_round.get(name, []))
        block = (f"{result['checkpoint_step_blocked_s'][name]:.2f} s"
                 if name in ("async", "sync") else "")
        print(f"{name:<8}{rate[name]:>10.4f}{ratio:>10}{rounds:>24}{block:>13}")
    print("time spent training / outside the steps (step_done, flush) / median step: " + ", ".join(
        f"{name} {result['train_s'][name]:.1f} / {result['outside_steps_s'][name]:.1f} / "
        f"{result['median_step_s'][name]:.3f} s" for name in configs))
    print(f"async, from its own steps (median per checkpoint): staging blocked "
          f"{result['checkpoint_step_blocked_s']['async']:.2f} s, the upload took "
          f"{result['async_upload_s']:.2f} s in the background and slowed the steps meanwhile "
          f"by {result['async_steps_slowed_during_upload_s']:.2f} s in all, the end of its turn "
          f"waited {result['async_flush_wait_s']:.2f} s: "
          f"{100 * result['async_own_cost_fraction']:.1f} % of an interval "
          f"(target async/none >= 0.95: at most 5 %)")
    if args.dump_steps:
        for name in configs:
            for timeline in steps[name]:
                print(name, " ".join(f"{took:.2f}" for _, took in timeline))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
