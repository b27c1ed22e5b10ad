"""Table tests of the agent's decisions (gpuscout.agent.core): what each
event answers in each state, with checkpoint and pause requests pending."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gpuscout.agent import core
from gpuscout.agent.core import AgentStatus, CheckpointRequest, Refusal
from gpuscout.agent.protocol import AgentState, CheckpointResult, ProgressAction

S = AgentState
A = ProgressAction


def status(state: AgentState = S.RUNNING, **fields: Any) -> AgentStatus:
    return replace(core.initial("i-1", "job-1", standby=False), state=state, **fields)


def progress(s: AgentStatus, step: int, at: float = 100.0) -> tuple[AgentStatus, A]:
    return core.on_progress(s, step=step, loss=0.5, total_steps=50, at=at)


def req(id: int, pause: bool, after: int = 0) -> CheckpointRequest:
    return CheckpointRequest(id=id, pause=pause, after=after)


@pytest.mark.parametrize(
    ("before", "pending", "action", "after"),
    [
        # nothing asked: keep training; the first report makes the agent RUNNING
        (S.STARTING, (), A.CONTINUE, S.RUNNING),
        (S.RESTORING, (), A.CONTINUE, S.RUNNING),
        (S.RUNNING, (), A.CONTINUE, S.RUNNING),
        # a script that never calls restore() still reports from standby
        (S.STANDBY, (), A.CONTINUE, S.RUNNING),
        # a pending request, pause or not, is served at this boundary
        (S.RUNNING, (req(1, False),), A.CHECKPOINT, S.RUNNING),
        (S.RUNNING, (req(1, True),), A.CHECKPOINT, S.RUNNING),
        (S.STARTING, (req(1, True),), A.CHECKPOINT, S.RUNNING),
        (S.RESTORING, (req(1, False), req(2, True)), A.CHECKPOINT, S.RUNNING),
        # a paused workload that ran a step anyway is told to pause again
        (S.PAUSED, (), A.PAUSE, S.PAUSED),
        (S.PAUSED, (req(1, False),), A.PAUSE, S.PAUSED),
        # after the command ended, reports change nothing but the numbers
        (S.COMPLETED, (), A.CONTINUE, S.COMPLETED),
        (S.FAILED, (req(1, True),), A.CONTINUE, S.FAILED),
    ],
)
def test_progress_answers(
    before: AgentState, pending: tuple[CheckpointRequest, ...], action: A, after: AgentState
) -> None:
    new, got = progress(status(before, pending=pending), 7, at=123.5)
    assert (got, new.state) == (action, after)
    assert (new.step, new.last_step_at, new.loss, new.total_steps) == (7, 123.5, 0.5, 50)


def test_progress_records_first_step_once() -> None:
    s, _ = progress(status(S.RESTORING), 21, at=10.0)
    s, _ = progress(s, 22, at=11.0)
    assert (s.first_step, s.first_step_at, s.step, s.last_step_at) == (21, 10.0, 22, 11.0)


@pytest.mark.parametrize(
    ("before", "pending", "action", "after"),
    [
        # a periodic checkpoint with nothing asked
        (S.RUNNING, (), A.CONTINUE, S.RUNNING),
        # requests are answered by it; any pause among them pauses
        (S.RUNNING, (req(1, False),), A.CONTINUE, S.RUNNING),
        (S.RUNNING, (req(1, True),), A.PAUSE, S.PAUSED),
        (S.RUNNING, (req(1, False), req(2, True)), A.PAUSE, S.PAUSED),
        # already paused stays paused
        (S.PAUSED, (), A.PAUSE, S.PAUSED),
        # the command ended: nothing to pause
        (S.FAILED, (req(1, True),), A.CONTINUE, S.FAILED),
    ],
)
def test_checkpointed_answers(
    before: AgentState, pending: tuple[CheckpointRequest, ...], action: A, after: AgentState
) -> None:
    s = status(before, step=30, pending=pending, checkpoints_reported=2)
    new, got = core.on_checkpointed(s, step=30, key="ck/30")
    assert (got, new.state) == (action, after)
    assert (new.last_checkpoint_step, new.last_checkpoint_key) == (30, "ck/30")
    assert new.pending == () and new.checkpoints_reported == 3


@pytest.mark.parametrize(
    ("state", "refused"),
    [
        (S.STARTING, False),
        (S.RESTORING, False),
        (S.RUNNING, False),
        (S.STANDBY, True),
        (S.COMPLETED, True),
        (S.FAILED, True),
    ],
)
def test_checkpoint_request_queued_or_refused(state: AgentState, refused: bool) -> None:
    s = status(state, step=5)
    new, decision = core.request_checkpoint(s, pause=True)
    if refused:
        assert isinstance(decision, Refusal) and new == s
    else:
        assert decision == CheckpointRequest(id=1, pause=True, after=0)
        assert new.pending == (decision,) and new.next_request_id == 2


def test_paused_agent_answers_checkpoint_at_once() -> None:
    s = status(S.PAUSED, step=40, last_step_at=9.0, last_checkpoint_step=40,
               last_checkpoint_key="ck/40")
    new, decision = core.request_checkpoint(s, pause=True)
    assert decision == CheckpointResult(
        step=40, key="ck/40", last_step_at=9.0)
    assert new == s


def test_full_checkpoint_and_pause_cycle() -> None:
    """Request -> next boundary checkpoints -> paused at that step -> resume."""
    s = status(S.RUNNING, step=10)
    s, request = core.request_checkpoint(s, pause=True)
    assert isinstance(request, CheckpointRequest)
    assert core.checkpoint_outcome(s, request) is None  # not answered yet
    s, action = progress(s, 11, at=50.0)
    assert action is A.CHECKPOINT
    s, action = core.on_checkpointed(s, step=11, key="ck/11")
    assert action is A.PAUSE and s.state is S.PAUSED
    assert core.checkpoint_outcome(s, request) == CheckpointResult(
        step=11, key="ck/11", last_step_at=50.0)
    assert not core.resume_released(s)
    s = core.resume(s)
    assert s.state is S.RUNNING and core.resume_released(s)
    s, action = progress(s, 12)
    assert action is A.CONTINUE


def test_periodic_checkpoint_answers_a_request_made_before_it_was_reported() -> None:
    """The workload saved on its own at this boundary (progress said
    continue, then the request came): that checkpoint answers, and pauses."""
    s, _ = progress(status(S.RUNNING), 20)
    s, request = core.request_checkpoint(s, pause=True)
    assert isinstance(request, CheckpointRequest)
    s, action = core.on_checkpointed(s, step=20, key="ck/20")
    assert action is A.PAUSE
    assert core.checkpoint_outcome(s, request) == CheckpointResult(
        step=20, key="ck/20", last_step_at=100.0)


def test_a_checkpoint_reported_before_the_request_does_not_answer_it() -> None:
    s, _ = core.on_checkpointed(status(S.RUNNING, step=20), step=20, key="ck/20")
    s, request = core.request_checkpoint(s, pause=False)
    assert isinstance(request, CheckpointRequest)
    assert core.checkpoint_outcome(s, request) is None


def test_withdrawn_pause_request_does_not_pause_later() -> None:
    s, request = core.request_checkpoint(status(S.RUNNING, step=3), pause=True)
    assert isinstance(request, CheckpointRequest)
    s = core.withdraw_checkpoint(s, request.id)
    s, action = progress(s, 4)
    assert action is A.CONTINUE and s.pending == ()


def test_withdraw_keeps_other_requests() -> None:
    s, first = core.request_checkpoint(status(S.RUNNING), pause=False)
    s, second = core.request_checkpoint(s, pause=True)
    assert isinstance(first, CheckpointRequest) and isinstance(second, CheckpointRequest)
    s = core.withdraw_checkpoint(s, first.id)
    assert s.pending == (second,)


def test_resume_cancels_pause_of_pending_requests() -> None:
    s, request = core.request_checkpoint(status(S.RUNNING, step=3), pause=True)
    s = core.resume(s)
    s, action = progress(s, 4)
    assert action is A.CHECKPOINT  # the checkpoint is still wanted ...
    s, action = core.on_checkpointed(s, step=4, key="ck/4")
    assert action is A.CONTINUE  # ... but nobody wants the pause any more
    assert isinstance(request, CheckpointRequest)
    assert core.checkpoint_outcome(s, request) == CheckpointResult(
        step=4, key="ck/4", last_step_at=100.0)


def test_resume_is_idempotent_outside_pause() -> None:
    s = status(S.RUNNING, step=3)
    assert core.resume(s) == s


def test_request_refused_when_the_command_ends_first() -> None:
    s, request = core.request_checkpoint(status(S.RUNNING), pause=True)
    assert isinstance(request, CheckpointRequest)
    s = core.on_exit(s, 1)
    assert isinstance(core.checkpoint_outcome(s, request), Refusal)


@pytest.mark.parametrize(
    ("state", "requested", "restore_step", "step", "accepted", "after"),
    [
        (S.STANDBY, False, None, 12, True, S.RESTORING),
        (S.STANDBY, False, None, None, True, S.RESTORING),
        # the same call again (a control plane retrying) is accepted
        (S.RESTORING, True, 12, 12, True, S.RESTORING),
        (S.RUNNING, True, 12, 12, True, S.RUNNING),
        # a different step, or an agent that was never in standby: refused
        (S.RESTORING, True, 12, 13, False, S.RESTORING),
        (S.RUNNING, False, None, None, False, S.RUNNING),
        (S.STARTING, False, None, 3, False, S.STARTING),
        (S.COMPLETED, True, 12, 12, False, S.COMPLETED),
    ],
)
def test_restore(
    state: AgentState, requested: bool, restore_step: int | None, step: int | None,
    accepted: bool, after: AgentState,
) -> None:
    s = status(state, restore_requested=requested, restore_step=restore_step)
    new, refusal = core.request_restore(s, step)
    assert (refusal is None) == accepted
    assert new.state is after
    if accepted:
        assert new.restore_step == step and core.restore_released(new)


def test_standby_holds_restore_target_until_restore() -> None:
    s = core.initial("i-2", "job-1", standby=True)
    assert s.state is S.STANDBY and not core.restore_released(s)
    assert core.restore_released(core.initial("i-1", "job-1", standby=False))


@pytest.mark.parametrize(
    ("code", "stopping", "state", "error"),
    [
        (0, False, S.COMPLETED, None),
        (0, True, S.COMPLETED, None),
        (3, False, S.FAILED, "command exited with code 3"),
        (-9, False, S.FAILED, "command killed by signal 9"),
        (-15, True, S.FAILED, "stopped on request (command killed by signal 15)"),
    ],
)
def test_exit(code: int, stopping: bool, state: AgentState, error: str | None) -> None:
    s = core.on_exit(status(S.RUNNING, stopping=stopping, pending=(req(1, True),)), code)
    assert (s.state, s.exit_code, s.error, s.pending) == (state, code, error, ())


def test_start_failure() -> None:
    s = core.on_start_failed(status(S.STARTING), "no such directory")
    assert s.state is S.FAILED and s.error == "command could not start: no such directory"


def test_health_has_every_protocol_field() -> None:
    assert set(status().health().model_dump()) == {
        "instance_id", "job_id", "state", "step", "total_steps", "loss",
        "last_checkpoint_step", "last_checkpoint_key", "first_step", "first_step_at",
        "last_step_at", "exit_code", "error", "interruption_notice", "awaiting_secrets",
        "setup_s", "failed_phase", "restore_waiting", "checkpoint_mode",
        "skipped_checkpoints",
    }


def test_a_periodic_report_does_not_answer_a_pending_pause_request() -> None:
    """A checkpoint uploaded in the background may lack steps completed
    before it was reported: it becomes the last checkpoint, but the request
    waits for the next synchronous one, and nothing pauses."""
    s, _ = progress(status(S.RUNNING, checkpoints_reported=1), 20)
    s, request = core.request_checkpoint(s, pause=True)
    assert isinstance(request, CheckpointRequest)
    new, action = core.on_checkpointed(s, step=20, key="ck/20", periodic=True)
    assert action is A.CONTINUE and new.state is S.RUNNING
    assert (new.last_checkpoint_step, new.last_checkpoint_key) == (20, "ck/20")
    assert new.pending == s.pending and new.checkpoints_reported == 1
    assert core.checkpoint_outcome(new, request) is None
    # the next boundary saves synchronously; that report answers and pauses
    new, action = progress(new, 21, at=101.0)
    assert action is A.CHECKPOINT
    new, action = core.on_checkpointed(new, step=21, key="ck/21")
    assert action is A.PAUSE and new.state is S.PAUSED
    assert core.checkpoint_outcome(new, request) == CheckpointResult(
        step=21, key="ck/21", last_step_at=101.0)


@pytest.mark.parametrize(
    ("before", "last", "step", "action", "recorded"),
    [
        # nothing saved yet, or a newer (or the same) step: recorded
        (S.RUNNING, None, 10, A.CONTINUE, 10),
        (S.RUNNING, 10, 20, A.CONTINUE, 20),
        (S.RUNNING, 20, 20, A.CONTINUE, 20),
        # an older step than the last checkpoint: never moves it back
        (S.RUNNING, 30, 20, A.CONTINUE, 30),
        # a paused workload is told to stay paused, as by any report
        (S.PAUSED, 30, 20, A.PAUSE, 30),
        (S.STARTING, None, 5, A.CONTINUE, 5),
    ],
)
def test_periodic_report_answers(before: AgentState, last: int | None, step: int,
                                 action: A, recorded: int) -> None:
    pending = (req(1, True, after=2),)
    s = status(before, step=step, pending=pending, checkpoints_reported=2,
               last_checkpoint_step=last,
               last_checkpoint_key=None if last is None else f"ck/{last}")
    new, got = core.on_checkpointed(s, step=step, key=f"ck/{step}", periodic=True)
    assert (got, new.state) == (action, before)
    assert (new.last_checkpoint_step, new.last_checkpoint_key) == (recorded, f"ck/{recorded}")
    assert new.pending == pending and new.checkpoints_reported == 2
