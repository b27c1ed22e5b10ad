"""Relaying one HTTP request to an upstream server and streaming its answer
back: the one reverse-proxy step both proxies take, the user proxy
(``routing/proxy.py``: a job's endpoint to its current instance) and the
agent (``agent/server.py``: the instance to the workload's own server).

Hop-by-hop headers (RFC 9110, 7.6.1) describe one connection and are not
relayed either way; ``Content-Length`` is dropped from requests (the body
may be re-framed) and kept on answers, whose raw bytes are relayed as they
came. Each caller says what an upstream failure answers (its status and
words differ: a job's instance unreachable, a workload not up yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import httpx
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

# RFC 9110, 7.6.1 (and "trailers", a common misspelling of the TE token).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host",
})

RawHeaders = list[tuple[bytes, bytes]]


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """A request's end-to-end headers, without its Content-Length."""
    return [(k, v) for k, v in raw
            if (name := k.decode("latin-1").lower()) not in HOP_BY_HOP
            and name != "content-length"]


def answer_headers(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """An answer's end-to-end headers (its Content-Length kept)."""
    return [(k, v) for k, v in raw if k.decode("latin-1").lower() not in HOP_BY_HOP]


async def relay(client: httpx.AsyncClient, upstream: httpx.Request, *,
                on_error: Callable[[httpx.HTTPError], Response],
                extra_headers: Sequence[tuple[bytes, bytes]] = (),
                release: Callable[[], None] | None = None) -> Response:
    """Send ``upstream`` and stream its answer back, with ``extra_headers``.

    An httpx error is answered by ``on_error``. ``release`` runs once the
    answer has been streamed out, or at once if there is none (the user
    proxy's route lease: a move waits for it), whatever happens.
    """
    try:
        answer = await client.send(upstream, stream=True)
    except httpx.HTTPError as err:
        if release is not None:
            release()
        return on_error(err)
    except BaseException:
        if release is not None:
            release()
        raise

    async def close() -> None:
        try:
            await answer.aclose()
        finally:
            if release is not None:
                release()

    response = StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                 background=BackgroundTask(close))
    response.raw_headers = answer_headers(answer.headers.raw) + list(extra_headers)
    return response
