"""Downtime of a live migration: make-before-break against stop-then-start.

Both strategies move the same example training job between the same two
offers of the local provider (real processes, the same boot delay), side by
side in one run, alternating:

- make-before-break (GPU Scout's executor): the replacement boots while the
  job trains; the old instance checkpoints at a step boundary and pauses;
  the replacement restores and resumes.
- stop-then-start (what a naive mover does): checkpoint, terminate the old
  instance, launch the new one, restore, resume.

Downtime is the time from the last step completed on the old instance to
the first step completed on the new one, as the two agents report them.

With ``--state-mib N`` the job is ``bench/state_job.py``: a real PyTorch
state of N MiB (weights and Adam's moments) saved with
``gpuscout.workload.torch``, so a move writes and reads N MiB through the
store. The run then also prints the store's measured throughput on the same
bytes (one ``put_file`` and one ``get_file`` of an N MiB file, where the
job's checkpoints go), one step's time, the physical floor of a move (the
write and the read of the state at that throughput, plus one step), the
ratio of make-before-break's downtime to that floor (target <= 1.5), and
the peak resident memory (VmHWM) of each instance's workload and agent
against the state size (target: at most the state + 512 MiB). The job
steps Adam in the backward pass and runs with a fixed glibc mmap threshold,
as memory-conscious training does (see state_job.py and the comment at the
job's envs); ``--keep-gradients`` and ``--default-malloc`` undo each.

    .venv/bin/python bench/migration.py [--boot-delay 5] [--rounds 3] [--state-mib N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gpuscout.agent.protocol import AgentState
from gpuscout.config import Settings
from gpuscout.controllers.agent_client import AgentClient
from gpuscout.controllers.context import Context
from gpuscout.domain import (
    InstanceStatus,
    JobSpec,
    JobStatus,
    MigrationReason,
    Offer,
    Resources,
)
from gpuscout.providers.local import LocalProvider
from gpuscout.service import Service, build_service

MiB = 1024 * 1024
STATE_JOB = Path(__file__).resolve().parent / "state_job.py"
A = "local:us-east-1a:p3.2xlarge:spot"
B = "local:us-east-1b:p3.2xlarge:spot"


def wait_running(svc: Service, job_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        svc.plane.reconcile_once()
        job = svc.repo.get_job(job_id)
        if job.status == JobStatus.RUNNING and job.progress.step > 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not start: {svc.repo.get_job(job_id)}")


def make_before_break(svc: Service, job_id: str, target: Offer) -> float:
    job = svc.repo.get_job(job_id)
    m = svc.plane.executor.begin(job, target, MigrationReason.MANUAL, 0.0)
    m = svc.plane.executor.run(m.id)
    if m.downtime_s is None:
        raise RuntimeError(f"make-before-break failed: {m.error}")
    return m.downtime_s


def stop_then_start(svc: Service, job_id: str, target: Offer) -> float:
    """Checkpoint, terminate, launch, restore: the move without overlap."""
    ctx: Context = svc.ctx
    job = svc.repo.get_job(job_id)
    old = svc.repo.get_instance(job.instance_id or "")
    assert old.address
    result = ctx.agents.checkpoint(old.address, pause=True, timeout_s=60)
    ctx.terminate(old.id)
    new, _ = ctx.launch(job, target, standby=False)
    assert new.address
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            health = ctx.agents.health(new.address)
        except Exception:
            time.sleep(0.01)
            continue
        if health.state == AgentState.FAILED:
            raise RuntimeError(f"stop-then-start restore failed: {health.error}")
        if health.first_step is not None and health.first_step_at is not None:
            if health.first_step != result.step + 1:
                raise RuntimeError(f"resumed at {health.first_step}, not {result.step + 1}")
            svc.repo.update_job(job_id, instance_id=new.id, offer_id=target.id)
            svc.repo.update_instance(new.id, status=InstanceStatus.RUNNING)
            ctx.router.switch(job_id, new.address)
            assert result.last_step_at is not None
            return health.first_step_at - result.last_step_at
        time.sleep(0.01)
    raise RuntimeError("stop-then-start: replacement did not resume")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boot-delay", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    parser.add_argument("--state-mib", type=int, default=0,
                        help="move a real torch state of this size (bench/state_job.py)")
    parser.add_argument("--keep-gradients", action="store_true",
                        help="with --state-mib: train the classic way, every gradient held "
                             "(default: each Adam update in the backward pass, see state_job.py)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="with --state-mib: leave glibc's mmap threshold dynamic (default: "
                             "MALLOC_MMAP_THRESHOLD_=65536 for the job)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpuscout-bench-") as tmp:
        home = Path(tmp)
        settings = Settings(home=home, boot_delay_s=args.boot_delay, api_token="bench")
        provider = LocalProvider(home / "local", boot_delay_s=args.boot_delay)
        svc = build_service(settings, provider=provider, agents=AgentClient())
        svc.plane.feed.start(svc.repo, svc.ctx.clock.now())
        for offer in svc.repo.list_offers():  # only the two p3 spot offers compete
            if offer.id not in (A, B):
                svc.repo.update_offer(offer.id, svc.ctx.clock.now(), available=False)
        steps = 1_000_000
        reports = home / "memory"
        reports.mkdir()
        if args.state_mib:
            command = (f"{sys.executable} {STATE_JOB} --state-mib {args.state_mib} "
                       f"--steps {steps} --report-dir {reports}"
                       + (" --keep-gradients" if args.keep_gradients else ""))
        else:
            command = (f"{sys.executable} -m gpuscout.examples.linreg --steps {steps} "
                       f"--step-sleep {args.step_sleep} --seed 3 --checkpoint-every 50")
        # glibc raises its mmap threshold to the size of each large block freed
        # (up to 32 MiB), so the freed 16 MiB gradients and temporaries are then
        # served from the heap, which keeps what it frees: +330 MiB of resident
        # memory for a 1 GiB state, none of it live. A fixed threshold (any
        # value turns the dynamic one off: mallopt(3)) returns them to the OS.
        envs = ({} if args.default_malloc or not args.state_mib
                else {"MALLOC_MMAP_THRESHOLD_": "65536"})
        spec = JobSpec(name="bench", resources=Resources(gpus=1), command=command, envs=envs)
        job = svc.plane.submit(spec)
        results: dict[str, list[float]] = {"make_before_break": [], "stop_then_start": []}
        extra: dict[str, object] = {}
        try:
            wait_running(svc, job.id)
            if args.state_mib:
                extra.update(store_and_step(svc, job.id, home, args.state_mib))
            offers = {o.id: o for o in svc.repo.list_offers()}
            for _ in range(args.rounds):
                for name, move in (("make_before_break", make_before_break),
                                   ("stop_then_start", stop_then_start)):
                    current = svc.repo.get_job(job.id).offer_id
                    target = offers[B if current == A else A]
                    results[name].append(move(svc, job.id, target))
                    wait_running(svc, job.id)
        finally:
            svc.plane.cancel(job.id)
            svc.plane.stop()
        if args.state_mib:
            extra["memory"] = memory(reports)

    mbb = statistics.median(results["make_before_break"])
    sts = statistics.median(results["stop_then_start"])
    ratio = mbb / sts
    print(f"boot delay {args.boot_delay:.1f}s, {args.rounds} rounds, step {args.step_sleep}s")
    print(f"{'strategy':<20} {'median downtime':>16}   all runs")
    for name, values in results.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<20} {statistics.median(values):>15.3f}s   {runs}")
    print(f"ratio make-before-break / stop-then-start: {ratio:.3f} "
          f"(target < 0.2; make-before-break target < 1 s)")
    if args.state_mib:
        floor = float(extra["write_s"]) + float(extra["read_s"]) + float(extra["step_s"])  # type: ignore[arg-type]
        extra["floor_s"] = floor
        extra["floor_ratio"] = mbb / floor
        size = float(extra["state_bytes"])  # type: ignore[arg-type]
        print(f"state {size / MiB:.0f} MiB; store write {extra['write_mib_s']:.0f} MiB/s "
              f"({extra['write_s']:.2f} s), read {extra['read_mib_s']:.0f} MiB/s "
              f"({extra['read_s']:.2f} s); one step {extra['step_s']:.3f} s")
        print(f"physical floor (write + read + one step): {floor:.2f} s; make-before-break / "
              f"floor: {mbb / floor:.2f} (target <= 1.5)")
        peaks_of = extra["memory"]
        training = max((m["first_step_peak"] for m in peaks_of.values()  # type: ignore[attr-defined]
                        if m["fresh"]), default=0)
        extra["training_peak"] = training
        held = "every gradient" if args.keep_gradients else "one layer's gradient"
        print(f"training alone (weights, {held}, Adam, the torch runtime; the first "
              f"instance after its first step, before any checkpoint): {training / MiB:.0f} MiB")
        for instance, peaks in sorted(peaks_of.items()):  # type: ignore[attr-defined]
            limit = peaks["state_bytes"] + 512 * MiB
            total = peaks["workload"] + peaks["agent"]
            print(f"peak memory {instance}: workload {peaks['workload'] / MiB:.0f} MiB "
                  f"(+{(peaks['workload'] - training) / MiB:.0f} MiB over training alone) "
                  f"+ agent {peaks['agent'] / MiB:.0f} MiB = {total / MiB:.0f} MiB "
                  f"({'within' if total <= limit else 'over'} state + 512 MiB = "
                  f"{limit / MiB:.0f} MiB)")
    if args.json:
        print(json.dumps({"boot_delay_s": args.boot_delay, "make_before_break_s": mbb,
                          "stop_then_start_s": sts, "ratio": ratio, "runs": results,
                          "state_mib": args.state_mib,
                          "keep_gradients": args.keep_gradients,
                          "default_malloc": args.default_malloc, **extra}))
    return 0


def store_and_step(svc: Service, job_id: str, home: Path, state_mib: int) -> dict[str, float]:
    """The store's throughput on a state-sized file (where checkpoints go),
    the state's size, and one step's time of the running job."""
    store = svc.ctx.store
    source = home / "throughput.bin"
    size = state_mib * MiB
    with source.open("wb") as f:
        for _ in range(state_mib):
            f.write(os.urandom(MiB))
    started = time.monotonic()
    store.put_file("bench/throughput.bin", source)
    write_s = time.monotonic() - started
    started = time.monotonic()
    store.get_file("bench/throughput.bin", home / "throughput.back")
    read_s = time.monotonic() - started
    store.delete("bench/throughput.bin")
    for path in (source, home / "throughput.back"):
        path.unlink()
    job = svc.repo.get_job(job_id)
    address = svc.repo.get_instance(job.instance_id or "").address
    assert address
    first = svc.ctx.agents.health(address)
    time.sleep(3.0)
    second = svc.ctx.agents.health(address)
    assert first.last_step_at is not None and second.last_step_at is not None
    step_s = (second.last_step_at - first.last_step_at) / max(1, second.step - first.step)
    state_bytes = state_mib * MiB
    return {"write_s": write_s, "read_s": read_s, "write_mib_s": size / MiB / write_s,
            "read_mib_s": size / MiB / read_s, "step_s": step_s, "state_bytes": state_bytes}


def memory(reports: Path) -> dict[str, dict[str, int]]:
    """Peak resident memory per instance, from the job's reports."""
    found = {}
    for path in reports.glob("*.json"):
        data = json.loads(path.read_text())
        found[path.stem] = {"workload": data["workload"] or 0, "agent": data["agent"] or 0,
                            "state_bytes": data["state_bytes"],
                            "first_step_peak": data.get("first_step_peak") or 0,
                            "fresh": bool(data.get("fresh"))}
    return found


if __name__ == "__main__":
    raise SystemExit(main())
