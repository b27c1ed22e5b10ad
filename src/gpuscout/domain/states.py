"""The job state machine: every legal transition is in one table.

    pending -> scouting -> provisioning -> running -> completed
                   ^            |            |  ^
                   |            v            v  |
                   +------- recovering <- migrating
    (any non-terminal state) -> cancelled | failed

``running -> migrating -> running`` is a live move (make-before-break);
``running | migrating -> recovering`` is a lost instance (preemption, crash):
the job is placed again and resumes from its last verified checkpoint.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not yet looked at by the controller
    SCOUTING = "scouting"  # looking for an offer that fits
    PROVISIONING = "provisioning"  # an instance is starting for it
    RUNNING = "running"  # training on its active instance
    MIGRATING = "migrating"  # still training; a replacement is being prepared
    RECOVERING = "recovering"  # its instance was lost; being placed again
    COMPLETED = "completed"  # the command exited 0; artifacts are stored
    FAILED = "failed"  # the command failed or no placement was possible
    CANCELLED = "cancelled"  # a user cancelled it; everything terminated

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

_S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _S.PENDING: frozenset({_S.SCOUTING}),
    _S.SCOUTING: frozenset({_S.PROVISIONING}),
    _S.PROVISIONING: frozenset({_S.RUNNING, _S.SCOUTING, _S.RECOVERING}),
    _S.RUNNING: frozenset({_S.MIGRATING, _S.RECOVERING, _S.COMPLETED}),
    _S.MIGRATING: frozenset({_S.RUNNING, _S.RECOVERING, _S.COMPLETED}),
    _S.RECOVERING: frozenset({_S.PROVISIONING, _S.SCOUTING}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}
# Any live job can be cancelled or fail.
for _state in JobStatus:
    if not _state.is_terminal():
        TRANSITIONS[_state] = TRANSITIONS[_state] | {_S.CANCELLED, _S.FAILED}


class IllegalTransition(ValueError):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"illegal job transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[current]


def check_transition(current: JobStatus, target: JobStatus) -> JobStatus:
    """Return ``target`` if the move is legal, else raise IllegalTransition."""
    if not can_transition(current, target):
        raise IllegalTransition(current, target)
    return target
