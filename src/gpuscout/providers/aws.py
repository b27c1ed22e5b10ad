"""The AWS provider: instances are EC2 instances, launched with boto3.

The same contract as every Provider (see base.py), on EC2:
- ``offers`` builds spot and on-demand offers of the types in the on-demand
  table (market/aws_prices.py) from ``describe_instance_types`` (hardware),
  ``describe_instance_type_offerings`` (zones) and
  ``describe_spot_price_history`` (the latest price per type and zone), and
  caches them for ``offers_ttl_s``; a failed refresh keeps the last offers.
- ``launch`` calls ``run_instances`` once per GPU Scout instance id (the id is
  the ClientToken, so a retried call never starts a second machine), spot
  through ``InstanceMarketOptions``, IMDSv2 required, user-data = the one
  bootstrap script (providers/bootstrap.sh). The user-data carries no AWS
  secret: the instance reads the store with its instance profile, and its
  only secret is its own agent token. Capacity refusals raise CapacityError.
- Code travels through the object store: with an ``s3://`` job store and no
  ``package_spec``, the running gpuscout is uploaded there once as a wheel
  (providers/code_bundle.py) and the user-data names it by a presigned URL
  that expires after ``code_url_ttl_s``; an image that has gpuscout ignores it.
- Ownership is by tags: ``gpuscout:cluster``, ``gpuscout:job``,
  ``gpuscout:instance`` (and ``gpuscout:offer``) on the instance, its volumes
  and its spot request; ``get``/``list``/``terminate`` find instances by tag,
  so a restarted control plane (or the reaper) finds every one of them.
- ``terminate`` is idempotent; an instance that is shutting down or
  terminated no longer bills, so it counts as gone.
- With ``elastic_ip`` (an allocation id), ``on_route`` moves that address to
  the instance a job's route now points at, so clients that use it follow
  the job from instance to instance.
- Throttling is retried with jittered exponential backoff
  (``compute_backoff``), then raised as ``ThrottledError``.

The endpoint comes from boto3's standard configuration (``AWS_ENDPOINT_URL``
and friends), which is how the tests point it at moto's server.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuscout.agent.imds import ENV_IMDS_ENDPOINT
from gpuscout.domain import Capacity, Offer
from gpuscout.market.aws_prices import (
    AWS_PROVIDER,
    Hardware,
    OnDemandPrice,
    SpotQuote,
    build_offers,
    latest_spot_prices,
    load_ondemand_table,
)
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    ProviderError,
    ProviderInstance,
    ProviderState,
    QuotaError,
)
from gpuscout.providers.bootstrap import MAX_USER_DATA_BYTES, render_bootstrap
from gpuscout.providers.code_bundle import (
    DEFAULT_URL_TTL_S,
    CodeShipper,
    wheel_of_running_package,
)

if TYPE_CHECKING:
    from gpuscout.config import Settings

log = logging.getLogger("gpuscout.providers.aws")

TAG_CLUSTER = "gpuscout:cluster"
TAG_JOB = "gpuscout:job"
TAG_INSTANCE = "gpuscout:instance"
TAG_OFFER = "gpuscout:offer"

DEFAULT_AGENT_PORT = 8700
# AWS Deep Learning AMIs (GPU drivers, CUDA, Python) published by Amazon.
DEFAULT_AMI_NAME_PATTERN = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
DEFAULT_AMI_OWNERS = ("amazon",)
# Where the agent's spot watcher reads the instance metadata (agent/imds.py).
IMDS_ENDPOINT = "http://169.254.169.254"

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
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "TooManyRequestsException", "RequestThrottledException",
})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
# Spot request status codes that mean "this instance is being reclaimed".
INTERRUPTION_STATUS_CODES = frozenset({
    "marked-for-termination", "marked-for-stop", "marked-for-hibernation",
    "instance-terminated-by-price", "instance-terminated-no-capacity",
    "instance-terminated-capacity-oversubscribed", "instance-terminated-launch-group-constraint",
})
INTERRUPTION_STATE_REASONS = frozenset({
    "Server.SpotInstanceTermination", "Server.SpotInstanceShutdown",
})
_GONE_STATES = frozenset({"shutting-down", "terminated"})
_LIVE_STATES = ("pending", "running", "stopping", "stopped")


class ThrottledError(ProviderError):
    """AWS kept refusing calls for their rate; safe to retry later."""

    retryable = True

    def __init__(self, operation: str, attempts: int, code: str) -> None:
        super().__init__(f"{operation} throttled ({code}) after {attempts} attempts")
        self.operation = operation
        self.attempts = attempts
        self.code = code


def compute_backoff(
    attempt: int, *, factor: float = 0.2, jitter: bool = True, max_backoff: float = 20.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (1 = the first retry).

    Exponential, ``factor * 2**(attempt-1)`` capped at ``max_backoff``; with
    ``jitter`` a uniform draw from [0, that] ("full jitter"), so that many
    clients throttled together do not retry together. Deterministic when
    given a seeded ``rng``.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(max_backoff, factor * (2 ** (attempt - 1)))
    if not jitter:
        return ceiling
    return (rng or random).uniform(0.0, ceiling)


def error_code(err: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def newest_image(images: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The image with the latest CreationDate (ISO 8601 strings sort as dates)."""
    ranked = sorted(images, key=lambda i: (i.get("CreationDate") or "", i.get("ImageId", "")))
    return ranked[-1] if ranked else None


@dataclass(frozen=True, slots=True)
class AwsConfig:
    """What the provider needs besides credentials (GPUSCOUT_AWS_* settings)."""

    region: str = "us-east-1"
    cluster: str = "default"
    ami_id: str | None = None  # else the newest image matching the pattern
    ami_name_pattern: str = DEFAULT_AMI_NAME_PATTERN
    ami_owners: tuple[str, ...] = DEFAULT_AMI_OWNERS
    subnet_ids: tuple[str, ...] = ()  # empty: the default VPC; else offers only in their zones
    key_name: str | None = None  # created if missing, the private key saved in key_dir
    key_dir: Path | None = None
    instance_profile: str | None = None  # how the agent reads and writes the store
    security_group: str | None = None  # default: gpuscout-<cluster>, created if missing
    ingress_cidr: str | None = None  # who may reach the agent port; default: the group itself
    agent_port: int = DEFAULT_AGENT_PORT
    public_ip: bool = False  # address instances by public IP (control plane outside the VPC)
    # What bootstrap.sh pip-installs on an image without gpuscout (a wheel URL,
    # a pinned name on your index). None: with ship_code and an s3:// store,
    # the running gpuscout's wheel through a presigned URL; else the AMI
    # must have gpuscout.
    package_spec: str | None = None
    ship_code: bool = True
    code_url_ttl_s: float = DEFAULT_URL_TTL_S
    # An Elastic IP (allocation id, eipalloc-...) that follows the job's
    # route from instance to instance; None: only the proxy follows it.
    elastic_ip: str | None = None
    offers_ttl_s: float = 300.0
    max_attempts: int = 6  # per API call, throttling retries included
    backoff_factor_s: float = 0.2
    max_backoff_s: float = 20.0
    public_ip_wait_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> AwsConfig:
        subnets = tuple(s.strip() for s in (settings.aws_subnet_ids or "").split(",") if s.strip())
        return cls(
            region=settings.aws_region, cluster=settings.aws_cluster,
            ami_id=settings.aws_ami_id, ami_name_pattern=settings.aws_ami_name_pattern,
            subnet_ids=subnets, key_name=settings.aws_key_name,
            key_dir=Path(settings.home) / "aws", instance_profile=settings.aws_instance_profile,
            security_group=settings.aws_security_group, ingress_cidr=settings.aws_ingress_cidr,
            agent_port=settings.aws_agent_port, public_ip=settings.aws_public_ip,
            package_spec=settings.aws_package_spec, ship_code=settings.aws_ship_code,
            code_url_ttl_s=settings.aws_code_url_ttl_s, elastic_ip=settings.aws_elastic_ip,
            offers_ttl_s=settings.aws_offers_refresh_s,
        )


class AwsProvider:
    """EC2 behind the Provider protocol. Thread-safe.

    ``client``: an EC2 client to use instead of one made from ``session``
    (tests wrap one to inject faults); ``clock``/``sleep``/``rng``: time and
    randomness, handed in so that tests of the retry loop run instantly and
    repeat exactly; ``table``: on-demand prices (default: the packaged CSV).
    """

    name = AWS_PROVIDER

    def __init__(
        self,
        config: AwsConfig | None = None,
        *,
        client: Any = None,
        session: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        table: dict[tuple[str, str], OnDemandPrice] | None = None,
    ) -> None:
        self.config = config or AwsConfig()
        if client is None:
            import boto3  # type: ignore[import-untyped]  # lazily: only the aws provider needs it
            from botocore.config import Config  # type: ignore[import-untyped]

            session = session or boto3.session.Session()
            # botocore's own retries are off: throttling goes through
            # compute_backoff below, the same for every call.
            client = session.client(
                "ec2", region_name=self.config.region,
                config=Config(retries={"max_attempts": 1, "mode": "standard"}),
            )
        self.ec2 = client
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        all_prices = table if table is not None else load_ondemand_table()
        self.table = {t: p for (r, t), p in all_prices.items() if r == self.config.region}
        self._lock = threading.RLock()
        self._offers: builtins.list[Offer] | None = None
        self._offers_at = float("-inf")
        self._ami: str | None = self.config.ami_id
        self._group_id: str | None = None
        self._key_ready = False
        self._subnet_by_zone: dict[str, str] | None = None
        self._shippers: dict[str, CodeShipper] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> AwsProvider:
        return cls(AwsConfig.from_settings(settings))

    # --- Provider protocol -------------------------------------------------

    def offers(self) -> builtins.list[Offer]:
        """Offers, refreshed at most every ``offers_ttl_s``; on a failed
        refresh the previous offers are kept (logged), if there are any."""
        with self._lock:
            fresh = self.clock() - self._offers_at < self.config.offers_ttl_s
            if self._offers is not None and fresh:
                return builtins.list(self._offers)
            try:
                self._offers = self._fetch_offers()
            except ProviderError as err:
                if self._offers is None:
                    raise
                log.warning("offer refresh failed, keeping the previous offers: %s", err)
            self._offers_at = self.clock()
            return builtins.list(self._offers)

    def refresh_offers(self) -> builtins.list[Offer]:
        """Fetch offers now, whatever the cache's age."""
        with self._lock:
            self._offers_at = float("-inf")
        return self.offers()

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        """``run_instances`` for one offer; the instance is returned PENDING
        with its address (private IP, or public IP with ``public_ip``).

        Raises CapacityError when EC2 has no capacity (or quota) for the
        offer, ThrottledError when calls stay throttled, LaunchError for
        anything else EC2 refuses and for a user-data that would be too big
        or would hold an AWS secret.
        """
        offer = request.offer
        if not offer.available:
            raise CapacityError(offer.id, "offer is not available")
        if offer.provider != AWS_PROVIDER:
            raise LaunchError(f"offer {offer.id} is not an AWS offer")
        user_data = self.user_data(request)
        params: dict[str, Any] = {
            "ImageId": self._image_id(),
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": request.instance_id,  # at most one machine per GPU Scout id
            "UserData": user_data,
            "Placement": {"AvailabilityZone": offer.zone},
            "SecurityGroupIds": [self._security_group_id()],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            # A shutdown from inside the machine ends its billing too.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": self._tag_specs(request),
        }
        if self.config.subnet_ids:
            subnet = self._subnets().get(offer.zone)
            if subnet is None:  # an offer from before the subnets changed
                raise CapacityError(offer.id, f"no configured subnet in {offer.zone}")
            params["SubnetId"] = subnet
        if self.config.key_name:
            self._ensure_key_pair()
            params["KeyName"] = self.config.key_name
        if self.config.instance_profile:
            params["IamInstanceProfile"] = {"Name": self.config.instance_profile}
        if offer.capacity == Capacity.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                # No MaxPrice: capped at the on-demand price, AWS's default.
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"},
            }
        try:
            response = self._call("run_instances", **params)
        except _AwsClientError as err:
            if err.code in QUOTA_CODES:
                raise QuotaError(offer.id, f"{err.code}: {err.message}") from err
            if err.code in CAPACITY_CODES:
                raise CapacityError(offer.id, f"{err.code}: {err.message}") from err
            raise LaunchError(f"run_instances for {request.instance_id} on {offer.id} "
                              f"failed: {err.code}: {err.message}") from err
        raw = response["Instances"][0]
        if self.config.public_ip and not raw.get("PublicIpAddress"):
            raw = self._wait_public_ip(raw["InstanceId"]) or raw
        return self._view(raw)

    def get(self, instance_id: str) -> ProviderInstance:
        """The instance as EC2 reports it now, with a spot interruption
        notice when EC2 marked it for reclaim; InstanceNotFound if EC2 has
        no instance with this GPU Scout id (never launched, or long gone)."""
        found = self._describe([{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
        if not found:
            raise InstanceNotFound(instance_id)
        # A live one wins over a terminated one (ids are never reused, but be sure).
        raw = sorted(found, key=lambda i: (i["State"]["Name"] not in _GONE_STATES,
                                           str(i.get("LaunchTime", ""))))[-1]
        return self._view(raw, notices=self._spot_notices([raw]))

    def list(self) -> builtins.list[ProviderInstance]:
        """This cluster's instances that are not shutting down or terminated."""
        found = self._describe([
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.config.cluster]},
            {"Name": "instance-state-name", "Values": builtins.list(_LIVE_STATES)},
        ])
        notices = self._spot_notices(found)
        return [self._view(raw, notices=notices) for raw in found if _tags(raw).get(TAG_INSTANCE)]

    def terminate(self, instance_id: str) -> None:
        """Terminate every EC2 instance carrying this GPU Scout id.

        Idempotent: none found, already shutting down or terminated, or
        "not found" from EC2 all count as done. Once ``terminate_instances``
        answers, the instance is shutting down, which AWS no longer bills.
        """
        found = self._describe([{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
        ids = [i["InstanceId"] for i in found if i["State"]["Name"] not in _GONE_STATES]
        if not ids:
            return
        try:
            self._call("terminate_instances", InstanceIds=ids)
        except _AwsClientError as err:
            if err.code in NOT_FOUND_CODES:
                return
            raise ProviderError(f"terminate {instance_id} ({', '.join(ids)}) failed: "
                                f"{err.code}: {err.message}") from err

    def on_route(self, job_id: str, instance_id: str) -> str | None:
        """Associate the Elastic IP (``elastic_ip``) with the EC2 instance of
        ``instance_id``, the one the job's route now points at.

        One address follows one job: it is taken from no instance, from an
        instance of the same job (the old side of a move; AllowReassociation
        moves it in one call) or from an instance that is gone, but never
        from a live instance of another job or one GPU Scout does not own
        (logged, left where it is). Idempotent. Returns the agent's new
        address when the Elastic IP replaced the public IP the control
        plane reaches the instance by (``public_ip``), else None.
        """
        allocation = self.config.elastic_ip
        if not allocation:
            return None
        found = [raw for raw in self._describe([
            {"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]},
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.config.cluster]},
        ]) if raw["State"]["Name"] not in _GONE_STATES]
        if not found:
            raise InstanceNotFound(instance_id)
        target = found[0]
        try:
            (address,) = self._call("describe_addresses",
                                    AllocationIds=[allocation])["Addresses"]
        except _AwsClientError as err:
            raise ProviderError(f"cannot read Elastic IP {allocation}: {err}") from err
        holder = address.get("InstanceId")
        if holder and holder != target["InstanceId"]:
            owner = self._describe([{"Name": "instance-id", "Values": [holder]}])
            tags = _tags(owner[0]) if owner else {}
            live = bool(owner) and owner[0]["State"]["Name"] not in _GONE_STATES
            ours = tags.get(TAG_CLUSTER) == self.config.cluster
            if live and not (ours and tags.get(TAG_JOB) == job_id):
                log.warning("Elastic IP %s stays on %s (%s): it is not job %s's",
                            allocation, holder,
                            f"job {tags.get(TAG_JOB)}" if ours else "not a GPU Scout instance",
                            job_id)
                return None
        if holder != target["InstanceId"]:
            try:
                self._call("associate_address", AllocationId=allocation,
                           InstanceId=target["InstanceId"], AllowReassociation=True)
            except _AwsClientError as err:
                raise ProviderError(f"cannot associate Elastic IP {allocation} with "
                                    f"{target['InstanceId']}: {err}") from err
            log.info("Elastic IP %s (%s) -> %s (%s, job %s)", allocation,
                     address.get("PublicIp"), target["InstanceId"], instance_id, job_id)
        if self.config.public_ip and address.get("PublicIp"):
            moved = self._address_of(instance_id, str(address["PublicIp"]))
            before = self._address_of(instance_id, target.get("PublicIpAddress"))
            return moved if moved != before else None
        return None

    # --- what an instance gets ---------------------------------------------

    def user_data(self, request: LaunchRequest) -> str:
        """The rendered bootstrap script this request's instance boots with.

        The agent listens on all interfaces at ``agent_port`` (the security
        group decides who reaches it). Refuses (LaunchError) a script over
        EC2's 16 KB or one holding this process's AWS secret key.
        """
        env = {**request.env, ENV_IMDS_ENDPOINT: IMDS_ENDPOINT,
               "AWS_DEFAULT_REGION": self.config.region}
        prepared = dataclasses.replace(request, env=env)
        spec = self._package_spec(request)
        try:
            script = render_bootstrap(prepared, agent_host="0.0.0.0",  # noqa: S104
                                      agent_port=self._agent_port_for(request),
                                      package_spec=spec)
        except ValueError as err:
            raise LaunchError(f"cannot build the user-data of {request.instance_id}: {err}") \
                from err
        secret_keys, tokens = self._secrets()
        if spec and spec != self.config.package_spec:
            # Our presigned URL: made with temporary credentials it carries
            # their session token, by design (alone it signs nothing); it
            # can never carry a secret key. The rest of the script may hold
            # neither.
            check_user_data(spec, secret_keys)
            check_user_data(script.replace(spec, ""), secret_keys + tokens)
        else:
            check_user_data(script, secret_keys + tokens)
        return script

    def _package_spec(self, request: LaunchRequest) -> str | None:
        """What the instance installs when its image lacks gpuscout: the
        configured spec, else this process's own code through the job's
        S3 store (uploaded on first use), else nothing."""
        if self.config.package_spec:
            return self.config.package_spec
        if not self.config.ship_code or not request.store_url.startswith("s3://"):
            return None
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            return self._shipper(request.store_url).package_spec()
        except (BotoCoreError, ClientError, OSError) as err:
            raise LaunchError(f"cannot put gpuscout's code in {request.store_url} for "
                              f"{request.instance_id}: {err}") from err

    def _shipper(self, store_url: str) -> CodeShipper:
        with self._lock:
            shipper = self._shippers.get(store_url)
            if shipper is None:
                import boto3  # type: ignore[import-untyped]

                from gpuscout.store.s3 import S3Store

                # The URL is signed for the bucket's region: the instances'
                # unless the environment names another.
                session = boto3.session.Session(
                    region_name=os.environ.get("AWS_DEFAULT_REGION") or self.config.region)
                shipper = self._shippers[store_url] = CodeShipper(
                    S3Store(store_url, session=session), wheel_of_running_package(),
                    url_ttl_s=self.config.code_url_ttl_s)
            return shipper

    def _agent_port_for(self, request: LaunchRequest) -> int:
        """The port the instance's agent listens on (a hook for tests that
        run several agents on one machine)."""
        return self.config.agent_port

    def _address_of(self, instance_id: str, ip: str | None) -> str | None:
        """Where the control plane reaches the instance's agent."""
        return f"{ip}:{self.config.agent_port}" if ip else None

    def _secrets(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """(secret access keys, session tokens) this process could leak."""
        keys = [v for v in (os.environ.get("AWS_SECRET_ACCESS_KEY"),) if v]
        tokens = [v for v in (os.environ.get("AWS_SESSION_TOKEN"),) if v]
        creds = getattr(getattr(self.ec2, "_request_signer", None), "_credentials", None)
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            keys += [frozen.secret_key] if frozen.secret_key else []
            tokens += [frozen.token] if frozen.token else []
        return keys, tokens

    def _tag_specs(self, request: LaunchRequest) -> builtins.list[dict[str, Any]]:
        tags = [
            {"Key": TAG_CLUSTER, "Value": self.config.cluster},
            {"Key": TAG_JOB, "Value": request.job_id},
            {"Key": TAG_INSTANCE, "Value": request.instance_id},
            {"Key": TAG_OFFER, "Value": request.offer.id},
            {"Key": "Name", "Value": f"gpuscout-{request.instance_id}"},
        ]
        kinds = ["instance", "volume"]
        if request.offer.capacity == Capacity.SPOT:
            kinds.append("spot-instances-request")
        return [{"ResourceType": kind, "Tags": tags} for kind in kinds]

    # --- shared resources, created or reused ---------------------------------

    def _image_id(self) -> str:
        with self._lock:
            if self._ami:
                return self._ami
            images = []
            filters = [{"Name": "name", "Values": [self.config.ami_name_pattern]},
                       {"Name": "state", "Values": ["available"]}]
            for page in self._pages("describe_images", "Images",
                                    Owners=list(self.config.ami_owners), Filters=filters):
                images.extend(page)
            image = newest_image(images)
            if image is None:
                raise LaunchError(
                    f"no AMI named like {self.config.ami_name_pattern!r} owned by "
                    f"{', '.join(self.config.ami_owners)} in {self.config.region}; "
                    "set GPUSCOUT_AWS_AMI_ID")
            self._ami = str(image["ImageId"])
            log.info("using AMI %s (%s)", self._ami, image.get("Name"))
            return self._ami

    def _group_name(self) -> str:
        return self.config.security_group or f"gpuscout-{self.config.cluster}"

    def _vpc_id(self) -> str | None:
        if not self.config.subnet_ids:
            return None
        subnets = self._call("describe_subnets", SubnetIds=[self.config.subnet_ids[0]])
        return str(subnets["Subnets"][0]["VpcId"])

    def _security_group_id(self) -> str:
        """The cluster's security group: found by name, else created with
        one ingress rule, the agent's port. Safe against a concurrent create."""
        with self._lock:
            if self._group_id:
                return self._group_id
            name, vpc = self._group_name(), self._vpc_id()
            filters = [{"Name": "group-name", "Values": [name]}]
            if vpc:
                filters.append({"Name": "vpc-id", "Values": [vpc]})
            groups = self._call("describe_security_groups", Filters=filters)["SecurityGroups"]
            if groups:
                self._group_id = str(groups[0]["GroupId"])
                return self._group_id
            params: dict[str, Any] = {
                "GroupName": name, "Description": "GPU Scout agents",
                "TagSpecifications": [{"ResourceType": "security-group", "Tags": [
                    {"Key": TAG_CLUSTER, "Value": self.config.cluster}]}],
            }
            if vpc:
                params["VpcId"] = vpc
            try:
                group_id = str(self._call("create_security_group", **params)["GroupId"])
            except _AwsClientError as err:
                if err.code != "InvalidGroup.Duplicate":
                    raise LaunchError(f"cannot create security group {name}: {err}") from err
                groups = self._call("describe_security_groups", Filters=filters)
                self._group_id = str(groups["SecurityGroups"][0]["GroupId"])
                return self._group_id
            rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": self.config.agent_port,
                                    "ToPort": self.config.agent_port}
            if self.config.ingress_cidr:
                rule["IpRanges"] = [{"CidrIp": self.config.ingress_cidr,
                                     "Description": "GPU Scout control plane"}]
            else:
                rule["UserIdGroupPairs"] = [{"GroupId": group_id}]
            try:
                self._call("authorize_security_group_ingress", GroupId=group_id,
                           IpPermissions=[rule])
            except _AwsClientError as err:
                if err.code != "InvalidPermission.Duplicate":
                    raise LaunchError(f"cannot open port {self.config.agent_port} "
                                      f"in {name}: {err}") from err
            self._group_id = group_id
            return group_id

    def _ensure_key_pair(self) -> None:
        """Reuse the named key pair, or create it and save its private key
        (0600) under ``key_dir``: AWS shows a private key only once."""
        with self._lock:
            name = self.config.key_name
            if self._key_ready or not name:
                return
            try:
                self._call("describe_key_pairs", KeyNames=[name])
            except _AwsClientError as err:
                if err.code != "InvalidKeyPair.NotFound":
                    raise LaunchError(f"cannot look up key pair {name}: {err}") from err
                try:
                    created = self._call("create_key_pair", KeyName=name, TagSpecifications=[
                        {"ResourceType": "key-pair",
                         "Tags": [{"Key": TAG_CLUSTER, "Value": self.config.cluster}]}])
                except _AwsClientError as dup:
                    if dup.code != "InvalidKeyPair.Duplicate":
                        raise LaunchError(f"cannot create key pair {name}: {dup}") from dup
                else:
                    self._save_key(name, str(created["KeyMaterial"]))
            self._key_ready = True

    def _save_key(self, name: str, material: str) -> None:
        folder = self.config.key_dir or Path.home() / ".gpuscout" / "aws"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(material)
        log.info("created key pair %s; private key saved to %s", name, path)

    def _subnets(self) -> dict[str, str]:
        with self._lock:
            if self._subnet_by_zone is None:
                found = self._call("describe_subnets", SubnetIds=list(self.config.subnet_ids))
                self._subnet_by_zone = {s["AvailabilityZone"]: s["SubnetId"]
                                        for s in found["Subnets"]}
            return self._subnet_by_zone

    # --- offers ----------------------------------------------------------------

    def _fetch_offers(self) -> builtins.list[Offer]:
        names = sorted(self.table)
        if not names:
            return []
        type_filter = [{"Name": "instance-type", "Values": names}]
        hardware: dict[str, Hardware] = {}
        for page in self._pages("describe_instance_types", "InstanceTypes", Filters=type_filter):
            for t in page:
                hardware[t["InstanceType"]] = _hardware(t)
        zones: dict[str, set[str]] = {}
        for page in self._pages("describe_instance_type_offerings", "InstanceTypeOfferings",
                                LocationType="availability-zone", Filters=type_filter):
            for o in page:
                zones.setdefault(o["InstanceType"], set()).add(o["Location"])
        if self.config.subnet_ids:  # only zones we can launch into
            usable = set(self._subnets())
            zones = {t: z & usable for t, z in zones.items()}
        quotes: builtins.list[SpotQuote] = []
        # StartTime=now: AWS answers the price in effect now for each type and zone.
        for page in self._pages("describe_spot_price_history", "SpotPriceHistory",
                                InstanceTypes=names, ProductDescriptions=["Linux/UNIX"],
                                StartTime=datetime.now(UTC)):
            for q in page:
                quotes.append(SpotQuote(
                    instance_type=q["InstanceType"], zone=q["AvailabilityZone"],
                    price_per_hour=float(q["SpotPrice"]), timestamp=_as_datetime(q["Timestamp"])))
        return build_offers(self.config.region, self.table, hardware, zones,
                            latest_spot_prices(quotes))

    # --- instances ---------------------------------------------------------------

    def _describe(self, filters: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
        out: builtins.list[dict[str, Any]] = []
        for page in self._pages("describe_instances", "Reservations", Filters=filters):
            for reservation in page:
                out.extend(reservation["Instances"])
        return out

    def _spot_notices(self, raws: Iterable[dict[str, Any]]) -> set[str]:
        """EC2 ids whose spot request says the instance is being reclaimed."""
        requests = {r["SpotInstanceRequestId"]: r["InstanceId"] for r in raws
                    if r.get("SpotInstanceRequestId")
                    and r["State"]["Name"] not in _GONE_STATES}
        if not requests:
            return set()
        try:
            answer = self._call("describe_spot_instance_requests",
                                SpotInstanceRequestIds=sorted(requests))
        except _AwsClientError as err:
            log.warning("cannot read spot request status: %s", err)
            return set()
        return {requests[r["SpotInstanceRequestId"]]
                for r in answer.get("SpotInstanceRequests", [])
                if r.get("Status", {}).get("Code") in INTERRUPTION_STATUS_CODES
                and r["SpotInstanceRequestId"] in requests}

    def _wait_public_ip(self, ec2_id: str) -> dict[str, Any] | None:
        deadline = self.clock() + self.config.public_ip_wait_s
        while True:
            found = self._describe([{"Name": "instance-id", "Values": [ec2_id]}])
            if found and (found[0].get("PublicIpAddress")
                          or found[0]["State"]["Name"] in _GONE_STATES):
                return found[0]
            if self.clock() >= deadline:
                return found[0] if found else None
            self.sleep(1.0)

    def _view(self, raw: dict[str, Any], *, notices: Collection[str] = ()) -> ProviderInstance:
        tags = _tags(raw)
        state_name = raw["State"]["Name"]
        state = {"pending": ProviderState.PENDING, "running": ProviderState.RUNNING}.get(
            state_name, ProviderState.TERMINATED)
        ip = raw.get("PublicIpAddress") if self.config.public_ip else raw.get("PrivateIpAddress")
        reason = raw.get("StateReason", {}).get("Code", "")
        return ProviderInstance(
            instance_id=tags.get(TAG_INSTANCE, ""),
            job_id=tags.get(TAG_JOB, ""),
            offer_id=tags.get(TAG_OFFER, ""),
            state=state,
            address=self._address_of(tags.get(TAG_INSTANCE, ""), ip),
            provider_ref=str(raw["InstanceId"]),
            interruption_notice=raw["InstanceId"] in notices
            or reason in INTERRUPTION_STATE_REASONS,
        )

    # --- calls -------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> Any:
        """One EC2 call, retried on throttling with jittered backoff.

        Raises ThrottledError after ``max_attempts``, _AwsClientError (with
        ``code``) for any other refusal, ProviderError for a connection failure.
        """
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        method = getattr(self.ec2, operation)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(**params)
            except ClientError as err:
                code = error_code(err)
                if code not in THROTTLING_CODES:
                    message = str(err.response.get("Error", {}).get("Message", ""))
                    raise _AwsClientError(operation, code, message) from err
                if attempt >= self.config.max_attempts:
                    raise ThrottledError(operation, attempt, code) from err
                delay = compute_backoff(attempt, factor=self.config.backoff_factor_s,
                                        max_backoff=self.config.max_backoff_s, rng=self.rng)
                log.info("%s throttled (%s); retry %d in %.2fs", operation, code, attempt, delay)
                self.sleep(delay)
            except BotoCoreError as err:
                raise ProviderError(f"{operation} failed: {err}") from err

    def _pages(self, operation: str, key: str, **params: Any) -> Iterator[Any]:
        """Every page's ``key`` list, following NextToken (throttling retried per page)."""
        token: str | None = None
        while True:
            page = self._call(operation, **params, **({"NextToken": token} if token else {}))
            yield page.get(key, [])
            token = page.get("NextToken")
            if not token:
                return


class _AwsClientError(ProviderError):
    """EC2 refused a call; ``code`` is its error code."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}: {message}")
        self.code = code
        self.message = message


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


def _tags(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def _hardware(t: dict[str, Any]) -> Hardware:
    gpus = t.get("GpuInfo", {}).get("Gpus", [])
    return Hardware(
        instance_type=t["InstanceType"],
        gpus=sum(int(g.get("Count", 0)) for g in gpus),
        gpu_type=str(gpus[0]["Name"]) if gpus else None,
        vcpus=float(t["VCpuInfo"]["DefaultVCpus"]),
        memory_gb=float(t["MemoryInfo"]["SizeInMiB"]) / 1024.0,
    )


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


__all__ = [
    "AwsConfig", "AwsProvider", "ThrottledError", "check_user_data", "compute_backoff",
    "newest_image",
]
