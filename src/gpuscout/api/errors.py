"""Domain errors become HTTP answers here, and only here (the edge).

Contract: every 4xx is JSON ``{"detail": ...}``. Validation errors (422)
carry a list of ``{"loc", "field", "msg", "type"}`` where ``field`` is the
dotted name inside the body or query (``resources.gpus``), so a client can
name the problem without knowing where FastAPI put it. An unexpected error
is a 500 with a one-line JSON detail; the traceback goes to the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gpuscout.controllers.plane import Conflict, InvalidRequest
from gpuscout.db import ConcurrentChange, NotFound
from gpuscout.domain import IllegalTransition

log = logging.getLogger("gpuscout.api")

# Where FastAPI says the value came from; not part of the field's name.
_SOURCES = ("body", "query", "path", "header", "cookie")


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "resources", "gpus")`` -> ``"resources.gpus"``;
    ``("query", "status", 0)`` -> ``"status"`` (a repeated query parameter)."""
    parts = list(loc)
    source = parts.pop(0) if parts and parts[0] in _SOURCES else None
    if source == "query":
        while parts and isinstance(parts[-1], int):
            parts.pop()
    return ".".join(str(p) for p in parts) or str(source or "body")


def _error(e: Any) -> dict[str, Any]:
    loc = list(e.get("loc", ()))
    kind = e.get("type", "value_error")
    # pydantic prefixes messages of our own validators with "Value error, ".
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":  # loc holds a character offset, not a field
        where = loc[1] if len(loc) > 1 else "?"
        return {"loc": ["body"], "field": "body",
                "msg": f"the body is not valid JSON (at character {where})", "type": kind}
    return {"loc": loc, "field": field_name(loc), "msg": msg, "type": kind}


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    return [_error(e) for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(err.errors())}, status_code=422)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, err: InvalidRequest) -> JSONResponse:
        detail = [{"loc": [err.field], "field": err.field, "msg": err.message,
                   "type": "invalid_request"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, err: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    # Conflict covers ManualMarketOnly. A lost compare-and-set or an illegal
    # transition means the job changed under the request: also a conflict.
    @app.exception_handler(Conflict)
    @app.exception_handler(ConcurrentChange)
    @app.exception_handler(IllegalTransition)
    async def _conflict(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=409)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error: {type(err).__name__} (see the server log)"},
            status_code=500)
