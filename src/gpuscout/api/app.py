"""The one ASGI app of a control plane.

Paths:
- ``/api/v1/...``: the REST API (routes/);
- ``/endpoints/{job_id}/...``: the user proxy (routing.proxy);
- ``/healthz``, ``/metrics``: probes and Prometheus;
- ``/openapi.json``, ``/docs``: the API's description;
- ``/``: the dashboard (static files), mounted last so it never shadows the rest.

``create_app`` starts nothing: the control plane loops are started by
``server.run_server`` (or a test), so an app can be served over a plane that
a test drives by hand.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import gpuscout
from gpuscout.api.errors import answers, install_error_handlers
from gpuscout.api.openapi import install_openapi
from gpuscout.api.routes import api_router, system
from gpuscout.api.schemas import Health
from gpuscout.dashboard import STATIC_DIR
from gpuscout.db import NotFound
from gpuscout.routing.proxy import proxy_router
from gpuscout.service import Service

API_PREFIX = "/api/v1"


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="GPU Scout",
        version=gpuscout.__version__,
        summary="Keeps ML training jobs on the cheapest GPU capacity that is really "
                "available, and moves them live without losing work.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    install_error_handlers(app)

    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(system.router)
    # The same health answer under the API prefix, for clients that only
    # know the API's base URL (the CLI checks it after `up`).
    app.add_api_route(f"{API_PREFIX}/healthz", system.health, methods=["GET"],
                      response_model=Health, include_in_schema=False)

    def job_exists(job_id: str) -> bool:
        try:
            service.repo.get_job(job_id)
        except NotFound:
            return False
        return True

    # The proxy answers what the job's own service answers (any status), and
    # these when it cannot reach it; it asks no token of its callers.
    app.include_router(proxy_router(service.plane.ctx.router, job_exists), responses={
        200: {"description": "the job's own service's answer, forwarded as it is"},
        "default": {"description": "the job's own service's answer, forwarded as it is"},
        **answers({
            400: "the request cannot be forwarded as it is",
            404: "no job with this id",
            502: "the job's instance is unreachable",
            503: "the job has no running instance right now (Retry-After: 2)",
            504: "the job's instance did not answer in time",
        }),
    })
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
    install_openapi(app)
    return app
