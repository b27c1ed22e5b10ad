"""A thin client of the REST API (httpx), for the CLI.

Contract: every method returns the decoded JSON of a 2xx answer or raises
``ApiError`` with a one-line message that names the problem (the field of a
422, the reason of a 409, the URL that could not be reached); callers never
see an httpx exception.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gpuscout.config import default_home

DEFAULT_URL = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"


class ApiError(Exception):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def home_dir() -> Path:
    value = os.environ.get("GPUSCOUT_HOME", "").strip()
    return Path(value).expanduser() if value else default_home()


def resolve_token(explicit: str | None) -> str | None:
    """--token, else $GPUSCOUT_API_TOKEN, else $GPUSCOUT_HOME/api_token
    (written by `gpuscout up`), else None."""
    if explicit:
        return explicit
    env = os.environ.get("GPUSCOUT_API_TOKEN", "").strip()
    if env:
        return env
    path = home_dir() / "api_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def describe_error(response: httpx.Response) -> str:
    """One line from an error answer: ``{"detail": str}`` or a list of
    validation errors (``field``/``loc`` and ``msg``)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list) and detail:
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            field = item.get("field")
            if field is None:
                loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
                field = ".".join(loc)
            parts.append(f"{field}: {item.get('msg', 'invalid')}" if field
                         else str(item.get("msg", "invalid")))
        text = "; ".join(parts)
    elif detail:
        text = str(detail)
    else:
        text = response.text.strip().splitlines()[0] if response.text.strip() else ""
    return f"{response.status_code} {response.reason_phrase}: {text}".rstrip(": ")


class ApiClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, raw: bool = False,
                content: Any = None, content_type: str | None = None,
                timeout_s: float | None = None) -> Any:
        headers = self._headers()
        if content_type:
            headers["Content-Type"] = content_type
        try:
            response = self._http.request(
                method, path, json=json, params=params, headers=headers, content=content,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.ConnectError:
            raise ApiError(f"cannot reach the GPU Scout API at {self.url}: "
                           "is `gpuscout up` running?") from None
        except httpx.TimeoutException:
            raise ApiError(f"the GPU Scout API at {self.url} did not answer in time") from None
        except httpx.HTTPError as err:
            raise ApiError(f"request to {self.url} failed: {err}") from None
        if response.status_code == 401:
            hint = ("pass --token or set GPUSCOUT_API_TOKEN (`gpuscout up` writes the token "
                    "to $GPUSCOUT_HOME/api_token)")
            raise ApiError(f"{describe_error(response)}; {hint}", 401)
        if response.is_error:
            raise ApiError(describe_error(response), response.status_code)
        if raw:
            return response.content
        return response.json()

    # --- jobs ----------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"{API_PREFIX}/jobs", json=body)

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        return self.request("GET", f"{API_PREFIX}/jobs", params=params)["data"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"{API_PREFIX}/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"{API_PREFIX}/jobs/{job_id}")

    def migrations(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"{API_PREFIX}/jobs/{job_id}/migrations")["data"]

    def events(self, job_id: str, limit: int = 20) -> list[dict[str, Any]]:
        return self.request("GET", f"{API_PREFIX}/jobs/{job_id}/events",
                            params={"limit": limit})["data"]

    def decisions(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"{API_PREFIX}/jobs/{job_id}/decisions")["data"]

    def migrate(self, job_id: str, offer_id: str | None = None, *,
                confirm_dearer: bool = False) -> dict[str, Any]:
        body: dict[str, Any] | None = None
        if offer_id:
            body = {"offer_id": offer_id, "confirm_dearer": confirm_dearer}
        return self.request("POST", f"{API_PREFIX}/jobs/{job_id}/migrate", json=body)

    # --- market and instances ------------------------------------------------------

    def offers(self, *, available: bool | None = None) -> list[dict[str, Any]]:
        params = {"available": str(available).lower()} if available is not None else None
        return self.request("GET", f"{API_PREFIX}/offers", params=params)["data"]

    def update_offer(self, offer_id: str, *, price_per_hour: float | None = None,
                     available: bool | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if price_per_hour is not None:
            body["price_per_hour"] = price_per_hour
        if available is not None:
            body["available"] = available
        return self.request("PATCH", f"{API_PREFIX}/offers/{offer_id}", json=body)

    def instances(self, job_id: str | None = None) -> list[dict[str, Any]]:
        params = {"job_id": job_id} if job_id else None
        return self.request("GET", f"{API_PREFIX}/instances", params=params)["data"]

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    # --- workdirs and logs ---------------------------------------------------------

    def upload_workdir(self, path: Path, ref: str) -> bool:
        """Upload the packed folder at ``path`` (whose digest is ``ref``)
        unless the control plane has it already; True if it was sent."""
        try:
            self.request("GET", f"{API_PREFIX}/workdirs/{ref}")
            return False
        except ApiError as err:
            if err.status_code != 404:
                raise
        with path.open("rb") as f:
            answer = self.request("POST", f"{API_PREFIX}/workdirs", content=f,
                                  content_type="application/gzip", timeout_s=600.0)
        if answer.get("ref") != ref:
            raise ApiError(f"the control plane stored the workdir as {answer.get('ref')}, "
                           f"not {ref}: it changed in transit")
        return True

    def logs(self, job_id: str, tail: int | None = None) -> str:
        params = {"tail": tail} if tail is not None else None
        data: bytes = self.request("GET", f"{API_PREFIX}/jobs/{job_id}/logs", params=params,
                                   raw=True)
        return data.decode("utf-8", errors="replace")

    def follow_logs(self, job_id: str, tail: int | None = None) -> Iterator[str]:
        """The job's log lines as they come, until the job ends."""
        params: dict[str, Any] = {"follow": "true"}
        if tail is not None:
            params["tail"] = tail
        try:
            with self._http.stream("GET", f"{API_PREFIX}/jobs/{job_id}/logs", params=params,
                                   headers=self._headers(),
                                   timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.is_error:
                    response.read()
                    raise ApiError(describe_error(response), response.status_code)
                yield from response.iter_lines()
        except httpx.ConnectError:
            raise ApiError(f"cannot reach the GPU Scout API at {self.url}: "
                           "is `gpuscout up` running?") from None
        except httpx.HTTPError as err:
            raise ApiError(f"reading the log from {self.url} failed: {err}") from None
