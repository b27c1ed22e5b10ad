"""One router per resource; ``api_router`` gathers those under /api/v1."""

from fastapi import APIRouter

from gpuscout.api.routes import instances, jobs, offers, system, workdirs

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(offers.router)
api_router.include_router(instances.router)
api_router.include_router(workdirs.router)

__all__ = ["api_router", "instances", "jobs", "offers", "system", "workdirs"]
