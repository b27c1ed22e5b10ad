"""EC2 instances as GPU Scout sees them: tags, states, spot notices, user-data.

- Ownership is by tags: ``gpuscout:cluster``, ``gpuscout:job``,
  ``gpuscout:instance`` and ``gpuscout:offer`` on the instance, its volumes
  and its spot request (``tag_specs``); instances are found by tag
  (``describe``).
- An instance that is shutting down or terminated no longer bills: it is
  gone (``GONE_STATES``). A spot instance being reclaimed says so in its
  spot request's status or its state reason (``spot_notices``).
- The user-data is the one bootstrap script (providers/bootstrap.sh); it must
  fit EC2's 16 KB and carry no AWS secret (``check_user_data``): the
  instance reads the store with its instance profile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any

from gpuscout.agent.imds import ENV_IMDS_ENDPOINT
from gpuscout.config import AwsSettings
from gpuscout.domain import Capacity
from gpuscout.providers.aws.ec2 import Ec2, Ec2Error
from gpuscout.providers.aws.resources import TAG_CLUSTER
from gpuscout.providers.base import LaunchError, LaunchRequest, ProviderState
from gpuscout.providers.bootstrap import MAX_USER_DATA_BYTES, render_bootstrap

log = logging.getLogger("gpuscout.providers.aws")

TAG_JOB = "gpuscout:job"
TAG_INSTANCE = "gpuscout:instance"
TAG_OFFER = "gpuscout:offer"

# Where the agent's spot watcher reads the instance metadata (agent/imds.py).
IMDS_ENDPOINT = "http://169.254.169.254"

# Spot request status codes that mean "this instance is being reclaimed".
INTERRUPTION_STATUS_CODES = frozenset({
    "marked-for-termination", "marked-for-stop", "marked-for-hibernation",
    "instance-terminated-by-price", "instance-terminated-no-capacity",
    "instance-terminated-capacity-oversubscribed", "instance-terminated-launch-group-constraint",
})
INTERRUPTION_STATE_REASONS = frozenset({
    "Server.SpotInstanceTermination", "Server.SpotInstanceShutdown",
})
GONE_STATES = frozenset({"shutting-down", "terminated"})
LIVE_STATES = ("pending", "running", "stopping", "stopped")


def tags_of(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def state_of(raw: dict[str, Any]) -> ProviderState:
    return {"pending": ProviderState.PENDING, "running": ProviderState.RUNNING}.get(
        raw["State"]["Name"], ProviderState.TERMINATED)


def is_gone(raw: dict[str, Any]) -> bool:
    return raw["State"]["Name"] in GONE_STATES


def describe(ec2: Ec2, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every instance matching ``filters``, across all pages."""
    return [raw for reservation in ec2.pages("describe_instances", "Reservations",
                                             Filters=filters)
            for raw in reservation["Instances"]]


def spot_notices(ec2: Ec2, raws: Iterable[dict[str, Any]]) -> set[str]:
    """EC2 ids whose spot request says the instance is being reclaimed."""
    requests = {r["SpotInstanceRequestId"]: r["InstanceId"] for r in raws
                if r.get("SpotInstanceRequestId") and not is_gone(r)}
    if not requests:
        return set()
    try:
        answer = ec2.call("describe_spot_instance_requests",
                          SpotInstanceRequestIds=sorted(requests))
    except Ec2Error as err:
        log.warning("cannot read spot request status: %s", err)
        return set()
    return {requests[r["SpotInstanceRequestId"]]
            for r in answer.get("SpotInstanceRequests", [])
            if r.get("Status", {}).get("Code") in INTERRUPTION_STATUS_CODES
            and r["SpotInstanceRequestId"] in requests}


def is_reclaimed(raw: dict[str, Any], notices: Iterable[str]) -> bool:
    """Whether EC2 is taking this spot instance back."""
    reason = raw.get("StateReason", {}).get("Code", "")
    return raw["InstanceId"] in notices or reason in INTERRUPTION_STATE_REASONS


def tag_specs(config: AwsSettings, request: LaunchRequest) -> list[dict[str, Any]]:
    """The tags of the instance, its volumes and its spot request."""
    tags = [
        {"Key": TAG_CLUSTER, "Value": config.cluster},
        {"Key": TAG_JOB, "Value": request.job_id},
        {"Key": TAG_INSTANCE, "Value": request.instance_id},
        {"Key": TAG_OFFER, "Value": request.offer.id},
        {"Key": "Name", "Value": f"gpuscout-{request.instance_id}"},
    ]
    kinds = ["instance", "volume"]
    if request.offer.capacity == Capacity.SPOT:
        kinds.append("spot-instances-request")
    return [{"ResourceType": kind, "Tags": tags} for kind in kinds]


def render_user_data(request: LaunchRequest, *, region: str, agent_port: int,
                     package_spec: str | None, presigned: bool,
                     secrets: tuple[list[str], list[str]]) -> str:
    """The bootstrap script ``request``'s instance boots with.

    The agent listens on all interfaces at ``agent_port`` (the security
    group decides who reaches it). ``presigned``: ``package_spec`` is a URL
    this process signed, which may carry a session token (alone it signs
    nothing). ``secrets``: (secret access keys, session tokens) the script
    must not hold. Raises LaunchError for a script over EC2's 16 KB or one
    holding a secret.
    """
    env = {**request.env, ENV_IMDS_ENDPOINT: IMDS_ENDPOINT, "AWS_DEFAULT_REGION": region}
    prepared = dataclasses.replace(request, env=env)
    try:
        script = render_bootstrap(prepared, agent_host="0.0.0.0",  # noqa: S104
                                  agent_port=agent_port, package_spec=package_spec)
    except ValueError as err:
        raise LaunchError(f"cannot build the user-data of {request.instance_id}: {err}") \
            from err
    secret_keys, tokens = secrets
    if package_spec and presigned:
        # Made with temporary credentials, our presigned URL carries their
        # session token, by design; it can never carry a secret key. The
        # rest of the script may hold neither.
        check_user_data(package_spec, secret_keys)
        check_user_data(script.replace(package_spec, ""), secret_keys + tokens)
    else:
        check_user_data(script, secret_keys + tokens)
    return script


def check_user_data(script: str, secrets: Iterable[str] = ()) -> None:
    """Refuse user-data EC2 would refuse (over 16 KB) or that names an AWS
    secret: user-data is readable by anyone who may describe the instance
    and by every process on it."""
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise LaunchError(f"user-data is {size} bytes, over EC2's {MAX_USER_DATA_BYTES}")
    lowered = script.lower()
    if "aws_secret_access_key" in lowered or "aws_session_token" in lowered:
        raise LaunchError("user-data must not carry AWS credentials; use an instance profile")
    if any(s and s in script for s in secrets):
        raise LaunchError("user-data must not carry AWS credentials; use an instance profile")


def secrets_of(client: Any) -> tuple[list[str], list[str]]:
    """(secret access keys, session tokens) this process could leak: its
    environment's and those ``client`` signs with."""
    keys = [v for v in (os.environ.get("AWS_SECRET_ACCESS_KEY"),) if v]
    tokens = [v for v in (os.environ.get("AWS_SESSION_TOKEN"),) if v]
    creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        keys += [frozen.secret_key] if frozen.secret_key else []
        tokens += [frozen.token] if frozen.token else []
    return keys, tokens


__all__ = [
    "GONE_STATES", "IMDS_ENDPOINT", "INTERRUPTION_STATE_REASONS", "INTERRUPTION_STATUS_CODES",
    "LIVE_STATES", "TAG_INSTANCE", "TAG_JOB", "TAG_OFFER", "check_user_data", "describe",
    "is_gone", "is_reclaimed", "render_user_data", "secrets_of", "spot_notices", "state_of",
    "tag_specs", "tags_of",
]
