"""The job state machine: every legal move, and every illegal one refused."""

import pytest

from gpuscout.domain import IllegalTransition, JobStatus, can_transition, check_transition
from gpuscout.domain.states import TRANSITIONS

S = JobStatus

LEGAL = {
    (S.PENDING, S.SCOUTING),
    (S.SCOUTING, S.PROVISIONING),
    (S.PROVISIONING, S.RUNNING),
    (S.PROVISIONING, S.SCOUTING),
    (S.PROVISIONING, S.RECOVERING),
    (S.RUNNING, S.MIGRATING),
    (S.RUNNING, S.RECOVERING),
    (S.RUNNING, S.COMPLETED),
    (S.MIGRATING, S.RUNNING),
    (S.MIGRATING, S.RECOVERING),
    (S.MIGRATING, S.COMPLETED),
    (S.RECOVERING, S.PROVISIONING),
    (S.RECOVERING, S.SCOUTING),
} | {
    (s, end) for s in S if not s.is_terminal() for end in (S.CANCELLED, S.FAILED)
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_transition_table(current: JobStatus, target: JobStatus) -> None:
    legal = (current, target) in LEGAL
    assert can_transition(current, target) is legal
    if legal:
        assert check_transition(current, target) is target
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {target.value}"):
            check_transition(current, target)


def test_terminal_states_have_no_way_out() -> None:
    for status in (S.COMPLETED, S.FAILED, S.CANCELLED):
        assert status.is_terminal()
        assert TRANSITIONS[status] == frozenset()


def test_every_live_state_can_be_cancelled() -> None:
    assert all(can_transition(s, S.CANCELLED) for s in S if not s.is_terminal())
