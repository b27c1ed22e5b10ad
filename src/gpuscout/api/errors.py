"""Domain errors become HTTP answers here, and only here (the edge).

Contract: every 4xx is JSON ``{"detail": ...}`` (``ErrorPublic``). Validation
errors (422, ``ValidationErrorPublic``) carry a list of ``{"loc", "field",
"msg", "type"}`` where ``field`` is the dotted name inside the body or query
(``resources.gpus``), so a client can name the problem without knowing where
FastAPI put it. An unexpected error is a 500 with a one-line JSON detail; the
traceback goes to the log only.

Each operation lists in the OpenAPI the error statuses it can answer, with
``answers``; tests/integration/test_api_contract.py holds the API to them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpuscout.api.schemas import ErrorPublic, ValidationErrorPublic
from gpuscout.controllers.plane import Conflict, InvalidRequest
from gpuscout.db import ConcurrentChange, NotFound
from gpuscout.domain import IllegalTransition

log = logging.getLogger("gpuscout.api")

# Where FastAPI says the value came from; not part of the field's name.
_SOURCES = ("body", "query", "path", "header", "cookie")


def answers(why: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each error status it can answer, and
    when, with its body's model."""
    return {code: {"model": ValidationErrorPublic if code == 422 else ErrorPublic,
                   "description": text}
            for code, text in why.items()}


# FastAPI answers 400 itself when a body is not even text (not UTF-8); JSON
# that does not parse is a 422 (json_invalid), like any other bad value.
UNREADABLE_BODY = "the body cannot be read (not UTF-8)"


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


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI documents for ``path``, as a 405's ``Allow``
    must list them (RFC 9110 15.5.6)."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    # A method an API path does not have falls through to the dashboard's
    # mount at "/" (which matches every path): a 404 for GET, a 405 with
    # "Allow: GET, HEAD" for others. It is a 405 listing the path's methods.
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code in (404, 405):
            allowed = allowed_methods(app, request.url.path)
            if allowed and request.method not in allowed:
                return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                                    headers={"Allow": ", ".join(allowed)})
        return await http_exception_handler(request, err)

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
