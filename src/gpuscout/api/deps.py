"""Dependencies of the routes: the service, and who may call what.

Access contract:
- every call that changes state (POST, PATCH, DELETE) needs the bearer
  token (``service.token``); without it: 401 with ``WWW-Authenticate: Bearer``;
- reads are open to clients on the loopback interface (the default bind is
  127.0.0.1, where the dashboard and the CLI run) and need the token from
  anywhere else, so binding to 0.0.0.0 does not publish the jobs' commands.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpuscout.controllers.plane import ControlPlane
from gpuscout.service import Service

_bearer = HTTPBearer(
    auto_error=False, scheme_name="HTTPBearer",
    description="the token in $GPUSCOUT_HOME/api_token: needed by every call that changes "
                "state, and by reads from outside the loopback interface")
# The same token, as require_token asks it: a scheme of its own only so that
# the OpenAPI FastAPI generates tells the operations that need it apart from
# those that read it when given (api/openapi.py states the first "the token",
# the others "none, or the token", and folds this scheme into the first).
_bearer_required = HTTPBearer(auto_error=False, scheme_name="HTTPBearerRequired")


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_plane(service: ServiceDep) -> ControlPlane:
    return service.plane


PlaneDep = Annotated[ControlPlane, Depends(get_plane)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
RequiredCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_required)]


def _token_ok(service: Service, credentials: HTTPAuthorizationCredentials | None) -> bool:
    return credentials is not None and secrets.compare_digest(
        credentials.credentials.encode(), service.token.encode())


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message,
                         headers={"WWW-Authenticate": "Bearer"})


def require_token(service: ServiceDep, credentials: RequiredCredentials) -> None:
    """For calls that change state."""
    if credentials is None:
        raise _unauthorized("this call changes state and needs the API token: "
                            "send 'Authorization: Bearer <token>'")
    if not _token_ok(service, credentials):
        raise _unauthorized("the API token is wrong")


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "testclient":  # Starlette's TestClient, in process
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # 127.0.0.1 seen through a dual-stack socket
    return address.is_loopback


def require_read_access(request: Request, service: ServiceDep, credentials: Credentials) -> None:
    """For reads: open on loopback, the token otherwise."""
    if is_loopback(request.client.host if request.client else None):
        return
    if not _token_ok(service, credentials):
        raise _unauthorized("reads from outside this machine need the API token")


Writer = Depends(require_token)
Reader = Depends(require_read_access)
