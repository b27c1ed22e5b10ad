"""The wire contract between the control plane, the agent and the workload.

One instance runs one agent (``python -m gpuscout.agent``), started by the
bootstrap script with the environment below. The agent starts the job's
command as a child process and talks to it over loopback HTTP; the training
script never sees this: it uses ``gpuscout.workload``.

Steps are counted as *completed* steps: progress ``step = s`` means s steps
are done, a checkpoint at step s holds the state after s steps, and a job
restored from it runs step s+1 first. Timestamps are Unix seconds (float).

Control plane -> agent (``http://<instance address>``; calls that change
state need ``Authorization: Bearer <GPUSCOUT_AGENT_TOKEN>`` when a token is
set):

GET  /agent/health
     -> {"instance_id", "job_id", "state", "step", "total_steps", "loss",
         "last_checkpoint_step", "last_checkpoint_key", "first_step",
         "first_step_at", "last_step_at", "exit_code", "error",
         "interruption_notice", "awaiting_secrets", "setup_s", "failed_phase",
         "restore_waiting", "checkpoint_mode", "skipped_checkpoints"}
     ``state`` is one of AgentState. ``first_step``/``first_step_at`` are the
     first step this instance completed and when; ``last_step_at`` when the
     latest step completed. ``awaiting_secrets``: the agent waits for
     POST /agent/secrets before it prepares the job; ``setup_s``: how long
     the job's setup ran on this instance (None until it ends);
     ``failed_phase``: "setup" or "command" when the job's own work failed;
     ``restore_waiting``: a replacement's workload has started and asks for
     its restore target (the replacement is ready: its start-up, imports
     and data loading are behind it, and a move pauses the old instance
     only now); ``checkpoint_mode``: "library" (the command calls
     /workload/*), "dir" (it keeps the GPUSCOUT_CHECKPOINT_DIR convention:
     the agent cannot see its steps, so ``step`` is its last save's, and on
     a replacement ``first_step`` is the restored step + 1 and
     ``first_step_at`` the time the command started on it), or null while
     unknown.
POST /agent/secrets {"secrets": {NAME: VALUE}}
     -> 200; the job's secret variables, for its setup and command. They
     never travel in user-data (the boot script names them only, in
     GPUSCOUT_SECRET_NAMES) and are masked in the job's log.
POST /agent/checkpoint {"pause": bool, "timeout_s": float}
     -> 200 {"step", "key", "last_step_at"} once the workload has saved a
     verified checkpoint at its next step boundary; with ``pause`` the
     workload then waits before running another step. 504 on timeout,
     409 if the workload is not running.
POST /agent/resume  -> 200; a paused workload goes on training.
POST /agent/restore {"step": int | null}
     -> 202; a standby workload restores the checkpoint of that step (or the
     latest verified one) and starts training. The caller polls health until
     ``state == "running"`` and ``step > restored step``.
POST /agent/stop    -> 202; the workload is stopped (SIGTERM, then SIGKILL).
Any other path is forwarded to the workload's own HTTP server (its /status,
/predict, ...), so the job's endpoint is served through the agent.

Agent -> workload: environment of the job's command:
    GPUSCOUT_AGENT_URL          http://127.0.0.1:<agent port>
    GPUSCOUT_WORKLOAD_PORT      a free loopback port for the workload's server
    GPUSCOUT_STORE_URL          object store (file://... or s3://...)
    GPUSCOUT_JOB_ID, GPUSCOUT_INSTANCE_ID, GPUSCOUT_OFFER_ID
    GPUSCOUT_CHECKPOINT_PREFIX  jobs/<job id>/checkpoints
    GPUSCOUT_ARTIFACTS_PREFIX   jobs/<job id>/artifacts
    GPUSCOUT_CHECKPOINT_DIR     a local folder: the files of the checkpoint to
                                resume from; a script that does not import
                                gpuscout saves there, then writes STEP, and
                                saves and exits 0 on SIGUSR1 (agent/ckptdir.py)

Workload -> agent (loopback, no token):
GET  /workload/restore-target -> {"step": int | null}; blocks while the
     agent is in standby (a replacement waiting for /agent/restore).
POST /workload/progress {"step", "loss", "total_steps", "time"}
     -> {"action": "continue" | "checkpoint"}; "checkpoint" asks the
     workload to save now, at this step boundary.
POST /workload/checkpointed {"step", "key", "periodic"}
     -> {"action": "continue" | "pause"}; ``periodic`` (default false): a
     checkpoint the workload uploaded in the background while it trained on
     (its own ``checkpoint_every``); the agent records it as the last
     checkpoint (never an older step over a newer one) but it answers no
     /agent/checkpoint request, which needs every step completed when the
     request was made. A checkpoint the agent asked for is saved and
     reported before the workload runs another step (``periodic`` false).
POST /workload/skipped {"checkpoints": [{"key", "reason"}]} -> 200; a restore
     skipped these checkpoints as corrupt or partial (health's
     ``skipped_checkpoints``; the control plane names each in the job's events).
GET  /workload/wait-resume -> 200 when the agent resumes a paused workload
     (blocks; the workload polls it again on timeout).
"""

from __future__ import annotations

import enum
import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

AGENT_PREFIX = "/agent"
WORKLOAD_PREFIX = "/workload"


class AgentState(enum.StrEnum):
    # Preparing the job: waiting for its secrets, unpacking its workdir,
    # running its setup. Then STANDBY (a replacement) or STARTING.
    SETUP = "setup"
    STARTING = "starting"  # agent up, workload process not yet reporting
    STANDBY = "standby"  # replacement: workload waits for /agent/restore
    RESTORING = "restoring"  # restore released, first step not done yet
    RUNNING = "running"  # steps are being completed
    PAUSED = "paused"  # checkpointed and waiting (old side of a move)
    COMPLETED = "completed"  # command exited 0
    FAILED = "failed"  # command exited non-zero or could not start


class ProgressAction(enum.StrEnum):
    CONTINUE = "continue"
    CHECKPOINT = "checkpoint"
    PAUSE = "pause"


# --- the wire messages, each declared once ------------------------------------
# The agent validates what it receives with them and builds what it sends;
# the control plane's client and the workload library do the same on their
# side, and the agents fake answers the controllers in them.


class Message(BaseModel):
    """A wire message: immutable; fields a newer peer adds are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a diverged loss travels as unknown."""
    return None if value is None or not math.isfinite(value) else value


class SkippedCheckpoint(Message):
    """A checkpoint a restore skipped as corrupt or partial."""

    key: str = Field(min_length=1, max_length=1024)
    reason: str = Field(max_length=2000)


class Health(Message):
    """GET /agent/health (the fields are described at the top of this module)."""

    state: AgentState
    instance_id: str | None = None
    job_id: str | None = None
    step: int | None = None  # None until the first progress report
    total_steps: int | None = None
    loss: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_key: str | None = None
    first_step: int | None = None
    first_step_at: float | None = None  # Unix seconds
    last_step_at: float | None = None  # Unix seconds
    exit_code: int | None = None
    error: str | None = None
    interruption_notice: str | None = None  # the notice as instance metadata gave it
    awaiting_secrets: bool = False
    setup_s: float | None = None
    failed_phase: str | None = None  # "setup" | "command": the job's own failure
    restore_waiting: bool = False
    checkpoint_mode: str | None = None  # "library" | "dir" | None (unknown yet)
    skipped_checkpoints: tuple[SkippedCheckpoint, ...] = ()

    _finite_loss = field_validator("loss")(_finite_or_none)

    @property
    def steps_done(self) -> int:
        """Completed steps (0 before the first report)."""
        return self.step or 0


class CheckpointRequest(Message):
    """POST /agent/checkpoint."""

    pause: bool = False
    timeout_s: float = Field(default=120.0, gt=0, le=3600)


class CheckpointResult(Message):
    """The 200 answer of POST /agent/checkpoint: a verified checkpoint."""

    step: int
    key: str
    last_step_at: float | None = None  # Unix seconds


class RestoreRequest(Message):
    """POST /agent/restore (step None: the latest verified checkpoint)."""

    step: int | None = Field(default=None, ge=0)


class SecretsRequest(Message):
    """POST /agent/secrets."""

    secrets: dict[str, str]


class RestoreTarget(Message):
    """The 200 answer of GET /workload/restore-target."""

    step: int | None = None


class ProgressReport(Message):
    """POST /workload/progress."""

    step: int = Field(ge=0)
    loss: float | None = None
    total_steps: int | None = Field(default=None, ge=0)
    time: float | None = None  # Unix seconds the step completed

    _finite_loss = field_validator("loss")(_finite_or_none)


class CheckpointedReport(Message):
    """POST /workload/checkpointed. ``periodic``: uploaded in the background
    while training went on; recorded, but it answers no checkpoint request."""

    step: int = Field(ge=0)
    key: str = Field(min_length=1)
    periodic: bool = False


class SkippedReport(Message):
    """POST /workload/skipped."""

    checkpoints: list[SkippedCheckpoint] = Field(max_length=100)


class ActionAnswer(Message):
    """The answer of POST /workload/progress and /workload/checkpointed."""

    action: ProgressAction


# Environment the bootstrap script gives the agent.
ENV_INSTANCE_ID = "GPUSCOUT_INSTANCE_ID"
ENV_JOB_ID = "GPUSCOUT_JOB_ID"
ENV_AGENT_HOST = "GPUSCOUT_AGENT_HOST"
ENV_AGENT_PORT = "GPUSCOUT_AGENT_PORT"
ENV_AGENT_TOKEN = "GPUSCOUT_AGENT_TOKEN"
ENV_STORE_URL = "GPUSCOUT_STORE_URL"
ENV_COMMAND = "GPUSCOUT_JOB_COMMAND"
ENV_STANDBY = "GPUSCOUT_STANDBY"
ENV_WORKDIR = "GPUSCOUT_WORKDIR"
ENV_CONTROL_URL = "GPUSCOUT_CONTROL_URL"
ENV_OFFER_ID = "GPUSCOUT_OFFER_ID"  # the offer the instance was launched on
ENV_INSTANCE_DIR = "GPUSCOUT_INSTANCE_DIR"  # the instance's folder (logs, the job's env)
ENV_WORKDIR_REF = "GPUSCOUT_WORKDIR_REF"  # "sha256:<hex>" of the packed workdir
ENV_SETUP = "GPUSCOUT_SETUP"  # the job's setup command
ENV_SECRET_NAMES = "GPUSCOUT_SECRET_NAMES"  # comma-separated; values come later
# Seconds without a call from the command before it is taken to keep the
# GPUSCOUT_CHECKPOINT_DIR convention (agent/core.py's PLAIN_MODE_AFTER_S).
ENV_PLAIN_MODE_AFTER_S = "GPUSCOUT_PLAIN_MODE_AFTER_S"
# Environment the agent gives the workload.
ENV_AGENT_URL = "GPUSCOUT_AGENT_URL"
ENV_WORKLOAD_PORT = "GPUSCOUT_WORKLOAD_PORT"
ENV_CHECKPOINT_PREFIX = "GPUSCOUT_CHECKPOINT_PREFIX"
ENV_ARTIFACTS_PREFIX = "GPUSCOUT_ARTIFACTS_PREFIX"
# A local folder holding the checkpoint to resume from, where a script that
# does not import gpuscout saves (gpuscout.agent.ckptdir).
ENV_CHECKPOINT_DIR = "GPUSCOUT_CHECKPOINT_DIR"


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def checkpoint_mode_key(job_id: str) -> str:
    """Where the agent records how the job checkpoints (gpuscout.agent.ckptdir)."""
    return f"jobs/{job_id}/checkpoint-mode"


def artifacts_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/artifacts"


def logs_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/logs"
