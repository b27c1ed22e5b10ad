"""The user proxy: ``/endpoints/{job_id}/...`` forwarded to the job's current
instance, streaming both ways, with timeouts.

A request resolves the route once, holds a lease on that address until its
response has been streamed out, and so completes on the instance it started
on even if the route is switched meanwhile (the old instance is terminated
only after its leases drain). A job with no route answers 503 with a JSON
error, an unknown job 404, a request that cannot be forwarded 400: a missing
value is an answer, never a crash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gpuscout.routing.forward import relay, request_headers
from gpuscout.routing.router import NoRoute, Router

# Left as they are in the forwarded path: what RFC 3986 allows in one
# (unreserved, sub-delims, ":", "@", "/"). The path arrives decoded, so a
# "%" in it is a percent sign, escaped again as "%25".
PATH_SAFE = "/:@!$&'()*+,;=-._~"

def proxy_router(
    router: Router, job_exists: Callable[[str], bool], *,
    connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
) -> APIRouter:
    api = APIRouter(tags=["endpoints"])
    timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
    client_holder: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        # Created lazily inside the server's event loop.
        if "c" not in client_holder:
            client_holder["c"] = httpx.AsyncClient(timeout=timeout)
        return client_holder["c"]

    async def forward(job_id: str, path: str, request: Request) -> Response:
        # A database read: off the event loop, so a slow disk never stalls
        # the requests other jobs have in flight.
        if not await run_in_threadpool(job_exists, job_id):
            return JSONResponse({"detail": f"job {job_id} not found"}, status_code=404)
        stack = ExitStack()
        try:
            address = stack.enter_context(router.lease(job_id))
        except NoRoute:
            return JSONResponse(
                {"detail": f"job {job_id} has no running instance to serve it right now"},
                status_code=503, headers={"Retry-After": "2"})
        # The path arrives percent-decoded: escaped again, a path with
        # spaces, control or non-ASCII characters is still a URL.
        url = f"http://{address}/{quote(path, safe=PATH_SAFE)}"
        if request.url.query:
            url += f"?{request.url.query}"

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                yield chunk

        try:
            upstream_request = client().build_request(
                request.method, url, headers=request_headers(request.headers.raw),
                content=body())
        except httpx.InvalidURL as err:  # a header value httpx refuses, say
            stack.close()
            return JSONResponse({"detail": f"cannot forward this request: {err}"},
                                status_code=400)

        def failed(err: httpx.HTTPError) -> Response:
            if isinstance(err, httpx.TimeoutException):
                return JSONResponse({"detail": f"instance of job {job_id} timed out"},
                                    status_code=504)
            return JSONResponse(
                {"detail": f"instance of job {job_id} is unreachable: {type(err).__name__}"},
                status_code=502)

        # The lease is released only when the answer is out: a move waits for it.
        return await relay(client(), upstream_request, on_error=failed,
                           extra_headers=[(b"x-gpuscout-instance", address.encode())],
                           release=stack.close)

    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        api.add_api_route(
            "/endpoints/{job_id}/{path:path}", forward, methods=[method],
            operation_id=f"forward_{method.lower()}", response_class=Response,
            summary=f"{method} on the job's current instance (the user proxy)")
    return api
