"""Health and metrics, at the root (where probes and Prometheus look)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

import gpuscout
from gpuscout.api.deps import Reader, ServiceDep
from gpuscout.api.errors import answers
from gpuscout.api.schemas import Health

router = APIRouter(tags=["system"])


def health(service: ServiceDep) -> Health | JSONResponse:
    try:
        with service.repo.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as err:
        return JSONResponse({"detail": f"database unreachable: {type(err).__name__}"},
                            status_code=503)
    settings = service.settings
    return Health(
        status="ok", version=gpuscout.__version__, market=service.plane.feed.name,
        manual_market=service.plane.feed.manual, provider=service.ctx.provider.name,
        scout_interval_s=service.plane.intervals.scout_s,
        savings_threshold=settings.savings_threshold,
    )


# Open to everyone (load balancers probe it); it reveals no job data.
router.add_api_route("/healthz", health, methods=["GET"], response_model=Health,
                     summary="Liveness and readiness: 200 when the database answers, else 503",
                     responses=answers({503: "the database does not answer"}))


@router.get("/metrics", dependencies=[Reader], response_class=Response,
            summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
def metrics(service: ServiceDep) -> Response:
    service.plane.refresh_gauges()
    return Response(service.ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
