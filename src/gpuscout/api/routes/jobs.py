"""``/api/v1/jobs``: submit, read, cancel, move, and what happened to a job."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gpuscout.api.deps import PlaneDep, Reader, ServiceDep, Writer
from gpuscout.api.errors import UNREADABLE_BODY, answers
from gpuscout.api.schemas import (
    DecisionPublic,
    DecisionsPublic,
    EventPublic,
    EventsPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    MigrateRequest,
    MigrationPublic,
    MigrationsPublic,
)
from gpuscout.controllers.plane import InvalidRequest
from gpuscout.domain import JobStatus, MigrationStatus
from gpuscout.joblog import LogFollower
from gpuscout.store import check_key

# How often a followed log is read again from the store (logs are shipped
# every 2 s by the agents, so a line shows about 1-3 s after it is printed).
FOLLOW_POLL_S = 1.0
# How long a follow stream waits, once its job has ended, for a move the end
# cut short to be rolled back (the migrator notices within seconds), so the
# stream's last marker says how the move ended rather than "moving".
FOLLOW_SETTLE_S = 15.0

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Reader])

NO_JOB = {404: "no job with this id"}
# A file the job stored at the top of its artifacts: what plane.artifact and
# the store's keys accept (no "/", no leading ".", no backslash or NUL).
ARTIFACT_NAME = r"^[^./\\\u0000][^/\\\u0000]*$"


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Writer],
             summary="Submit a job", responses=answers({400: UNREADABLE_BODY}))
def submit_job(
    body: Annotated[JobCreate, Body(openapi_examples={
        "gpu": {"summary": "a training job on one GPU",
                "value": {"name": "digits", "command": "python train.py",
                          "resources": {"gpus": 1}, "expected_duration_hours": 2}},
        "cpu": {"summary": "a CPU job with a budget",
                "value": {"name": "etl", "command": "python etl.py", "budget_usd": 5}},
    })],
    plane: PlaneDep,
) -> JobPublic:
    return JobPublic.from_domain(plane.submit(body.to_spec(), body.secrets))


@router.get("", summary="List jobs, oldest first")
def list_jobs(
    service: ServiceDep,
    status_: Annotated[list[JobStatus] | None,
                       Query(alias="status", description="repeat to give several")] = None,
) -> JobsPublic:
    jobs = service.repo.list_jobs(status_)
    return JobsPublic(data=[JobPublic.from_domain(j) for j in jobs], count=len(jobs))


@router.get("/{job_id}", summary="One job", responses=answers(NO_JOB))
def get_job(job_id: str, service: ServiceDep) -> JobPublic:
    return JobPublic.from_domain(service.repo.get_job(job_id))


@router.delete("/{job_id}", dependencies=[Writer],
               summary="Cancel a job (409 if it already finished)",
               responses=answers({**NO_JOB, 409: "the job has already finished, or changed "
                                                 "under this call"}))
def cancel_job(job_id: str, plane: PlaneDep) -> JobPublic:
    return JobPublic.from_domain(plane.cancel(job_id))


@router.get("/{job_id}/migrations", summary="The job's moves, oldest first",
            responses=answers(NO_JOB))
def list_migrations(job_id: str, service: ServiceDep) -> MigrationsPublic:
    service.repo.get_job(job_id)  # 404 for an unknown job, not an empty list
    migrations = service.repo.list_migrations(job_id=job_id)
    return MigrationsPublic(data=[MigrationPublic.from_domain(m) for m in migrations],
                            count=len(migrations))


@router.get("/{job_id}/events", summary="The job's latest events, oldest first",
            responses=answers(NO_JOB))
def list_events(
    job_id: str, service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> EventsPublic:
    service.repo.get_job(job_id)
    events = service.repo.list_events(job_id, limit=limit)
    return EventsPublic(data=[EventPublic.from_domain(e) for e in events], count=len(events))


@router.post("/{job_id}/migrate", status_code=status.HTTP_202_ACCEPTED, dependencies=[Writer],
             summary="Move a running job now (to offer_id, or to the best other offer)",
             responses=answers({
                 400: UNREADABLE_BODY, **NO_JOB,
                 409: "the job is not running or is moving already; no other offer saves; "
                      "offer_id is dearer without confirm_dearer, or would break the budget"}))
def migrate_job(
    job_id: str, plane: PlaneDep,
    body: Annotated[MigrateRequest | None, Body()] = None,
) -> MigrationPublic:
    # 202: the move has begun (persisted) and runs in the background; poll
    # GET /jobs/{id}/migrations for its phases.
    migration = plane.migrate(job_id, body.offer_id if body else None,
                              confirm_dearer=body.confirm_dearer if body else False)
    return MigrationPublic.from_domain(migration)


@router.get("/{job_id}/decisions",
            summary="The scout's latest decision for the job, with its reason and numbers",
            responses=answers(NO_JOB))
def list_decisions(job_id: str, service: ServiceDep) -> DecisionsPublic:
    service.repo.get_job(job_id)
    # The scout keeps only its latest decision per job, in memory: empty
    # until the job has been scouted since this control plane started.
    decision = service.plane.decisions.get(job_id)
    data = [DecisionPublic.from_domain(decision)] if decision is not None else []
    return DecisionsPublic(data=data, count=len(data))


@router.get("/{job_id}/artifacts/{name}", summary="A file the job stored, e.g. model.json",
            response_class=Response,
            responses={200: {"content": {"*/*": {"schema": {"type": "string",
                                                             "format": "binary"}}},
                             "description": "the file, its type guessed from its name"},
                       **answers({404: "no job with this id, or no such file"})})
def get_artifact(
    job_id: str, plane: PlaneDep,
    name: Annotated[str, Path(json_schema_extra={"pattern": ARTIFACT_NAME})],
) -> Response:
    try:
        check_key(name)  # what no store can hold (a backslash, a NUL) is no file's name
    except ValueError:
        raise InvalidRequest("name", f"bad artifact name {name!r}") from None
    content = plane.artifact(job_id, name)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(content, media_type=media_type)


@router.get("/{job_id}/logs", summary="The job's setup and command output, across its moves",
            response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}}, **answers(NO_JOB)})
def get_logs(
    job_id: str, plane: PlaneDep,
    tail: Annotated[int | None, Query(ge=0, description="only the last N lines")] = None,
    follow: Annotated[bool, Query(description="keep the answer open and stream new lines "
                                              "until the job ends and its moves settle")] = False,
) -> Response:
    """One continuous log: each line "<UTC time> <text>", and a marker line
    ("-- moved from i-a to i-b at step N --") where the job was placed,
    moved or recovered. With ``follow`` the answer streams."""
    if not follow:
        lines = plane.job_log(job_id, tail=tail)
        return PlainTextResponse("".join(f"{line}\n" for line in lines))
    segments = plane.log_segments(job_id)  # 404 for an unknown job, before streaming
    follower = LogFollower(plane.ctx.store, job_id, tail=tail)

    ended_at: float | None = None

    def settled() -> bool:
        """The job has ended and no move of it is in flight (or has not
        settled within FOLLOW_SETTLE_S of the end)."""
        nonlocal ended_at
        if not plane.ctx.repo.get_job(job_id).status.is_terminal():
            return False
        now = asyncio.get_running_loop().time()
        ended_at = ended_at if ended_at is not None else now
        return now - ended_at >= FOLLOW_SETTLE_S or not plane.ctx.repo.list_migrations(
            job_id=job_id, status=MigrationStatus.IN_PROGRESS)

    async def stream() -> AsyncIterator[str]:
        nonlocal segments
        while True:
            done = settled()
            lines = await run_in_threadpool(follower.poll, segments)
            for line in lines:
                yield f"{line}\n"
            if done:
                return  # the job had ended (its moves settled) before this last read
            await asyncio.sleep(FOLLOW_POLL_S)
            segments = await run_in_threadpool(plane.log_segments, job_id)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")
