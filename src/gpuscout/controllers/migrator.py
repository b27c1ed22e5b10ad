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

The old instance may die before it hands over (a spot notice's two minutes
run out, the machine freezes): it is watched while the replacement boots
and while it checkpoints, and once it is gone (the provider says so, or its
agent has not answered for ``lost_s``) the replacement, already on its way,
takes over as a recovery: the old instance is terminated (fenced, its
billing stopped) and the replacement restores the latest verified
checkpoint. A replacement that dies while restoring is noticed the same way,
in seconds, and the move rolls back to the old instance, paused at its
checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

from gpuscout.agent.protocol import AgentState, checkpoint_prefix
from gpuscout.controllers import failpoints
from gpuscout.controllers.agent_client import AgentError, AgentHealth, CheckpointResult
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
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    ProviderError,
    ProviderState,
)
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


class InstanceLost(MigrationFailed):
    """The instance the job is leaving died before it handed over: the move
    becomes a recovery on the replacement."""

    def __init__(self, instance_id: str, why: str) -> None:
        super().__init__(f"{instance_id} {why}", offer_fault=False)
        self.instance_id = instance_id
        self.why = why


# How often an instance's liveness is asked of the provider while a move
# waits on it: a describe call on a cloud, so not every poll.
LIVENESS_CHECK_S = 1.0


@dataclass
class Liveness:
    """Whether an instance is still there, for a move waiting on it: gone
    once the provider says it is terminated (or no longer knows it), or once
    its agent has not answered for ``lost_s`` (frozen, cut off).

    The waiter calls ``answered`` whenever the instance's agent answers it,
    and ``lost`` on each poll; ``lost`` looks at most every ``check_s`` (a
    provider's describe call is not free): it asks the provider, and the
    agent at ``ask_agent`` if given, and says why the instance is gone, or
    None while it lives."""

    ctx: Context
    instance_id: str
    check_s: float = LIVENESS_CHECK_S
    last_answer: datetime | None = None
    _last_check: datetime | None = field(default=None, repr=False)

    def answered(self) -> None:
        self.last_answer = self.ctx.clock.now()

    def lost(self, *, ask_agent: str | None = None) -> str | None:
        now = self.ctx.clock.now()
        if self.last_answer is None:
            self.last_answer = now
        if self._last_check is not None and (
                (now - self._last_check).total_seconds() < self.check_s):
            return None
        self._last_check = now
        try:
            if self.ctx.provider.get(self.instance_id).state == ProviderState.TERMINATED:
                return "was terminated by the provider"
        except InstanceNotFound:
            return "is unknown to the provider"
        except ProviderError:
            pass  # the provider cannot say now; the agent's silence decides
        if ask_agent is not None:
            try:
                self.ctx.agents.health(ask_agent)
                self.last_answer = now
            except AgentError:
                pass
        silent = (now - self.last_answer).total_seconds()
        if silent > self.ctx.timeouts.lost_s:
            return f"has not answered for {silent:.0f} s"
        return None


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
        with failpoints.phase_change(m.phase.value, phase.value):  # a crash-test hook
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
        old_live = Liveness(ctx, old.id)

        if m.reason == MigrationReason.PREEMPTION:
            self._emergency_checkpoint(m, old.address)

        # LAUNCHING: the replacement starts in standby; the job keeps training.
        # Its id is on the migration before it exists: a control plane killed
        # in between knows which instance to undo.
        planned = new_id("i")
        m = ctx.repo.update_migration(m.id, to_instance_id=planned)
        try:
            new, _ = ctx.launch(job, target, standby=True, instance_id=planned)
        except CapacityError:
            ctx.mark_unavailable(target.id)
            raise
        m = self._phase(m, P.BOOTING, to_instance_id=new.id)
        self._check_job(m)
        assert new.address is not None

        try:
            # BOOTING: wait for the replacement's agent to boot, unpack the
            # job's workdir and run its setup (the job keeps training
            # meanwhile, and the old instance is watched), and wait in standby.
            m = self._replacement_ready(m, new.id, new.address,
                                        watch=(old_live, old.address))
            self._check_job(m)

            # CHECKPOINTING: the old instance saves at its next step boundary
            # and pauses there; from now until the switch no step runs anywhere.
            result = self._checkpoint_old(old.address, old_live)
        except InstanceLost as lost:
            self._take_over(self.ctx.repo.get_migration(m.id), lost)
            return
        m = self._phase(m, P.RESTORING, checkpoint_step=result.step,
                        checkpointed_at=ctx.clock.now())
        self._check_job(m)

        # RESTORING: the replacement restores exactly that checkpoint.
        ctx.agents.restore(new.address, result.step)
        health = self._wait_for_first_step(new.id, new.address, result.step)
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

    def _take_over(self, m: Migration, lost: InstanceLost) -> None:
        """The old instance died before it handed over (``lost``): fence it
        (terminated, its billing stopped), then the replacement, booted or
        booting, restores the latest verified checkpoint and the move rolls
        forward from there as a recovery. Steps the old instance ran after
        that checkpoint are lost with it, as in any recovery."""
        ctx = self.ctx
        assert m.to_instance_id is not None
        new = ctx.repo.get_instance(m.to_instance_id)
        assert new.address is not None
        # Fenced first: a frozen instance that wakes can write no checkpoint
        # after the one the replacement restores.
        ctx.router.switch(m.job_id, None)
        ctx.terminate(lost.instance_id, failed=True)
        latest = CheckpointStore(ctx.store, checkpoint_prefix(m.job_id)).latest()
        since = (f"the last verified checkpoint (step {latest.step})" if latest is not None
                 else "the start (no checkpoint yet)")
        ctx.event(m.job_id, "instance_lost",
                  f"{lost.instance_id} {lost.why} during the move ({m.phase.value}); it is "
                  f"terminated and its replacement {new.id} takes over from {since}",
                  instance_id=lost.instance_id, migration_id=m.id)
        if m.phase in (P.LAUNCHING, P.BOOTING):
            m = self._replacement_ready(m, new.id, new.address)
        m = self._phase(m, P.RESTORING, checkpoint_step=latest.step if latest else None)
        self._check_job(m)
        ctx.agents.restore(new.address, None)  # the latest verified checkpoint
        health = self._wait_for_first_step(new.id, new.address, None)
        # What the replacement took (it skips a corrupt checkpoint): the
        # step before its first, where its steps are seen.
        restored = (health.first_step - 1 if health.first_step and health.first_step > 1
                    and health.checkpoint_mode != "dir" else m.checkpoint_step)
        m = self._phase(m, P.SWITCHING, checkpoint_step=restored,
                        resume_step=health.first_step, resumed_at=ctx.clock.now())
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

        lost = old.status == InstanceStatus.FAILED  # died before it handed over
        if old.address and not old.status.is_terminal():
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
        if lost:
            restored = ("from the start" if m.checkpoint_step is None
                        else f"from checkpoint step {m.checkpoint_step}")
            ctx.event(m.job_id, "migration_completed",
                      f"recovered on {m.to_instance_id} after {m.from_instance_id} was lost: "
                      f"restored {restored}, resumed at step {m.resume_step}",
                      migration_id=m.id)
            return
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
        if not old_alive:
            # Gone (or never to answer again): its row must not stay running
            # and billed. Terminating is idempotent and fences it.
            try:
                ctx.terminate(old.id, failed=True)
            except ProviderError as err:  # the reaper retries
                log.warning("could not terminate lost instance %s: %s", old.id, err)
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
        outcome = (f"job stays on {m.from_instance_id}" if old_alive else
                   f"{m.from_instance_id} is lost too; the job recovers from its last "
                   "verified checkpoint on a new instance")
        if job.status != S.MIGRATING:
            outcome = f"job is {job.status.value}"
        ctx.event(m.job_id, "migration_failed",
                  f"move to {m.to_offer_id} failed, {outcome}: {error}", migration_id=m.id)

    def repair(self) -> None:
        """Finish or undo moves a previous control plane left in progress."""
        for m in self.ctx.repo.list_migrations(status=MigrationStatus.IN_PROGRESS):
            log.info("repairing migration %s left in phase %s", m.id, m.phase.value)
            if m.phase.rolls_forward:
                self._finish_forward(m)
            else:
                # The restart, not the target offer, ended the move.
                self.rollback(m, f"control plane restarted during {m.phase.value}",
                              offer_fault=False)

    # --- helpers -----------------------------------------------------------

    def _agent_state(self, address: str) -> AgentState | None:
        try:
            return self.ctx.agents.health(address).state
        except AgentError:
            return None

    def _sleep(self) -> None:
        self.ctx.clock.sleep(self.ctx.poll_interval_s)

    def _elapsed_s(self, since: datetime) -> float:
        return (self.ctx.clock.now() - since).total_seconds()

    def _replacement_ready(self, m: Migration, instance_id: str, address: str, *,
                           watch: tuple[Liveness, str] | None = None) -> Migration:
        """Wait for the replacement in standby, record it running, and move
        the migration on to CHECKPOINTING."""
        ready = self._wait_for_standby(m, instance_id, address, watch=watch)
        now = self.ctx.clock.now()
        self.ctx.repo.update_instance(instance_id, status=InstanceStatus.RUNNING,
                                      ready_at=now, setup_s=ready.setup_s)
        return self._phase(m, P.CHECKPOINTING, replacement_ready_at=now)

    def _wait_for_standby(self, m: Migration, instance_id: str, address: str, *,
                          watch: tuple[Liveness, str] | None = None) -> AgentHealth:
        """Until the replacement's workload waits in standby for its restore
        (started, its imports and data loading done): it must answer
        within ``health_s`` of launch; then its setup may take up to
        ``setup_s``, while it keeps answering (``lost_s``). A failed setup
        fails the move with the setup's own error. ``watch``: the old
        instance (its liveness and agent address), InstanceLost once gone."""
        ctx = self.ctx
        started = ctx.clock.now()
        live = Liveness(ctx, instance_id)
        seen = False
        while True:
            try:
                health = ctx.agents.health(address)
            except AgentError:
                health = None
            if health is not None:
                seen = True
                live.answered()
                if health.state == AgentState.STANDBY and health.restore_waiting:
                    return health  # the workload is up and asks for its checkpoint
                if health.state == AgentState.FAILED:
                    raise MigrationFailed(
                        f"replacement {instance_id} failed before standby: {health.error}",
                        offer_fault=health.failed_phase is None)
                if health.awaiting_secrets:
                    ctx.deliver_secrets(m.job_id, address)
            waited = self._elapsed_s(started)
            if not seen and waited > ctx.timeouts.health_s:
                raise MigrationFailed(f"replacement {instance_id} did not come up in standby "
                                      f"within {ctx.timeouts.health_s:.0f}s")
            if seen and (why := live.lost()) is not None:
                raise MigrationFailed(f"replacement {instance_id} {why} during its setup")
            if waited > ctx.timeouts.health_s + ctx.timeouts.setup_s:
                raise MigrationFailed(f"replacement {instance_id} not in standby within "
                                      f"{ctx.timeouts.health_s + ctx.timeouts.setup_s:.0f}s")
            if not seen and ctx.provider.get(instance_id).state == ProviderState.TERMINATED:
                raise MigrationFailed(f"replacement {instance_id} terminated while booting")
            if watch is not None and (why := watch[0].lost(ask_agent=watch[1])) is not None:
                raise InstanceLost(watch[0].instance_id, why)
            self._check_job(m)
            self._sleep()

    def _checkpoint_old(self, address: str, live: Liveness) -> CheckpointResult:
        """The old instance's checkpoint-and-pause. The call runs aside while
        the instance is watched: InstanceLost as soon as it is gone (the
        provider says so, or no answer for ``lost_s``: a frozen machine
        would otherwise hold the move for the whole ``checkpoint_s``). A
        checkpoint that fails while the instance lives fails the move."""
        ctx = self.ctx
        done = threading.Event()
        outcome: list[CheckpointResult | BaseException] = []

        def call() -> None:
            try:
                outcome.append(ctx.agents.checkpoint(
                    address, pause=True, timeout_s=ctx.timeouts.checkpoint_s))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                outcome.append(err)
            finally:
                done.set()

        threading.Thread(target=call, name="gpuscout-checkpoint-old", daemon=True).start()
        live.answered()
        while not done.wait(max(ctx.poll_interval_s, 0.05)):
            if (why := live.lost(ask_agent=address)) is not None:
                raise InstanceLost(live.instance_id, why)
        (result,) = outcome
        if isinstance(result, CheckpointResult):
            return result
        if isinstance(result, AgentError):
            # Refused or cut off: the instance may just have died. Watch it
            # until it answers again (the checkpoint itself failed) or is gone.
            while True:
                try:
                    ctx.agents.health(address)
                except AgentError:
                    if (why := live.lost()) is not None:
                        raise InstanceLost(live.instance_id, why) from result
                    self._sleep()
                    continue
                raise result
        raise result

    def _wait_for_first_step(self, instance_id: str, address: str,
                             checkpoint_step: int | None) -> AgentHealth:
        """Until the replacement completed its first step after restoring
        ``checkpoint_step`` (None: whatever checkpoint it took, the latest
        verified). MigrationFailed if it fails, dies (the provider says so,
        or no answer for ``lost_s``), or takes over ``resume_s``."""
        ctx = self.ctx
        started = ctx.clock.now()
        live = Liveness(ctx, instance_id)
        while self._elapsed_s(started) < ctx.timeouts.resume_s:
            try:
                health = ctx.agents.health(address)
            except AgentError:
                health = None
            if health is not None:
                live.answered()
                if health.state == AgentState.FAILED:
                    raise MigrationFailed(f"replacement failed to restore: {health.error}")
                if health.first_step is not None and (
                        checkpoint_step is None or health.steps_done > checkpoint_step
                        or health.checkpoint_mode == "dir"):
                    # A folder job's steps are not seen: its command started
                    # on the restored folder (protocol.py).
                    return health
            if (why := live.lost()) is not None:
                raise MigrationFailed(f"replacement {instance_id} {why} while restoring")
            ctx.clock.sleep(min(ctx.poll_interval_s, 0.01))
        which = "the latest checkpoint" if checkpoint_step is None else \
            f"step {checkpoint_step}"
        raise MigrationFailed(
            f"replacement did not complete a step after restoring {which} "
            f"within {ctx.timeouts.resume_s:.0f}s")

    def _delete_checkpoints_after(self, job_id: str, step: int) -> None:
        CheckpointStore(self.ctx.store, checkpoint_prefix(job_id)).discard_after(step)
