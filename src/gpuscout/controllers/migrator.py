"""The migration executor: make-before-break, resumable, phase by phase.

    LAUNCHING     start the replacement in standby (the job keeps training)
    BOOTING       wait until the replacement's agent is up and waiting
    CHECKPOINTING the old instance checkpoints at its next step boundary and
                  pauses
    RESTORING     the replacement restores that checkpoint and completes its
                  first step, which must be checkpoint step + 1
    SWITCHING     the job's route and active instance become the replacement
    TERMINATING   requests in flight to the old instance drain; it is
                  terminated
    DONE

Each phase is persisted before its side effect. Any failure before
SWITCHING rolls back: the replacement is terminated, checkpoints only it
wrote are deleted, and the old instance resumes where it paused, so no step
is lost. From SWITCHING on, the move rolls forward. ``repair`` applies the
same rule to moves a killed control plane left half done.
"""

from __future__ import annotations

import time

from gpuscout.agent.protocol import AgentState, checkpoint_prefix
from gpuscout.controllers.agent_client import AgentError, AgentHealth
from gpuscout.controllers.context import Context, log
from gpuscout.db import ConcurrentChange, new_id
from gpuscout.domain import (
    InstanceStatus,
    Job,
    JobStatus,
    Migration,
    MigrationPhase,
    MigrationReason,
    MigrationStatus,
    Offer,
)
from gpuscout.domain.states import IllegalTransition
from gpuscout.providers.base import CapacityError, ProviderError
from gpuscout.workload.checkpoint import CheckpointStore

P = MigrationPhase
S = JobStatus


class MigrationFailed(RuntimeError):
    """A move that cannot go on. ``offer_fault``: whether the target offer is
    to blame (no healthy machine from it), so it is skipped for a while; a
    failure of the job's own (its setup failed, it was cancelled) is not."""

    def __init__(self, message: str, *, offer_fault: bool = True) -> None:
        super().__init__(message)
        self.offer_fault = offer_fault


class MigrationExecutor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # --- start -------------------------------------------------------------

    def begin(self, job: Job, target: Offer, reason: MigrationReason,
              expected_savings: float) -> Migration:
        """Record the move and mark the job migrating (both before any side
        effect); ``run`` then carries it out."""
        if job.instance_id is None or job.offer_id is None:
            raise ConcurrentChange(f"job {job.id} has no active instance")
        now = self.ctx.clock.now()
        migration = Migration(
            id=new_id("mig"), job_id=job.id, status=MigrationStatus.IN_PROGRESS,
            phase=P.LAUNCHING, reason=reason, from_instance_id=job.instance_id,
            from_offer_id=job.offer_id, to_offer_id=target.id,
            expected_savings=expected_savings, started_at=now,
        )
        self.ctx.repo.transition(job.id, S.MIGRATING, expect={S.RUNNING})
        self.ctx.repo.add_migration(migration)
        change = (f"{expected_savings:.1%} cheaper" if expected_savings >= 0
                  else f"{-expected_savings:.1%} dearer")
        self.ctx.event(job.id, "migration_started",
                       f"{reason.value}: {job.offer_id} -> {target.id} (expected {change})",
                       migration_id=migration.id)
        return migration

    # --- run ---------------------------------------------------------------

    def run(self, migration_id: str) -> Migration:
        m = self.ctx.repo.get_migration(migration_id)
        try:
            self._forward(m)
        except Exception as err:  # every failure takes the same way back
            log.warning("migration %s failed: %s", migration_id, err)
            self.rollback(self.ctx.repo.get_migration(migration_id), str(err),
                          offer_fault=getattr(err, "offer_fault", True))
        return self.ctx.repo.get_migration(migration_id)

    def _phase(self, m: Migration, phase: MigrationPhase, **fields: object) -> Migration:
        return self.ctx.repo.update_migration(m.id, phase=phase, **fields)

    def _check_job(self, m: Migration) -> Job:
        job = self.ctx.repo.get_job(m.job_id)
        if job.status != S.MIGRATING:
            raise MigrationFailed(f"job is {job.status.value}, no longer migrating",
                                  offer_fault=False)
        return job

    def _forward(self, m: Migration) -> None:
        ctx = self.ctx
        job = self._check_job(m)
        old = ctx.repo.get_instance(m.from_instance_id)
        target = ctx.repo.get_offer(m.to_offer_id)
        if not old.address:
            raise MigrationFailed("the old instance has no address")

        if m.reason == MigrationReason.PREEMPTION:
            self._emergency_checkpoint(m, old.address)

        # LAUNCHING: the replacement starts in standby; the job keeps training.
        try:
            new, _ = ctx.launch(job, target, standby=True)
        except CapacityError:
            ctx.mark_unavailable(target.id)
            raise
        m = self._phase(m, P.BOOTING, to_instance_id=new.id)
        self._check_job(m)
        assert new.address is not None

        # BOOTING: wait for the replacement's agent to boot, unpack the job's
        # workdir and run its setup (the job keeps training meanwhile), and
        # wait in standby.
        ready = self._wait_for_standby(m, new.id, new.address)
        ctx.repo.update_instance(new.id, status=InstanceStatus.RUNNING,
                                 ready_at=ctx.clock.now(), setup_s=ready.setup_s)
        m = self._phase(m, P.CHECKPOINTING, replacement_ready_at=ctx.clock.now())
        self._check_job(m)

        # CHECKPOINTING: the old instance saves at its next step boundary and
        # pauses there; from now until the switch no step runs anywhere.
        result = ctx.agents.checkpoint(old.address, pause=True,
                                       timeout_s=ctx.timeouts.checkpoint_s)
        m = self._phase(m, P.RESTORING, checkpoint_step=result.step,
                        checkpointed_at=ctx.clock.now())
        self._check_job(m)

        # RESTORING: the replacement restores exactly that checkpoint.
        ctx.agents.restore(new.address, result.step)
        health = self._wait_for_first_step(new.address, result.step)
        resume_step = health.first_step
        if resume_step != result.step + 1:
            raise MigrationFailed(
                f"replacement resumed at step {resume_step}, expected {result.step + 1}")
        downtime = None
        if health.first_step_at is not None and result.last_step_at is not None:
            downtime = max(0.0, health.first_step_at - result.last_step_at)

        # SWITCHING: from here on the move rolls forward.
        m = self._phase(m, P.SWITCHING, resume_step=resume_step, downtime_s=downtime,
                        resumed_at=ctx.clock.now())
        self._finish_forward(m)

    def _finish_forward(self, m: Migration) -> None:
        """SWITCHING and TERMINATING; safe to run again after a crash."""
        ctx = self.ctx
        assert m.to_instance_id is not None
        new = ctx.repo.get_instance(m.to_instance_id)
        old = ctx.repo.get_instance(m.from_instance_id)
        now = ctx.clock.now()
        ctx.route(m.job_id, new)
        job = ctx.repo.get_job(m.job_id)
        if job.status == S.MIGRATING:
            ctx.repo.transition(
                m.job_id, S.RUNNING, expect={S.MIGRATING}, instance_id=new.id,
                offer_id=m.to_offer_id, last_migration_at=now)
        m = self._phase(m, P.TERMINATING, switched_at=m.switched_at or now)

        if old.address:
            drained = ctx.router.drain(old.address, ctx.timeouts.drain_s)
            if not drained:
                log.warning("requests to %s still in flight after %.0fs; terminating",
                            old.id, ctx.timeouts.drain_s)
        ctx.terminate(old.id)
        m = ctx.repo.update_migration(
            m.id, phase=P.DONE, status=MigrationStatus.COMPLETED, finished_at=ctx.clock.now())
        ctx.metrics.migrations.labels(m.reason.value, "completed").inc()
        if m.downtime_s is not None:
            ctx.metrics.migration_downtime.observe(m.downtime_s)
        ctx.event(m.job_id, "migration_completed",
                  f"moved {m.from_instance_id} -> {m.to_instance_id}: checkpoint step "
                  f"{m.checkpoint_step}, resumed at step {m.resume_step}, downtime "
                  f"{(m.downtime_s or 0):.3f}s", migration_id=m.id)

    def _emergency_checkpoint(self, m: Migration, address: str) -> None:
        """After a preemption notice, save now, before the replacement boots
        (minutes) and while the notice window (two on AWS) lasts: if the
        instance is taken first, recovery resumes from this checkpoint. The
        job keeps training; the move's own checkpoint comes at the switch."""
        try:
            result = self.ctx.agents.checkpoint(address, pause=False,
                                                timeout_s=self.ctx.timeouts.checkpoint_s)
        except AgentError as err:
            log.warning("migration %s: emergency checkpoint failed: %s", m.id, err)
            return
        self.ctx.event(m.job_id, "emergency_checkpoint",
                       f"checkpointed step {result.step} after the interruption notice",
                       migration_id=m.id, step=result.step)

    # --- back --------------------------------------------------------------

    def rollback(self, m: Migration, error: str, *, offer_fault: bool = True) -> None:
        """Keep (or put) the job back on the old instance; leave nothing behind."""
        ctx = self.ctx
        if m.phase.rolls_forward:
            # Past the switch the new instance is the job's; finish instead.
            self._finish_forward(m)
            return
        if m.to_instance_id is not None:
            try:
                ctx.terminate(m.to_instance_id, failed=True)
            except ProviderError as err:  # the reaper retries
                log.warning("could not terminate replacement %s: %s", m.to_instance_id, err)
        if m.phase in (P.LAUNCHING, P.BOOTING) and offer_fault:
            # The offer could not give a healthy machine: don't retry it at
            # once on the next scout pass.
            ctx.mark_unavailable(m.to_offer_id)
        if m.checkpoint_step is not None:
            self._delete_checkpoints_after(m.job_id, m.checkpoint_step)
        job = ctx.repo.get_job(m.job_id)
        old = ctx.repo.get_instance(m.from_instance_id)
        old_alive = old.address is not None and not old.status.is_terminal()
        if old_alive and m.phase in (P.CHECKPOINTING, P.RESTORING):
            try:
                ctx.agents.resume(old.address)  # type: ignore[arg-type]
            except AgentError as err:
                state = self._agent_state(old.address)  # type: ignore[arg-type]
                old_alive = state in (AgentState.RUNNING, AgentState.COMPLETED)
                log.warning("could not resume %s: %s", old.id, err)
        m = ctx.repo.update_migration(
            m.id, phase=P.ROLLED_BACK, status=MigrationStatus.FAILED, error=error[:2000],
            finished_at=ctx.clock.now())
        ctx.metrics.migrations.labels(m.reason.value, "failed").inc()
        if job.status == S.MIGRATING:
            try:
                if old_alive:
                    ctx.repo.transition(m.job_id, S.RUNNING, expect={S.MIGRATING})
                else:
                    ctx.router.switch(m.job_id, None)
                    ctx.repo.transition(m.job_id, S.RECOVERING, expect={S.MIGRATING},
                                        instance_id=None)
            except (ConcurrentChange, IllegalTransition):
                pass  # cancelled meanwhile; cancel cleans up
        ctx.event(m.job_id, "migration_failed",
                  f"move to {m.to_offer_id} failed, job stays on {m.from_instance_id}: {error}",
                  migration_id=m.id)

    def repair(self) -> None:
        """Finish or undo moves a previous control plane left in progress."""
        for m in self.ctx.repo.list_migrations(status=MigrationStatus.IN_PROGRESS):
            log.info("repairing migration %s left in phase %s", m.id, m.phase.value)
            if m.phase.rolls_forward:
                self._finish_forward(m)
            else:
                self.rollback(m, f"control plane restarted during {m.phase.value}")

    # --- helpers -----------------------------------------------------------

    def _agent_state(self, address: str) -> AgentState | None:
        try:
            return self.ctx.agents.health(address).state
        except AgentError:
            return None

    def _wait_for_standby(self, m: Migration, instance_id: str, address: str) -> AgentHealth:
        """Until the replacement's workload waits in standby for its restore
        (started, its imports and data loading done): it must answer
        within ``health_s`` of launch; then its setup may take up to
        ``setup_s``, while it keeps answering (``lost_s``). A failed setup
        fails the move with the setup's own error."""
        ctx = self.ctx
        started = last_seen = time.monotonic()
        seen = False
        while True:
            now = time.monotonic()
            try:
                health = ctx.agents.health(address)
            except AgentError:
                health = None
            if health is not None:
                seen, last_seen = True, now
                if health.state == AgentState.STANDBY and health.restore_waiting:
                    return health  # the workload is up and asks for its checkpoint
                if health.state == AgentState.FAILED:
                    raise MigrationFailed(
                        f"replacement {instance_id} failed before standby: {health.error}",
                        offer_fault=health.failed_phase is None)
                if health.awaiting_secrets:
                    ctx.deliver_secrets(m.job_id, address)
            if not seen and now - started > ctx.timeouts.health_s:
                raise MigrationFailed(f"replacement {instance_id} did not come up in standby "
                                      f"within {ctx.timeouts.health_s:.0f}s")
            if seen and now - last_seen > ctx.timeouts.lost_s:
                raise MigrationFailed(f"replacement {instance_id} stopped answering during "
                                      "its setup")
            if now - started > ctx.timeouts.health_s + ctx.timeouts.setup_s:
                raise MigrationFailed(f"replacement {instance_id} not in standby within "
                                      f"{ctx.timeouts.health_s + ctx.timeouts.setup_s:.0f}s")
            if ctx.provider.get(instance_id).state.value == "terminated":
                raise MigrationFailed(f"replacement {instance_id} terminated while booting")
            self._check_job(m)
            time.sleep(ctx.poll_interval_s)

    def _wait_for_first_step(self, address: str, checkpoint_step: int):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + self.ctx.timeouts.resume_s
        while time.monotonic() < deadline:
            try:
                health = self.ctx.agents.health(address)
            except AgentError:
                health = None
            if health is not None:
                if health.state == AgentState.FAILED:
                    raise MigrationFailed(f"replacement failed to restore: {health.error}")
                if health.first_step is not None and (
                        health.step > checkpoint_step or health.checkpoint_mode == "dir"):
                    # A folder job's steps are not seen: its command started
                    # on the restored folder (protocol.py).
                    return health
            time.sleep(min(self.ctx.poll_interval_s, 0.01))
        raise MigrationFailed(
            f"replacement did not complete a step after restoring step {checkpoint_step} "
            f"within {self.ctx.timeouts.resume_s:.0f}s")

    def _delete_checkpoints_after(self, job_id: str, step: int) -> None:
        CheckpointStore(self.ctx.store, checkpoint_prefix(job_id)).discard_after(step)
