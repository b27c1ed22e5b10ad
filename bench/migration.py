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

    .venv/bin/python bench/migration.py [--boot-delay 5] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
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

A = "local:us-east-1a:p3.2xlarge:spot"
B = "local:us-east-1b:p3.2xlarge:spot"


def wait_running(svc: Service, job_id: str, timeout_s: float = 60) -> None:
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
        spec = JobSpec(
            name="bench", resources=Resources(gpus=1),
            command=(f"{sys.executable} -m gpuscout.examples.linreg --steps {steps} "
                     f"--step-sleep {args.step_sleep} --seed 3 --checkpoint-every 50"),
        )
        job = svc.plane.submit(spec)
        results: dict[str, list[float]] = {"make_before_break": [], "stop_then_start": []}
        try:
            wait_running(svc, job.id)
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
    if args.json:
        print(json.dumps({"boot_delay_s": args.boot_delay, "make_before_break_s": mbb,
                          "stop_then_start_s": sts, "ratio": ratio, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
