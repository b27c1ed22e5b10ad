"""``/api/v1/jobs``: submit, read, cancel, move, and what happened to a job."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status

from gpuscout.api.deps import PlaneDep, Reader, ServiceDep, Writer
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
from gpuscout.domain import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Reader])


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Writer],
             summary="Submit a job")
def submit_job(body: JobCreate, plane: PlaneDep) -> JobPublic:
    return JobPublic.from_domain(plane.submit(body.to_spec()))


@router.get("", summary="List jobs, oldest first")
def list_jobs(
    service: ServiceDep,
    status_: Annotated[list[JobStatus] | None,
                       Query(alias="status", description="repeat to give several")] = None,
) -> JobsPublic:
    jobs = service.repo.list_jobs(status_)
    return JobsPublic(data=[JobPublic.from_domain(j) for j in jobs], count=len(jobs))


@router.get("/{job_id}", summary="One job")
def get_job(job_id: str, service: ServiceDep) -> JobPublic:
    return JobPublic.from_domain(service.repo.get_job(job_id))


@router.delete("/{job_id}", dependencies=[Writer],
               summary="Cancel a job (409 if it already finished)")
def cancel_job(job_id: str, plane: PlaneDep) -> JobPublic:
    return JobPublic.from_domain(plane.cancel(job_id))


@router.get("/{job_id}/migrations", summary="The job's moves, oldest first")
def list_migrations(job_id: str, service: ServiceDep) -> MigrationsPublic:
    service.repo.get_job(job_id)  # 404 for an unknown job, not an empty list
    migrations = service.repo.list_migrations(job_id=job_id)
    return MigrationsPublic(data=[MigrationPublic.from_domain(m) for m in migrations],
                            count=len(migrations))


@router.get("/{job_id}/events", summary="The job's latest events, oldest first")
def list_events(
    job_id: str, service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> EventsPublic:
    service.repo.get_job(job_id)
    events = service.repo.list_events(job_id, limit=limit)
    return EventsPublic(data=[EventPublic.from_domain(e) for e in events], count=len(events))


@router.post("/{job_id}/migrate", status_code=status.HTTP_202_ACCEPTED, dependencies=[Writer],
             summary="Move a running job now (to offer_id, or to the best other offer)")
def migrate_job(
    job_id: str, plane: PlaneDep,
    body: Annotated[MigrateRequest | None, Body()] = None,
) -> MigrationPublic:
    # 202: the move has begun (persisted) and runs in the background; poll
    # GET /jobs/{id}/migrations for its phases.
    migration = plane.migrate(job_id, body.offer_id if body else None)
    return MigrationPublic.from_domain(migration)


@router.get("/{job_id}/decisions",
            summary="The scout's latest decision for the job, with its reason and numbers")
def list_decisions(job_id: str, service: ServiceDep) -> DecisionsPublic:
    service.repo.get_job(job_id)
    # The scout keeps only its latest decision per job, in memory: empty
    # until the job has been scouted since this control plane started.
    decision = service.plane.decisions.get(job_id)
    data = [DecisionPublic.from_domain(decision)] if decision is not None else []
    return DecisionsPublic(data=data, count=len(data))


@router.get("/{job_id}/artifacts/{name}", summary="A file the job stored, e.g. model.json",
            response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def get_artifact(job_id: str, name: str, plane: PlaneDep) -> Response:
    content = plane.artifact(job_id, name)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(content, media_type=media_type)
