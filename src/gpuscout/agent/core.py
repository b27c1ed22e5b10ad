"""The agent's decisions, as pure functions over an immutable status.

Every event the agent sees (a progress report, a checkpoint request, the
child exiting, ...) is a function ``(AgentStatus, event) -> (AgentStatus,
decision)``. The HTTP server only serialises calls to these functions and
wakes whoever waits on the result; it decides nothing itself. That keeps the
answer to "what does a progress report get while a pause is pending?" in one
table-testable place.

Checkpoint requests. A request made while ``checkpoints_reported == n`` is
answered by the next checkpoint the workload reports (the n+1-th), whatever
made the workload save it (the agent asking, or its own ``checkpoint_every``
when it saved synchronously): that checkpoint holds every step completed when
it was reported, which is all the caller needs. A checkpoint reported with
``periodic=True`` was uploaded in the background while training went on, so
it may not: it updates ``last_checkpoint_step``/``key`` (never backwards) and
answers no request. If any request answered by a checkpoint asked to pause, the
workload is told to pause before it runs another step, so a paused workload's
step equals its last checkpoint's step: no step is lost on a planned move.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from gpuscout.agent.protocol import (
    AgentState,
    CheckpointResult,
    Health,
    ProgressAction,
)

# Lines of a failed command's stderr kept in its error, and at most this
# many characters of them (the error travels in health, events and the API).
ERROR_TAIL_LINES = 10
MAX_ERROR_TAIL_CHARS = 2000
# Skipped checkpoints an agent remembers (a store of hundreds of damaged
# ones is not reported one by one).
MAX_SKIPPED = 20

LIVE_STATES = frozenset(
    {AgentState.SETUP, AgentState.STARTING, AgentState.STANDBY, AgentState.RESTORING,
     AgentState.RUNNING, AgentState.PAUSED}
)
# How the job checkpoints: through gpuscout.workload's calls to the agent,
# or by the folder convention of gpuscout.agent.ckptdir (GPUSCOUT_CHECKPOINT_DIR
# and SIGUSR1).
LIBRARY = "library"
DIR = "dir"
# A command that has not called the agent this long after it started does
# not use gpuscout.workload (whose init() calls it first thing): it is taken
# to keep the folder convention, and SIGUSR1 asks it to save.
PLAIN_MODE_AFTER_S = 20.0
# States in which the workload will reach a step boundary without outside
# help, so a checkpoint request can be queued. STANDBY waits for
# /agent/restore and has no state of its own to save.
CHECKPOINTABLE_STATES = frozenset(
    {AgentState.STARTING, AgentState.RESTORING, AgentState.RUNNING, AgentState.PAUSED}
)


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    id: int
    pause: bool
    # The request is answered by the first checkpoint reported after this
    # many had been reported.
    after: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request that cannot be served in this state (HTTP 409)."""

    message: str


@dataclass(frozen=True, slots=True)
class AgentStatus:
    instance_id: str
    job_id: str
    state: AgentState
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_key: str | None = None
    checkpoints_reported: int = 0
    first_step: int | None = None
    first_step_at: float | None = None
    last_step_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    interruption_notice: str | None = None
    # The step /agent/restore named (None: the latest verified checkpoint).
    restore_step: int | None = None
    restore_requested: bool = False
    pending: tuple[CheckpointRequest, ...] = ()
    next_request_id: int = 1
    # Set by /agent/stop or SIGTERM: the exit that follows is not the job's.
    stopping: bool = False
    # A replacement: after SETUP it waits in STANDBY for /agent/restore.
    standby: bool = False
    awaiting_secrets: bool = False
    setup_s: float | None = None
    # Where the job's own work failed: "setup" (its workdir or setup) or
    # "command"; None while nothing failed, or when the agent itself did.
    failed_phase: str | None = None
    # A replacement's workload has started (imported its framework, loaded
    # its data, built its model) and waits for /agent/restore: only then is
    # the replacement ready, and pausing the old instance costs no more than
    # the restore itself.
    restore_waiting: bool = False
    # LIBRARY, DIR, or None while unknown (see PLAIN_MODE_AFTER_S).
    checkpoint_mode: str | None = None
    # SIGUSR1 was sent to the command running now (DIR), at ``signalled_at``
    # (Unix seconds): it saves and exits.
    signal_sent: bool = False
    signalled_at: float | None = None
    # Checkpoints a restore on this instance skipped as corrupt or partial:
    # (key, reason), oldest report first.
    skipped_checkpoints: tuple[tuple[str, str], ...] = ()
    # A resume came for a folder job signalled to save and exit: its command
    # starts again (on its last save) once it has exited.
    resume_pending: bool = False

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def health(self) -> Health:
        """The body of GET /agent/health (protocol.Health): the status's
        fields of the same names, so a field added to both needs no mapping."""
        values = {name: getattr(self, name) for name in Health.model_fields}
        values["skipped_checkpoints"] = [{"key": key, "reason": reason}
                                         for key, reason in self.skipped_checkpoints]
        return Health.model_validate(values)


def initial(instance_id: str, job_id: str, *, standby: bool, preparing: bool = False,
            awaiting_secrets: bool = False) -> AgentStatus:
    """The status at start: SETUP while the job is prepared (secrets to
    receive, a workdir to unpack, a setup to run), else STANDBY or STARTING."""
    if preparing or awaiting_secrets:
        state = AgentState.SETUP
    else:
        state = AgentState.STANDBY if standby else AgentState.STARTING
    return AgentStatus(instance_id=instance_id, job_id=job_id, state=state, standby=standby,
                       awaiting_secrets=awaiting_secrets)


# --- preparing the job -------------------------------------------------------


def secrets_received(status: AgentStatus) -> AgentStatus:
    return replace(status, awaiting_secrets=False)


def prepared(status: AgentStatus, setup_s: float | None) -> AgentStatus:
    """Workdir unpacked and setup done: wait for a restore (a replacement) or
    start. A status that left SETUP meanwhile (a stop) is kept."""
    if status.state is not AgentState.SETUP:
        return status
    state = AgentState.STANDBY if status.standby else AgentState.STARTING
    return replace(status, state=state, setup_s=setup_s)


def on_setup_failed(status: AgentStatus, error: str, setup_s: float | None = None,
                    exit_code: int | None = None) -> AgentStatus:
    """The workdir could not be unpacked or the setup failed: the job's own
    error (``exit_code`` set when setup itself exited non-zero)."""
    if status.stopping:
        error = f"stopped on request ({error})"
    return replace(status, state=AgentState.FAILED, error=error, setup_s=setup_s,
                   exit_code=exit_code, failed_phase="setup", pending=())


# --- control plane -> agent ------------------------------------------------


def request_checkpoint(
    status: AgentStatus, *, pause: bool
) -> tuple[AgentStatus, CheckpointRequest | CheckpointResult | Refusal]:
    """Queue a checkpoint request, answer it at once, or refuse it.

    A paused workload already sits on a verified checkpoint of its current
    step, so a request then is answered immediately (and it stays paused).
    """
    if status.state not in CHECKPOINTABLE_STATES:
        return status, Refusal(f"workload is not running (state {status.state.value})")
    if (
        status.state is AgentState.PAUSED
        and status.last_checkpoint_key is not None
        and status.last_checkpoint_step == status.step
    ):
        assert status.last_checkpoint_step is not None
        answer = CheckpointResult(step=status.last_checkpoint_step,
                                  key=status.last_checkpoint_key,
                                  last_step_at=status.last_step_at)
        return status, answer
    request = CheckpointRequest(status.next_request_id, pause, status.checkpoints_reported)
    return (
        replace(status, pending=(*status.pending, request),
                next_request_id=status.next_request_id + 1),
        request,
    )


def checkpoint_outcome(
    status: AgentStatus, request: CheckpointRequest
) -> CheckpointResult | Refusal | None:
    """What a waiting request gets now: an answer, a refusal, or None (wait)."""
    if status.checkpoints_reported > request.after:
        assert status.last_checkpoint_step is not None
        assert status.last_checkpoint_key is not None
        return CheckpointResult(step=status.last_checkpoint_step,
                                key=status.last_checkpoint_key,
                                last_step_at=status.last_step_at)
    if not status.live:
        return Refusal(f"workload ended before checkpointing (state {status.state.value})")
    return None


def on_interruption(status: AgentStatus, notice: str) -> AgentStatus:
    """A spot reclaim notice: record it (health reports it, and the control
    plane moves the job) and save an emergency checkpoint at the next step
    boundary without pausing, so at most one step is at risk if the move
    cannot finish inside the notice window. A second notice changes nothing."""
    if status.interruption_notice is not None:
        return status
    status = replace(status, interruption_notice=notice)
    if status.state not in CHECKPOINTABLE_STATES:
        return status
    queued, _ = request_checkpoint(status, pause=False)
    return queued


def withdraw_checkpoint(status: AgentStatus, request_id: int) -> AgentStatus:
    """Drop a request whose caller gave up (timeout), so a pause nobody waits
    for any more cannot freeze the workload later."""
    pending = tuple(r for r in status.pending if r.id != request_id)
    return replace(status, pending=pending)


def resume(status: AgentStatus) -> AgentStatus:
    """Let a paused workload go on; pending requests no longer pause it.

    Idempotent: resuming a workload that is not paused changes nothing else.
    """
    pending = tuple(replace(r, pause=False) for r in status.pending)
    state = AgentState.RUNNING if status.state is AgentState.PAUSED else status.state
    rerun = status.checkpoint_mode == DIR and status.signal_sent
    return replace(status, state=state, pending=pending, resume_pending=rerun)


def request_restore(status: AgentStatus, step: int | None) -> tuple[AgentStatus, Refusal | None]:
    """Release a standby workload to restore ``step`` (None: latest verified).

    Repeating the same call is accepted (a control plane that restarted
    mid-move may send it twice); anything else outside standby is refused.
    """
    if status.state is AgentState.STANDBY:
        new = replace(status, state=AgentState.RESTORING, restore_step=step, restore_requested=True)
        return new, None
    if status.restore_requested and status.live and status.restore_step == step:
        return status, None
    return status, Refusal(f"agent is not in standby (state {status.state.value})")


def workload_waits(status: AgentStatus) -> AgentStatus:
    """The workload asked for its restore target: in standby, it is ready."""
    if status.state is AgentState.STANDBY and not status.restore_waiting:
        return replace(status, restore_waiting=True)
    return status


def on_skipped(status: AgentStatus, items: Sequence[tuple[str, str]]) -> AgentStatus:
    """A restore skipped these checkpoints ((key, reason)) as corrupt or
    partial; each is recorded once (health reports them, the control plane
    names them in the job's events). At most MAX_SKIPPED are kept."""
    known = {key for key, _ in status.skipped_checkpoints}
    new = tuple(dict.fromkeys((k, r) for k, r in items if k not in known))
    if not new:
        return status
    return replace(status, skipped_checkpoints=(status.skipped_checkpoints + new)[-MAX_SKIPPED:])


def restore_released(status: AgentStatus) -> bool:
    """Whether GET /workload/restore-target may answer (not in standby)."""
    return status.state is not AgentState.STANDBY


def begin_stop(status: AgentStatus) -> AgentStatus:
    return replace(status, stopping=True)


# --- workload -> agent -----------------------------------------------------


def on_progress(
    status: AgentStatus,
    *,
    step: int,
    loss: float | None,
    total_steps: int | None,
    at: float,
) -> tuple[AgentStatus, ProgressAction]:
    """A step completed at ``at``: record it and tell the workload what next.

    - a pending request -> CHECKPOINT (save at this boundary);
    - PAUSED (a workload that ran a step anyway) -> PAUSE again;
    - otherwise CONTINUE, and the agent is RUNNING.
    """
    first_step = status.first_step if status.first_step is not None else step
    first_step_at = status.first_step_at if status.first_step_at is not None else at
    new = replace(
        status,
        step=step,
        loss=loss,
        total_steps=total_steps if total_steps is not None else status.total_steps,
        last_step_at=at,
        first_step=first_step,
        first_step_at=first_step_at,
    )
    if not status.live:
        return new, ProgressAction.CONTINUE
    if status.state is AgentState.PAUSED:
        return new, ProgressAction.PAUSE
    new = replace(new, state=AgentState.RUNNING)
    if status.pending:
        return new, ProgressAction.CHECKPOINT
    return new, ProgressAction.CONTINUE


def on_checkpointed(
    status: AgentStatus, *, step: int, key: str, periodic: bool = False
) -> tuple[AgentStatus, ProgressAction]:
    """The workload saved a verified checkpoint of ``step`` under ``key``.

    It answers every pending request; the workload pauses if any of them asked.
    ``periodic``: a checkpoint uploaded in the background while training went
    on, so it may lack steps completed before it was reported: it becomes the
    last checkpoint (never moving it back to an older step) but answers no
    request and does not count in ``checkpoints_reported``.
    """
    if periodic:
        if status.last_checkpoint_step is None or step >= status.last_checkpoint_step:
            status = replace(status, last_checkpoint_step=step, last_checkpoint_key=key)
        if status.state is AgentState.PAUSED:
            return status, ProgressAction.PAUSE
        return status, ProgressAction.CONTINUE
    pause = any(r.pause for r in status.pending)
    new = replace(
        status,
        last_checkpoint_step=step,
        last_checkpoint_key=key,
        checkpoints_reported=status.checkpoints_reported + 1,
        pending=(),
    )
    if status.state is AgentState.PAUSED or (pause and status.live):
        return replace(new, state=AgentState.PAUSED), ProgressAction.PAUSE
    return new, ProgressAction.CONTINUE


def resume_released(status: AgentStatus) -> bool:
    """Whether GET /workload/wait-resume may answer (not paused)."""
    return status.state is not AgentState.PAUSED


# --- the child process -----------------------------------------------------


def exit_reason(what: str, exit_code: int, stderr_tail: Sequence[str] = ()) -> str:
    """"command exited with code 2", and the last lines of its stderr."""
    if exit_code < 0:
        reason = f"{what} killed by signal {-exit_code}"
    else:
        reason = f"{what} exited with code {exit_code}"
    tail = "\n".join(stderr_tail)
    if tail:
        reason += f"; last lines of stderr:\n{tail[-MAX_ERROR_TAIL_CHARS:]}"
    return reason


def on_exit(status: AgentStatus, exit_code: int,
            stderr_tail: Sequence[str] = ()) -> AgentStatus:
    """The job's command exited: 0 is COMPLETED, anything else FAILED, with
    the last lines of its stderr in ``error``.

    A negative code is death by that signal (subprocess convention). A
    folder job's command that exits after SIGUSR1, as the convention asks
    (0, or killed by the signal when it set no handler), is PAUSED on its
    last save, which answers the requests still pending; one that never
    saved has FAILED.
    """
    if status.signal_sent and not status.stopping and exit_code in (0, -signal.SIGUSR1):
        if status.last_checkpoint_key is None:
            return replace(status, state=AgentState.FAILED, exit_code=exit_code,
                           error=f"command exited (code {exit_code}) after SIGUSR1 without "
                                 "saving a checkpoint in GPUSCOUT_CHECKPOINT_DIR",
                           failed_phase="command", pending=())
        reported = status.checkpoints_reported + (1 if status.pending else 0)
        return replace(status, state=AgentState.PAUSED, pending=(),
                       checkpoints_reported=reported)
    if exit_code == 0:
        return replace(status, state=AgentState.COMPLETED, exit_code=0, pending=())
    reason = exit_reason("command", exit_code, stderr_tail)
    if status.stopping:
        reason = f"stopped on request ({reason})"
    return replace(status, state=AgentState.FAILED, exit_code=exit_code, error=reason,
                   failed_phase="command", pending=())


def on_start_failed(status: AgentStatus, error: str) -> AgentStatus:
    return replace(status, state=AgentState.FAILED, error=f"command could not start: {error}",
                   failed_phase="command")


# --- folder jobs (gpuscout.agent.ckptdir) -------------------------------------


def known_mode(status: AgentStatus, mode: str | None) -> AgentStatus:
    """The mode recorded for the job by an earlier instance (None: unknown)."""
    if mode is None or status.checkpoint_mode == mode:
        return status
    return replace(status, checkpoint_mode=mode)


def on_workload_call(status: AgentStatus) -> AgentStatus:
    """The command called /workload/*: it uses gpuscout.workload."""
    if status.checkpoint_mode == LIBRARY:
        return status
    return replace(status, checkpoint_mode=LIBRARY)


def plain_mode(status: AgentStatus) -> AgentStatus:
    """No call from the command for PLAIN_MODE_AFTER_S, or it saved into the
    folder: a folder job, RUNNING (the agent cannot see its steps)."""
    if status.checkpoint_mode is not None:
        return status
    state = AgentState.RUNNING if status.state is AgentState.STARTING else status.state
    return replace(status, checkpoint_mode=DIR, state=state)


def wants_signal(status: AgentStatus) -> bool:
    """Whether to send SIGUSR1 to a folder job's running command now: it was
    not signalled yet, and a checkpoint is asked for, or it is PAUSED (a
    save it made of its own accord answered a pause: it must stop too)."""
    if status.checkpoint_mode != DIR or status.signal_sent:
        return False
    return status.state is AgentState.PAUSED or (
        bool(status.pending)
        and status.state in (AgentState.STARTING, AgentState.RESTORING, AgentState.RUNNING))


def signalled(status: AgentStatus, at: float) -> AgentStatus:
    return replace(status, signal_sent=True, signalled_at=at)


def dir_started(status: AgentStatus, restored_step: int | None, at: float) -> AgentStatus:
    """A folder job's command started at ``at`` on the files of the checkpoint
    of ``restored_step`` (None: a fresh start). The agent cannot see its
    steps: its step is the restored one, and ``first_step``/``first_step_at``
    say that it resumed at the step after, when the command started."""
    if not status.live or status.stopping:
        return status
    fields: dict[str, Any] = {"state": AgentState.RUNNING, "checkpoint_mode": DIR,
                              "signal_sent": False, "signalled_at": None,
                              "resume_pending": False}
    if restored_step is not None:
        fields["step"] = restored_step
        if status.first_step is None:
            fields["first_step"], fields["first_step_at"] = restored_step + 1, at
    return replace(status, **fields)


def on_saved(status: AgentStatus, *, step: int, key: str,
             at: float) -> tuple[AgentStatus, bool]:
    """A folder job's save of ``step`` (its STEP written at ``at``) is
    uploaded and verified under ``key``: a checkpoint like one a library job
    reports (it answers the pending requests, and pauses if one asked),
    except that a save made before SIGUSR1 was sent, uploaded after, is
    periodic (it answers nothing: the save the signal asks for comes next,
    so no step it holds is lost). Returns whether it counts: a save made
    after the workload paused on an earlier one (fenced) does not, nor one
    after the command ended."""
    if not status.live or status.state is AgentState.PAUSED:
        return status, False
    state = status.state
    if state in (AgentState.STARTING, AgentState.RESTORING):
        state = AgentState.RUNNING
    periodic = status.signalled_at is not None and at < status.signalled_at
    if not periodic or step > (status.step or 0):
        status = replace(status, step=step, last_step_at=at)
    status = replace(status, checkpoint_mode=DIR, state=state)
    new, _ = on_checkpointed(status, step=step, key=key, periodic=periodic)
    return new, True
