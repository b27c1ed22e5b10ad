"""The API's OpenAPI description, completed with who may call each operation.

FastAPI states the bearer token as required wherever a route depends on a
bearer scheme, which is true of writes only: reads are open on loopback
(api/deps.py). ``require_token`` reads the token through a scheme of its
own, so the description FastAPI generates tells the operations apart; here
each operation's ``security`` is then stated in full, with its 401:

- ``require_token`` (``Writer``): ``[{"HTTPBearer": []}]``;
- the token read only when given (``Reader``: ``require_read_access``; the
  dashboard's session check): ``[{}, {"HTTPBearer": []}]``, none or the
  token (for reads: none on loopback, the token from anywhere else);
- no token at all (``/healthz``, the user proxy): ``[]``, open to everyone.

And error answers are JSON: FastAPI files a route's ``responses`` under the
route's own media type (``text/plain`` for the logs), not the error body's.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

BEARER = "HTTPBearer"  # deps._bearer
REQUIRED = "HTTPBearerRequired"  # deps._bearer_required, folded into BEARER

_UNAUTHORIZED = {
    REQUIRED: "the bearer token is missing or wrong (this call changes state)",
    BEARER: "the bearer token is wrong, or missing on a call from outside the loopback "
            "interface",
}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def state_access(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite, in place, each operation's ``security`` as above and add its
    401 (body ``ErrorPublic``, header ``WWW-Authenticate: Bearer``)."""
    for path in schema.get("paths", {}).values():
        for method, operation in path.items():
            if method not in _METHODS:
                continue
            schemes = {name for requirement in operation.get("security", [])
                       for name in requirement}
            if REQUIRED in schemes:
                operation["security"] = [{BEARER: []}]
                why = _UNAUTHORIZED[REQUIRED]
            elif BEARER in schemes:
                operation["security"] = [{}, {BEARER: []}]
                why = _UNAUTHORIZED[BEARER]
            else:
                operation["security"] = []
                continue
            operation["responses"]["401"] = {
                # a route's own words on when it answers 401 come first
                "description": operation["responses"].get("401", {}).get("description", why),
                "headers": {"WWW-Authenticate": {
                    "description": '"Bearer"', "schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ErrorPublic"}}},
            }
    schemes = schema.get("components", {}).get("securitySchemes", {})
    schemes.pop(REQUIRED, None)
    return schema


def errors_in_json(schema: dict[str, Any]) -> dict[str, Any]:
    """Refile, in place, each 4xx/5xx body filed under another media type
    than ``application/json``."""
    for path in schema.get("paths", {}).values():
        for method, operation in path.items():
            if method not in _METHODS:
                continue
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[0] in "45" and content and "application/json" not in content:
                    response["content"] = {"application/json": next(iter(content.values()))}
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve FastAPI's description completed as above (built once, then
    kept, as FastAPI does)."""
    generate = app.openapi  # FastAPI's, which keeps what it built in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # (the app's calls all run on its event loop)
            app.openapi_schema = errors_in_json(state_access(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
