"""EC2 calls: botocore retries and pages them, this module names their errors.

- The client retries in botocore's ``standard`` mode: throttling, transient
  server errors (5xx) and connection failures, with jittered exponential
  backoff, up to ``max_attempts`` attempts per call in all
  (``retry_config``).
- Lists are read through botocore's paginators (``Ec2.pages``).
- What is left after botocore's retries becomes a ProviderError: a refusal
  is an ``Ec2Error`` (with its ``code``), throttling that outlasted the
  retries a ``ThrottledError``, a connection failure a plain ProviderError.

botocore is imported when a client is made or a call fails, not with this
module: a control plane without the ``aws`` extra never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gpuscout.aws_errors import error_code, error_message
from gpuscout.providers.base import ProviderError

if TYPE_CHECKING:
    from gpuscout.config import AwsSettings

# Error codes a caller branches on (EC2 API reference, "Error codes").
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded",
    "VcpuLimitExceeded", "Unsupported",
})
# The account's limits among them (EC2 API reference, "Error codes"; "Amazon
# EC2 service quotas"): the job's events say so, not "no capacity".
QUOTA_CODES = frozenset({"MaxSpotInstanceCountExceeded", "InstanceLimitExceeded",
                         "VcpuLimitExceeded"})
# Throttling that botocore retried until ``max_attempts`` (all of them are
# in its standard mode's throttling codes).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "TooManyRequestsException", "RequestThrottledException",
})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


class ThrottledError(ProviderError):
    """AWS kept refusing calls for their rate; safe to retry later."""

    retryable = True

    def __init__(self, operation: str, attempts: int, code: str) -> None:
        super().__init__(f"{operation} throttled ({code}) after {attempts} attempts")
        self.operation = operation
        self.attempts = attempts
        self.code = code


class Ec2Error(ProviderError):
    """EC2 refused a call; ``code`` is its error code."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}: {message}")
        self.code = code
        self.message = message


def retry_config(config: AwsSettings) -> Any:
    """botocore's standard retry mode, ``max_attempts`` attempts per call."""
    from botocore.config import Config  # type: ignore[import-untyped]

    return Config(retries={"mode": "standard", "total_max_attempts": config.max_attempts})


def ec2_client(config: AwsSettings, *, session: Any = None, **kwargs: Any) -> Any:
    """An EC2 client of ``config``'s region with its retries; ``session``
    (default: a new boto3 session) gives credentials; ``kwargs`` go to
    ``session.client`` (``endpoint_url``...). The endpoint otherwise comes
    from boto3's standard configuration (``AWS_ENDPOINT_URL``)."""
    import boto3  # type: ignore[import-untyped]

    session = session or boto3.session.Session()
    return session.client("ec2", region_name=config.region, config=retry_config(config),
                          **kwargs)


class Ec2:
    """An EC2 client whose errors are ProviderErrors (see the module's doc)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def call(self, operation: str, **params: Any) -> Any:
        """One EC2 call (retried by botocore)."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            return getattr(self.client, operation)(**params)
        except (BotoCoreError, ClientError) as err:
            raise _translated(operation, err) from err

    def pages(self, operation: str, key: str, **params: Any) -> Iterator[Any]:
        """Every item of ``key`` on every page of ``operation`` (each page's
        call retried by botocore)."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            for page in self.client.get_paginator(operation).paginate(**params):
                yield from page.get(key, [])
        except (BotoCoreError, ClientError) as err:
            raise _translated(operation, err) from err


def _translated(operation: str, err: Exception) -> ProviderError:
    """The ProviderError for an error botocore raised after its retries."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):  # a BotoCoreError: connection, credentials, parameters
        return ProviderError(f"{operation} failed: {err}")
    code = error_code(err)
    if code in THROTTLING_CODES:
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        return ThrottledError(operation, int(retries) + 1, code)
    return Ec2Error(operation, code, error_message(err))


__all__ = [
    "CAPACITY_CODES", "NOT_FOUND_CODES", "QUOTA_CODES", "THROTTLING_CODES", "Ec2", "Ec2Error",
    "ThrottledError", "ec2_client", "retry_config",
]
