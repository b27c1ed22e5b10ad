"""``/api/v1/instances``: the machines started for jobs, live and past."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from gpuscout.api.deps import PlaneDep, Reader, ServiceDep, Writer
from gpuscout.api.errors import answers
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


@router.post("/{instance_id}/interrupt", status_code=status.HTTP_202_ACCEPTED,
             dependencies=[Writer],
             summary="Deliver a spot interruption notice (409 if the provider cannot)",
             responses=answers({404: "no instance with this id",
                                409: "the instance is not live, or its provider cannot "
                                     "deliver a notice"}))
def interrupt_instance(instance_id: str, plane: PlaneDep) -> InstancePublic:
    # 202: the notice is delivered; the control plane answers it on its next
    # pass (checkpoint, then a move out of the zone): follow the job's
    # migrations and events.
    return InstancePublic.from_domain(plane.interrupt(instance_id))
