"""``/api/v1/instances``: the machines started for jobs, live and past."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gpuscout.api.deps import Reader, ServiceDep
from gpuscout.api.schemas import InstancePublic, InstancesPublic

router = APIRouter(prefix="/instances", tags=["instances"], dependencies=[Reader])


@router.get("", summary="Instances, oldest first")
def list_instances(
    service: ServiceDep,
    job_id: str | None = None,
    live: Annotated[bool, Query(description="only those not terminated or failed")] = False,
) -> InstancesPublic:
    instances = service.repo.list_instances(job_id=job_id, live_only=live)
    return InstancesPublic(data=[InstancePublic.from_domain(i) for i in instances],
                           count=len(instances))
