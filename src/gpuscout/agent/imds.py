"""Spot interruption notices from the EC2 instance metadata service (IMDSv2).

AWS announces a spot reclaim about two minutes ahead at
``/latest/meta-data/spot/instance-action`` (404 until then; then JSON
``{"action": "terminate" | "stop" | "hibernate", "time": "<ISO 8601>"}``).
IMDSv2 needs a session token first: ``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds``, then every read carries
``X-aws-ec2-metadata-token`` (the AWS provider launches instances with
``HttpTokens=required``, so IMDSv1 reads are refused).

``watch_spot_interruption`` polls every 5 s and calls ``on_notice`` once
when a notice appears; the agent records it (health's
``interruption_notice``) and starts an emergency checkpoint. The watcher runs
only where the AWS provider's user-data sets ``GPUSCOUT_IMDS_ENDPOINT``
(``imds_endpoint_from_env``); elsewhere (the local provider) it is not started.
A metadata service that cannot be reached is retried on the next poll: a
notice missed is worse than a log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx

log = logging.getLogger("gpuscout.agent.imds")

ENV_IMDS_ENDPOINT = "GPUSCOUT_IMDS_ENDPOINT"  # set by the AWS provider's user-data
POLL_INTERVAL_S = 5.0
TOKEN_TTL_S = 21600  # the longest IMDSv2 allows (6 h)
TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_TIMEOUT = httpx.Timeout(2.0)


@dataclass(frozen=True, slots=True)
class SpotNotice:
    action: str  # terminate | stop | hibernate
    time: str  # when AWS will act, ISO 8601 UTC

    def describe(self) -> str:
        return f"spot {self.action} at {self.time}"


def imds_endpoint_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The metadata endpoint to watch, or None where there is none."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_IMDS_ENDPOINT, "").strip()
    return value.rstrip("/") or None


class ImdsClient:
    """IMDSv2 reads with a cached session token (renewed before it expires,
    and once more if the service says the token is no longer valid)."""

    def __init__(self, endpoint: str, *, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=_TIMEOUT)
        self._owns_client = client is None
        self._clock = clock
        self._token: str | None = None
        self._token_until = 0.0

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _session_token(self, *, renew: bool = False) -> str:
        if renew or self._token is None or self._clock() >= self._token_until:
            response = await self._client.put(
                self.endpoint + TOKEN_PATH,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            response.raise_for_status()
            self._token = response.text.strip()
            self._token_until = self._clock() + TOKEN_TTL_S - 60
        return self._token

    async def spot_notice(self) -> SpotNotice | None:
        """The pending spot interruption notice, or None (404: none yet).

        Raises httpx.HTTPError when the service cannot be read.
        """
        for attempt in (1, 2):
            token = await self._session_token(renew=attempt == 2)
            response = await self._client.get(self.endpoint + INSTANCE_ACTION_PATH,
                                              headers={"X-aws-ec2-metadata-token": token})
            if response.status_code == 401 and attempt == 1:
                continue  # token expired or revoked: get a new one, once
            if response.status_code == 404:
                return None
            response.raise_for_status()
            data = response.json()
            return SpotNotice(action=str(data.get("action", "terminate")),
                              time=str(data.get("time", "")))
        return None


async def watch_spot_interruption(
    endpoint: str,
    on_notice: Callable[[SpotNotice], Awaitable[None]],
    *,
    interval_s: float = POLL_INTERVAL_S,
    client: httpx.AsyncClient | None = None,
) -> SpotNotice:
    """Poll until a notice appears, call ``on_notice`` once, and return it.

    Runs until cancelled (the agent cancels it on shutdown). Errors reading
    the service are logged and retried at the next poll.
    """
    imds = ImdsClient(endpoint, client=client)
    failures = 0
    try:
        while True:
            try:
                notice = await imds.spot_notice()
                failures = 0
            except (httpx.HTTPError, ValueError) as err:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("cannot read the instance metadata at %s (%d): %s",
                                endpoint, failures, err)
                notice = None
            if notice is not None:
                log.warning("spot interruption notice: %s", notice.describe())
                await on_notice(notice)
                return notice
            await asyncio.sleep(interval_s)
    finally:
        await imds.close()


__all__ = [
    "ENV_IMDS_ENDPOINT", "ImdsClient", "SpotNotice", "imds_endpoint_from_env",
    "watch_spot_interruption",
]
