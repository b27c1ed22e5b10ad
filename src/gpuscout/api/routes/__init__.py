"""One router per resource; ``api_router`` gathers those under /api/v1."""

from fastapi import APIRouter

from gpuscout.api.errors import answers
from gpuscout.api.routes import instances, jobs, live, offers, system, workdirs

# Every operation under /api/v1 takes a parameter or a body, and so can
# refuse one (the statuses of its own are on each route).
api_router = APIRouter(responses=answers({
    422: "a parameter or the body is refused; each problem names its field"}))
api_router.include_router(jobs.router)
api_router.include_router(offers.router)
api_router.include_router(instances.router)
api_router.include_router(workdirs.router)
api_router.include_router(live.router)  # the dashboard's stream and reads

__all__ = ["api_router", "instances", "jobs", "offers", "system", "workdirs"]
