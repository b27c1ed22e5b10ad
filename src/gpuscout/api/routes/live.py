"""What the dashboard reads beyond the resources: the live stream of
changes, the sign-in check, a job's history for its charts, its artifacts,
the targets a manual move could take (with what each saves), and an
offer's price history.

``GET /stream`` is server-sent events (``text/event-stream``), one
``LiveFeed`` per app (api/live.py). Its access rule is the API's rule for
reads (open on the loopback interface, the token from anywhere else), but a
browser's EventSource cannot send an Authorization header, so this one
endpoint also takes the token from the ``gpuscout_token`` cookie (what the
dashboard sets, scoped to this path: cookies stay out of access logs) or the
``token`` query parameter.

Messages: ``hello`` first (``{"last_event_id"}``: load the lists now; every
change after it comes on the stream), then batches: ``jobs``,
``migrations``, ``events`` (SSE id: the last event's id), ``offers``,
``decisions``, ``samples`` (history points), each a JSON list. A page that
reconnects sends ``Last-Event-ID`` (EventSource does) and first gets the
events it missed. ``retry`` is 1 s, so a page reconnects a second after a
control plane restart.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Header, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from gpuscout.agent.protocol import artifacts_prefix
from gpuscout.api.deps import Credentials, Reader, ServiceDep, is_loopback
from gpuscout.api.errors import answers
from gpuscout.api.live import LiveFeed, Message
from gpuscout.api.schemas import OfferPublic
from gpuscout.domain import JobStatus
from gpuscout.policy import JobView, offers_for, weigh_move
from gpuscout.service import Service

router = APIRouter(tags=["dashboard"])

RETRY_MS = 1000
PING_S = 15
NO_JOB = {404: "no job with this id"}


_feed_lock = threading.Lock()


def live_feed(request: Request, service: Service) -> LiveFeed:
    """The app's one feed (made at its first use, from any thread)."""
    with _feed_lock:
        feed: LiveFeed | None = getattr(request.app.state, "live_feed", None)
        if feed is None:
            feed = request.app.state.live_feed = LiveFeed(service)
        return feed


def _token_ok(service: Service, token: str | None) -> bool:
    return token is not None and secrets.compare_digest(token.encode(), service.token.encode())


def _sse(message: Message) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(message.data, separators=(",", ":")),
                           event=message.event, id=message.id)


@router.get(
    "/stream", summary="Server-sent events: what changes, as it changes (the dashboard)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}},
               **answers({401: "off the loopback interface without the token"})})
async def stream(
    request: Request, service: ServiceDep, credentials: Credentials,
    token: Annotated[str | None, Query(description="the API token, for clients that cannot "
                                                   "send an Authorization header")] = None,
    last_event_id: Annotated[str | None, Header(description="the last event id seen; the "
                                                            "events after it come first")] = None,
    gpuscout_token: Annotated[str | None, Cookie(description="the API token, as the "
                                                             "dashboard sends it")] = None,
) -> EventSourceResponse:
    host = request.client.host if request.client else None
    given = next((t for t in (token, gpuscout_token,
                              credentials.credentials if credentials else None)
                  if t is not None), None)
    if not is_loopback(host) and not _token_ok(service, given):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail="reads from outside this machine need the API token "
                                   "(for this stream: ?token=...)",
                            headers={"WWW-Authenticate": "Bearer"})
    feed = live_feed(request, service)
    queue = await feed.subscribe()
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else None

    async def messages() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(data=json.dumps({"last_event_id": feed.last_event_id}),
                                  event="hello", retry=RETRY_MS)
            if after is not None and after < feed.last_event_id:
                missed = await run_in_threadpool(feed.events_after, after)
                missed = [e for e in missed if e["id"] <= feed.last_event_id]
                if missed:
                    yield _sse(Message("events", missed, id=str(missed[-1]["id"])))
            while True:
                message = await queue.get()
                if message is None:
                    return  # dropped for falling behind: the page reconnects
                yield _sse(message)
        finally:
            feed.unsubscribe(queue)

    return EventSourceResponse(messages(), ping=PING_S, send_timeout=30,
                               headers={"Cache-Control": "no-store"})


class SessionPublic(BaseModel):
    token: str = Field(description='"valid", or "none" when no token was sent')
    reads_need_token: bool = Field(description="true off the loopback interface")
    writes_need_token: bool = True


@router.get("/session", summary="Check the API token (the dashboard's sign-in)",
            responses=answers({401: "the token sent is wrong"}))
def session(request: Request, service: ServiceDep, credentials: Credentials) -> SessionPublic:
    host = request.client.host if request.client else None
    if credentials is not None and not _token_ok(service, credentials.credentials):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="the API token is wrong",
                            headers={"WWW-Authenticate": "Bearer"})
    return SessionPublic(token="valid" if credentials is not None else "none",
                         reads_need_token=not is_loopback(host))


class HistoryPoint(BaseModel):
    t: float = Field(description="epoch seconds")
    step: int
    loss: float | None
    cost_usd: float
    cost_per_work_hour: float | None = Field(description="of the job's offer")
    best_cost_per_work_hour: float | None = Field(
        description="of the cheapest available offer that fits the job")
    best_offer_id: str | None


class HistoryPublic(BaseModel):
    data: list[HistoryPoint]
    count: int


@router.get("/jobs/{job_id}/history", dependencies=[Reader],
            summary="The job's progress, cost and prices over its run: the points the "
                    "control plane recorded (each move of its offer or prices, else every "
                    "30 s), then the finer ones seen since by an open dashboard",
            responses=answers(NO_JOB))
def job_history(job_id: str, request: Request, service: ServiceDep) -> HistoryPublic:
    recorded = [HistoryPoint(t=p.time.timestamp(), step=p.step, loss=p.loss,
                             cost_usd=p.cost_usd, cost_per_work_hour=p.cost_per_work_hour,
                             best_cost_per_work_hour=p.best_cost_per_work_hour,
                             best_offer_id=p.best_offer_id)
                for p in service.plane.history(job_id)]
    since = recorded[-1].t if recorded else 0.0
    seen = [HistoryPoint(**p) for p in live_feed(request, service).history(job_id)
            if p["t"] > since]
    points = recorded + seen
    return HistoryPublic(data=points, count=len(points))


class ArtifactPublic(BaseModel):
    name: str
    url: str


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


@router.get("/jobs/{job_id}/artifacts", dependencies=[Reader],
            summary="The files the job stored (download each from its url)",
            responses=answers(NO_JOB))
def list_artifacts(job_id: str, service: ServiceDep) -> ArtifactsPublic:
    service.repo.get_job(job_id)
    prefix = artifacts_prefix(job_id) + "/"
    names = [key[len(prefix):] for key in service.ctx.store.list(prefix)]
    data = [ArtifactPublic(name=n, url=f"/api/v1/jobs/{job_id}/artifacts/{n}")
            for n in names if n and "/" not in n and not n.startswith(".")]
    return ArtifactsPublic(data=data, count=len(data))


class TargetPublic(BaseModel):
    offer: OfferPublic
    savings: float = Field(description="fraction of the current cost per work hour "
                                       "(negative: dearer)")
    net_saving_usd: float = Field(
        description="what moving saves over the rest of the job, the move's own cost "
                    "included (negative: what it costs more)")
    move_cost_usd: float
    budget_ok: bool
    deadline_ok: bool


class TargetsPublic(BaseModel):
    current: OfferPublic | None
    data: list[TargetPublic]
    count: int
    reason: str | None = Field(None, description="why there is no target, if none")


@router.get("/jobs/{job_id}/targets", dependencies=[Reader],
            summary="Where a manual move could take the job, and what each target would "
                    "save or cost (POST /jobs/{id}/migrate to go)",
            responses=answers(NO_JOB))
def move_targets(job_id: str, service: ServiceDep) -> TargetsPublic:
    job = service.repo.get_job(job_id)
    plane = service.plane
    if job.status != JobStatus.RUNNING:
        return TargetsPublic(current=None, data=[], count=0,
                             reason=f"the job is {job.status.value}; only a running job moves")
    every = plane.ctx.offers()
    offers = offers_for(job.spec.resources, plane.ctx.scope_offers(job.id, every))
    current = next((o for o in offers if o.id == job.offer_id), None)
    if current is None:
        return TargetsPublic(current=None, data=[], count=0,
                             reason="the job's offer is not on the market any more")
    now = plane.ctx.clock.now()
    running_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
    out = []
    for o in offers.available().compatible(job.spec.resources).excluding({current.id}):
        w = weigh_move(job, current, o, now, view=JobView(running_s=running_s),
                       costs=plane.costs, policy=plane.policy)
        out.append(TargetPublic(offer=OfferPublic.from_domain(o), savings=w.savings,
                                net_saving_usd=w.net, move_cost_usd=w.cost_usd,
                                budget_ok=w.budget_ok, deadline_ok=w.deadline_ok))
    out.sort(key=lambda t: (-t.net_saving_usd, t.offer.id))
    return TargetsPublic(current=OfferPublic.from_domain(current), data=out, count=len(out),
                         reason=None if out else "no other available offer fits the job")


class PricePoint(BaseModel):
    t: datetime
    price_per_hour: float
    available: bool


class PriceHistoryPublic(BaseModel):
    offer: OfferPublic
    data: list[PricePoint] = Field(description="one point per change (a value holds until "
                                               "the next), the last day")
    count: int


@router.get("/offers/{offer_id}/history", dependencies=[Reader],
            summary="An offer's price and availability as the control plane saw them",
            responses=answers({404: "no offer with this id"}))
def offer_history(offer_id: str, service: ServiceDep) -> PriceHistoryPublic:
    offers = {o.id: o for o in service.plane.ctx.offers()}  # also records the latest
    if offer_id not in offers:
        service.repo.get_offer(offer_id)  # 404
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"offer {offer_id} not found")
    points: list[Any] = service.ctx.capacity_history.points(offer_id)
    data = [PricePoint(t=datetime.fromtimestamp(t, UTC), price_per_hour=p, available=a)
            for t, p, a in points]
    return PriceHistoryPublic(offer=OfferPublic.from_domain(offers[offer_id]), data=data,
                              count=len(data))
