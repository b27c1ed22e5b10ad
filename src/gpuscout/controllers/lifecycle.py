"""Job lifecycle: one reconcile step per live job per tick.

pending -> scouting -> provisioning -> running -> completed, and recovery
when an instance is lost. A job that is migrating belongs to the migration
executor; here it only has its progress and cost kept up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from gpuscout.agent.protocol import AgentState, SkippedCheckpoint, checkpoint_prefix
from gpuscout.clock import utc
from gpuscout.controllers.agent_client import AgentError, AgentHealth
from gpuscout.controllers.context import Context, log
from gpuscout.db import ConcurrentChange, NotFound
from gpuscout.domain import InstanceStatus, Job, JobStatus, MigrationReason, OnBudget
from gpuscout.domain.states import IllegalTransition
from gpuscout.policy import (
    PlacementDecision,
    budget_thresholds_reached,
    offer_for,
    projected_cost_usd,
    remaining_work_hours,
)
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    ProviderError,
    ProviderState,
    QuotaError,
)
from gpuscout.workload.checkpoint import CheckpointStore

S = JobStatus

# Launches refused for a reason other than capacity (a missing image, a
# permission, a boot script too large) are retried this many times in all,
# with backoff, before the job fails with the provider's error: such causes
# rarely heal by themselves, and retrying at once floods the provider's API.
MAX_LAUNCH_FAILURES = 5
LAUNCH_BACKOFF_S = 5.0
LAUNCH_BACKOFF_MAX_S = 300.0

# Called with (job, reason) when a running job must move now (a preemption
# notice); the control plane starts a make-before-break migration.
UrgentMove = Callable[[Job, MigrationReason], None]


# Called with a job that has no instance: where to launch it, or None with
# the reason to wait (the policy's place_job over the current offers).
Placer = Callable[[Job], PlacementDecision]


class Lifecycle:
    def __init__(self, ctx: Context, urgent_move: UrgentMove,
                 placement: Placer) -> None:
        self.ctx = ctx
        self.urgent_move = urgent_move
        self.placement = placement
        # When each running agent last answered (monotonic bookkeeping of
        # the loop; losing it on restart only delays loss detection).
        self._last_seen: dict[str, datetime] = {}
        # Jobs backing off after a failed launch: not before this time.
        self._retry_at: dict[str, datetime] = {}
        # The checkpoint step each running job was last pruned after.
        self._retained: dict[str, int] = {}
        self._skipped_named: set[tuple[str, str]] = set()  # (job, checkpoint key)
        # Budget thresholds already reported, per job (read back from the
        # job's "budget" events after a restart, so each is reported once).
        self._budget_sent: dict[str, set[float]] = {}

    def reconcile(self, job: Job) -> None:
        try:
            handler = {
                S.PENDING: self._pending,
                S.SCOUTING: self._place,
                S.RECOVERING: self._place,
                S.PROVISIONING: self._provisioning,
                S.RUNNING: self._running,
                S.MIGRATING: self._migrating,
            }.get(job.status)
            if handler is not None:
                handler(job)
            self.bill(job)
            if job.spec.budget_usd is not None:
                self._watch_budget(job.id)
        except (ConcurrentChange, IllegalTransition) as err:
            # Someone else (a cancel, the executor) moved the job first.
            log.debug("job %s changed under reconcile: %s", job.id, err)

    # --- states ------------------------------------------------------------

    def _pending(self, job: Job) -> None:
        self.ctx.repo.transition(job.id, S.SCOUTING, expect={S.PENDING})

    def _place(self, job: Job) -> None:
        now = self.ctx.clock.now()
        retry_at = self._retry_at.get(job.id)
        if retry_at is not None and now < retry_at:
            return  # backing off after a launch that failed for its own reason
        placement = self.placement(job)
        if placement.offer is None:
            return  # keep scouting; the market may change
        offer = placement.offer
        self.ctx.event(job.id, "placement", placement.reason, offer_id=offer.id)
        try:
            instance, _ = self.ctx.launch(job, offer, standby=False)
        except CapacityError as err:
            self.ctx.mark_unavailable(offer.id)
            kind = "quota" if isinstance(err, QuotaError) else "capacity"
            self.ctx.event(job.id, kind, str(err), offer_id=offer.id)
            return
        except Exception as err:  # noqa: BLE001 - the provider's own error, kept for the job
            self._launch_failed(job, offer.id, err)
            return
        self._retry_at.pop(job.id, None)
        fields = {"offer_id": offer.id, "instance_id": instance.id, "launch_failures": 0}
        if job.started_at is None:
            # The baseline (staying on this first offer) is billed from the
            # launch, as the instance is: its boot is a cost either way.
            fields["baseline_price_per_hour"] = offer.price_per_hour  # type: ignore[assignment]
            fields["cost_updated_at"] = self.ctx.clock.now()  # type: ignore[assignment]
        try:
            self.ctx.repo.transition(job.id, S.PROVISIONING, expect={job.status}, **fields)
        except (ConcurrentChange, IllegalTransition):
            self.ctx.terminate(instance.id)  # cancelled meanwhile: leave nothing behind
            raise

    def _launch_failed(self, job: Job, offer_id: str, err: Exception) -> None:
        """A launch refused for a reason other than capacity (no image,
        permission denied, a boot script too large): that will not heal by
        itself, so the job is retried with backoff and fails after
        ``MAX_LAUNCH_FAILURES`` tries, with the provider's error as its reason."""
        failures = int(self.ctx.repo.job_row_fields(job.id, "launch_failures")
                       ["launch_failures"] or 0) + 1
        message = f"{type(err).__name__}: {err}" if not isinstance(err, ProviderError) else str(err)
        self.ctx.repo.update_job(job.id, launch_failures=failures)
        if failures >= MAX_LAUNCH_FAILURES:
            self._retry_at.pop(job.id, None)
            self._finish(job, None, S.FAILED,
                         f"could not launch after {failures} tries: {message}",
                         expect=job.status)
            return
        delay = launch_backoff_s(failures)
        self._retry_at[job.id] = self.ctx.clock.now() + timedelta(seconds=delay)
        self.ctx.event(job.id, "launch_failed",
                       f"launch on {offer_id} failed (try {failures} of {MAX_LAUNCH_FAILURES}, "
                       f"next in {delay:.0f} s): {message}", offer_id=offer_id)

    def _provisioning(self, job: Job) -> None:
        instance_id = job.instance_id
        if instance_id is None:
            self.ctx.repo.transition(job.id, S.SCOUTING, expect={S.PROVISIONING})
            return
        instance = self.ctx.repo.get_instance(instance_id)
        health = self._health(instance.address)
        now = self.ctx.clock.now()
        if health is not None:
            self._last_seen[instance_id] = now
            if health.awaiting_secrets and instance.address:
                self.ctx.deliver_secrets(job.id, instance.address)
            if health.state == AgentState.SETUP:
                return  # the agent is up and preparing the job (workdir, setup)
        if health is not None and health.state not in (AgentState.FAILED,):
            self.ctx.repo.update_instance(instance_id, status=InstanceStatus.RUNNING, ready_at=now,
                                          setup_s=health.setup_s)
            fields = {"started_at": job.started_at or now}
            self.ctx.repo.transition(job.id, S.RUNNING, expect={S.PROVISIONING}, **fields)
            self.ctx.route(job.id, instance)
            self.ctx.event(job.id, "running", f"running on {instance_id} ({job.offer_id})",
                           instance_id=instance_id)
            return
        if health is not None and (health.exit_code is not None
                                   or health.failed_phase is not None):
            # The machine booted and the job's own setup or command failed:
            # that is the job's error, not the offer's; elsewhere won't help.
            self._job_failed(job, instance_id, _command_error(health), expect=S.PROVISIONING)
            return
        gone = self._provider_gone(instance_id)
        # Up to health_s for the agent to answer first; once it has answered
        # (it may then prepare the job for long), the loss rule applies.
        seen = self._last_seen.get(instance_id)
        if seen is None:
            waited, limit = (now - (instance.created_at or now)).total_seconds(), \
                self.ctx.timeouts.health_s
        else:
            waited, limit = (now - seen).total_seconds(), self.ctx.timeouts.lost_s
        if gone or waited > limit or (
            health is not None and health.state == AgentState.FAILED
        ):
            why = "instance is gone" if gone else (
                f"agent failed: {health.error}" if health else
                f"not healthy after {waited:.0f}s" if seen is None else
                f"agent unreachable for {waited:.0f}s")
            self.ctx.event(job.id, "boot_failed", f"{instance_id}: {why}")
            self.ctx.terminate(instance_id, failed=True)
            if job.offer_id:
                self.ctx.mark_unavailable(job.offer_id)
            self.ctx.repo.transition(job.id, S.RECOVERING, expect={S.PROVISIONING},
                                     instance_id=None)

    def _running(self, job: Job) -> None:
        if job.instance_id is None:
            self.ctx.repo.transition(job.id, S.RECOVERING, expect={S.RUNNING})
            return
        instance = self.ctx.repo.get_instance(job.instance_id)
        health = self._health(instance.address)
        if health is None:
            self._maybe_lost(job, instance.id)
            return
        self._last_seen[instance.id] = self.ctx.clock.now()
        self._record_progress(job, health)
        self._retain(job, health.last_checkpoint_step)
        if health.state == AgentState.COMPLETED:
            self._finish(job, instance.id, S.COMPLETED, None)
        elif health.state == AgentState.FAILED:
            self._job_failed(job, instance.id, _command_error(health))
        elif health.interruption_notice or self._provider_notice(instance.id):
            # One event per notice, not per pass, nor per restart.
            if self.ctx.first_notice(instance.id, "recorded"):
                self.ctx.event(job.id, "interruption",
                               f"{instance.id} got a spot interruption notice")
            self.urgent_move(job, MigrationReason.PREEMPTION)

    def _migrating(self, job: Job) -> None:
        if job.instance_id is None:
            return
        instance = self.ctx.repo.get_instance(job.instance_id)
        health = self._health(instance.address)
        if health is not None:
            self._record_progress(job, health)
            if health.interruption_notice or self._provider_notice(instance.id):
                # The instance a move is leaving is being reclaimed: the
                # control plane saves now rather than at the switch.
                self.urgent_move(job, MigrationReason.PREEMPTION)

    # --- helpers -----------------------------------------------------------

    def _health(self, address: str | None) -> AgentHealth | None:
        if not address:
            return None
        try:
            return self.ctx.agents.health(address)
        except AgentError:
            return None

    def _provider_gone(self, instance_id: str) -> bool:
        try:
            return self.ctx.provider.get(instance_id).state == ProviderState.TERMINATED
        except InstanceNotFound:
            return True

    def _provider_notice(self, instance_id: str) -> bool:
        try:
            return self.ctx.provider.get(instance_id).interruption_notice
        except ProviderError:
            return False

    def _maybe_lost(self, job: Job, instance_id: str) -> None:
        now = self.ctx.clock.now()
        last = self._last_seen.setdefault(instance_id, now)
        gone = self._provider_gone(instance_id)
        if not gone and (now - last).total_seconds() < self.ctx.timeouts.lost_s:
            return
        why = "terminated by the provider" if gone else "agent unreachable"
        self.ctx.event(job.id, "instance_lost", f"{instance_id} {why}; recovering from the "
                       "last verified checkpoint", instance_id=instance_id)
        self.ctx.terminate(instance_id, failed=True)
        self.ctx.router.switch(job.id, None)
        self.ctx.repo.transition(job.id, S.RECOVERING, expect={S.RUNNING}, instance_id=None)

    def _record_progress(self, job: Job, health: AgentHealth) -> None:
        if (health.steps_done, health.loss, health.total_steps) != (
            job.progress.step, job.progress.loss, job.progress.total_steps
        ):
            self.ctx.repo.update_job(job.id, step=health.steps_done, loss=health.loss,
                                     total_steps=health.total_steps)
        if health.skipped_checkpoints:
            self._name_skipped(job, health.skipped_checkpoints)

    def _name_skipped(self, job: Job, skipped: Sequence[SkippedCheckpoint]) -> None:
        """One ``checkpoint_skipped`` event per checkpoint a restore skipped
        as corrupt or partial (restarts included: the events say which were
        named already)."""
        fresh = [(c.key, c.reason) for c in skipped
                 if (job.id, c.key) not in self._skipped_named]
        if not fresh:
            return
        named = {(e.data or {}).get("key") for e in self.ctx.repo.list_events(
            job.id, kind="checkpoint_skipped", limit=1000)}
        for key, reason in fresh:
            self._skipped_named.add((job.id, key))
            if key not in named:
                self.ctx.event(job.id, "checkpoint_skipped",
                               f"restore skipped checkpoint {key}: {reason}; it took the "
                               "previous verified one", key=key)

    def _job_failed(self, job: Job, instance_id: str, error: str,
                    expect: JobStatus = S.RUNNING) -> None:
        """The job's own setup or command failed. With restarts left
        (``max_restarts_on_errors``, SkyPilot's meaning) it starts again on a
        fresh instance from its last verified checkpoint; else it fails."""
        if job.restarts >= job.spec.max_restarts_on_errors:
            self._finish(job, instance_id, S.FAILED, error, expect=expect)
            return
        restarts = job.restarts + 1
        self.bill(job)
        self.ctx.repo.transition(job.id, S.RECOVERING, expect={expect}, instance_id=None,
                                 restarts=restarts, error=error)
        self.ctx.event(job.id, "restart",
                       f"restart {restarts} of {job.spec.max_restarts_on_errors} from the last "
                       f"checkpoint after: {error}", instance_id=instance_id, restarts=restarts)
        self.ctx.router.switch(job.id, None)
        self.ctx.terminate(instance_id)

    def _finish(self, job: Job, instance_id: str | None, status: JobStatus, error: str | None,
                expect: JobStatus = S.RUNNING) -> None:
        now = self.ctx.clock.now()
        self.bill(job)
        self.ctx.repo.transition(job.id, status, expect={expect}, finished_at=now,
                                 error=error)
        self.ctx.event(job.id, status.value, error or f"job {status.value}")
        if instance_id is not None:
            self.ctx.terminate(instance_id)
        self.ctx.router.switch(job.id, None)
        self.bill(self.ctx.repo.get_job(job.id))
        self.retain_finished(job)

    # --- budget ------------------------------------------------------------------

    def _watch_budget(self, job_id: str) -> None:
        """A "budget" event when the job's projected cost (cost so far + the
        remaining work at the current $/work-hour) reaches 80% and 100% of
        its budget, once per threshold per job; with ``on_budget: stop`` a
        running job is checkpointed and cancelled at 100%."""
        job = self.ctx.repo.get_job(job_id)
        budget = job.spec.budget_usd
        if budget is None or job.status not in (S.RUNNING, S.MIGRATING) or not job.offer_id:
            return
        try:
            offer = offer_for(job.spec.resources, self.ctx.repo.get_offer(job.offer_id))
        except NotFound:
            return
        now = self.ctx.clock.now()
        work = remaining_work_hours(job, now, None, offer.relative_speed)
        rate = offer.cost_per_work_hour
        projected = projected_cost_usd(job, work, rate)
        reached = budget_thresholds_reached(projected, budget)
        if not reached:
            return
        sent = self._budget_sent.get(job.id)
        if sent is None:
            sent = {float((e.data or {}).get("threshold", 0.0))
                    for e in self.ctx.repo.list_events(job.id, kind="budget")}
            self._budget_sent[job.id] = sent
        figures = (f"projected ${projected:.4f} = ${job.cost_usd:.4f} so far + {work:.2f} "
                   f"remaining work hours at ${rate:.4f} per work hour on {offer.id}")
        stop = job.spec.on_budget == OnBudget.STOP
        for threshold in reached:
            if threshold in sent:
                continue
            sent.add(threshold)
            then = ("; on_budget is stop: checkpointing and cancelling the job"
                    if stop and threshold >= 1.0 else "")
            self.ctx.event(job.id, "budget",
                           f"projected cost reached {threshold:.0%} of the ${budget:.4f} "
                           f"budget: {figures}{then}",
                           threshold=threshold, cost_usd=job.cost_usd,
                           projected_usd=projected, budget_usd=budget,
                           remaining_work_hours=work, cost_per_work_hour=rate)
        if stop and reached[-1] >= 1.0 and job.status == S.RUNNING:
            self._stop_for_budget(job, f"stopped at its budget of ${budget:.4f} "
                                       f"(on_budget: stop): {figures}")

    def _stop_for_budget(self, job: Job, reason: str) -> None:
        """Checkpoint the job, then cancel it (``reason`` names the budget);
        its checkpoints are all kept, whatever ``checkpoint_keep_finished``."""
        step: int | None = None
        note = ""
        address = (self.ctx.repo.get_instance(job.instance_id).address
                   if job.instance_id else None)
        if address:
            try:
                step = self.ctx.agents.checkpoint(
                    address, pause=False, timeout_s=self.ctx.timeouts.checkpoint_s).step
            except Exception as err:  # noqa: BLE001 - the last verified checkpoint stands
                note = f"; checkpoint failed ({err}), the last verified one stands"
        self.bill(job)
        self.ctx.repo.transition(job.id, S.CANCELLED, expect={S.RUNNING},
                                 finished_at=self.ctx.clock.now(), error=reason)
        self.ctx.router.switch(job.id, None)
        for instance in self.ctx.repo.list_instances(job_id=job.id, live_only=True):
            self.ctx.terminate(instance.id)
        self.bill(self.ctx.repo.get_job(job.id))
        self._retained.pop(job.id, None)
        saved = f"checkpointed step {step}" if step is not None else "not checkpointed now"
        self.ctx.event(job.id, "cancelled", f"{reason}; {saved}{note}; checkpoints kept",
                       step=step)

    # --- checkpoint retention ---------------------------------------------------

    def _retain(self, job: Job, step: int | None) -> None:
        """After each new checkpoint of a running job, keep its newest
        ``checkpoint_keep`` (counted on their manifests; the newest good one
        always stays, and a move or recovery restores the newest). Not while
        a move runs: the executor owns the checkpoints then."""
        if step is None or self._retained.get(job.id) == step:
            return
        self._retained[job.id] = step
        try:
            CheckpointStore(self.ctx.store, checkpoint_prefix(job.id)).prune(
                job.spec.checkpoint_keep, verify=False)
        except Exception as err:  # noqa: BLE001 - retention is housekeeping; retried next save
            log.warning("job %s: old checkpoints not deleted: %s", job.id, err)
            self._retained.pop(job.id, None)

    def retain_finished(self, job: Job) -> None:
        """A job that ended keeps its newest ``checkpoint_keep_finished``
        checkpoints (0: none), so a long job leaves no gigabytes behind."""
        self._retained.pop(job.id, None)
        keep = job.spec.checkpoint_keep_finished
        store = CheckpointStore(self.ctx.store, checkpoint_prefix(job.id))
        try:
            deleted = store.delete_all() if keep == 0 else store.prune(keep, verify=False)
        except Exception as err:  # noqa: BLE001 - the job's end stands; the note says why
            log.warning("job %s: checkpoints not deleted: %s", job.id, err)
            return
        if deleted:
            self.ctx.event(job.id, "checkpoints_deleted",
                           f"kept the newest {keep} checkpoint(s); deleted {len(deleted)}",
                           deleted=len(deleted))

    def bill(self, job: Job) -> None:
        """Accrue every live instance of the job, and the baseline: what the
        job would cost on its first offer over the same time."""
        now = self.ctx.clock.now()
        for instance in self.ctx.repo.list_instances(job_id=job.id, live_only=True):
            self.ctx.bill_instance(instance.id)
        try:
            row = self.ctx.repo.job_row_fields(
                job.id, "baseline_price_per_hour", "cost_updated_at", "baseline_cost_usd")
        except NotFound:
            return
        since = utc(row["cost_updated_at"])
        baseline = row["baseline_cost_usd"] or 0.0
        if since is not None and row["baseline_price_per_hour"] and not job.status.is_terminal():
            baseline += row["baseline_price_per_hour"] * max(
                0.0, (now - since).total_seconds()) / 3600.0
        # The baseline's clock starts with the first launch (``_place``); a
        # job placed before launches started it starts it here.
        started = since is not None or row["baseline_price_per_hour"] is not None
        self.ctx.repo.update_job(
            job.id, cost_usd=self.ctx.repo.job_instance_cost(job.id),
            baseline_cost_usd=baseline,
            cost_updated_at=now if started else None,
        )


def launch_backoff_s(failures: int) -> float:
    """Seconds before the next launch after ``failures`` consecutive launches
    failed for a reason other than capacity: 5, 10, 20, 40 s, ... up to 5 min."""
    return float(min(LAUNCH_BACKOFF_MAX_S, LAUNCH_BACKOFF_S * 2 ** (failures - 1)))


def _command_error(health: AgentHealth) -> str:
    """The agent's own account ("command exited with code 2; last lines of
    stderr: ..."), or the exit code alone."""
    return health.error or f"command exited with code {health.exit_code}"
