"""The AWS provider: instances are EC2 instances, launched with boto3.

The same contract as every Provider (see providers/base.py), on EC2:
- ``offers`` builds spot and on-demand offers (offers.py) and caches them
  for ``offers_ttl_s``; a failed refresh keeps the last offers.
- ``launch`` calls ``run_instances`` once per GPU Scout instance id (the id is
  the ClientToken, so a retried call never starts a second machine), spot
  through ``InstanceMarketOptions``, IMDSv2 required, on the cluster's shared
  image, security group and key pair (resources.py), user-data = the one
  bootstrap script (instances.py). Capacity refusals raise CapacityError,
  the account's limits QuotaError.
- Code travels through the object store: with an ``s3://`` job store and no
  ``package_spec``, the running gpuscout is uploaded there once as a wheel
  (providers/code_bundle.py) and the user-data names it, with the ``aws``
  extra the agent's S3 store needs, by a presigned URL that expires after
  ``code_url_ttl_s``; an image that has gpuscout ignores it.
- ``get``/``list``/``terminate`` find instances by tag (instances.py), so a
  restarted control plane (or the reaper) finds every one of them.
- ``terminate`` is idempotent; an instance that is shutting down or
  terminated no longer bills, so it counts as gone.
- With ``elastic_ip`` (an allocation id), ``on_route`` moves that address to
  the instance a job's route now points at, so clients that use it follow
  the job from instance to instance.
- Every call goes through botocore's standard retries (ec2.py); throttling
  that outlasts them is a ThrottledError.

The endpoint comes from boto3's standard configuration (``AWS_ENDPOINT_URL``
and friends), which is how the tests point it at moto's server.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from gpuscout.config import AwsSettings
from gpuscout.domain import Capacity, Offer
from gpuscout.market.aws_prices import AWS_PROVIDER, OnDemandPrice, load_ondemand_table
from gpuscout.providers.aws.ec2 import (
    CAPACITY_CODES,
    NOT_FOUND_CODES,
    QUOTA_CODES,
    Ec2,
    Ec2Error,
    ec2_client,
)
from gpuscout.providers.aws.instances import (
    LIVE_STATES,
    TAG_INSTANCE,
    TAG_JOB,
    TAG_OFFER,
    describe,
    is_gone,
    is_reclaimed,
    render_user_data,
    secrets_of,
    spot_notices,
    state_of,
    tag_specs,
    tags_of,
)
from gpuscout.providers.aws.offers import fetch_offers
from gpuscout.providers.aws.resources import TAG_CLUSTER, SharedResources
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    ProviderError,
    ProviderInstance,
    QuotaError,
)
from gpuscout.providers.code_bundle import DIST_NAME, CodeShipper, wheel_of_running_package

if TYPE_CHECKING:
    from gpuscout.config import Settings

log = logging.getLogger("gpuscout.providers.aws")

# What the agent on an instance needs besides gpuscout: boto3 for its S3 store.
AGENT_EXTRA = "aws"


class AwsProvider:
    """EC2 behind the Provider protocol. Thread-safe.

    ``client``: an EC2 client to use instead of one made from ``session``
    (tests pass one whose answers they alter; make it with
    ``ec2_client(config)`` to keep the configured retries); ``clock``/
    ``sleep``: time, handed in so that tests run instantly; ``table``:
    on-demand prices (default: the packaged CSV).
    """

    name = AWS_PROVIDER

    def __init__(
        self,
        config: AwsSettings | None = None,
        *,
        client: Any = None,
        session: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        table: dict[tuple[str, str], OnDemandPrice] | None = None,
    ) -> None:
        self.config = config or AwsSettings()
        self.ec2 = client if client is not None else ec2_client(self.config, session=session)
        self.api = Ec2(self.ec2)  # the calls, errors translated
        self.resources = SharedResources(self.api, self.config)
        self.clock = clock
        self.sleep = sleep
        all_prices = table if table is not None else load_ondemand_table()
        self.table = {t: p for (r, t), p in all_prices.items() if r == self.config.region}
        self._lock = threading.RLock()
        self._offers: builtins.list[Offer] | None = None
        self._offers_at = float("-inf")
        self._shippers: dict[str, CodeShipper] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> AwsProvider:
        return cls(AwsSettings.from_settings(settings))

    # --- Provider protocol -------------------------------------------------

    def offers(self) -> builtins.list[Offer]:
        """Offers, refreshed at most every ``offers_ttl_s``; on a failed
        refresh the previous offers are kept (logged), if there are any."""
        with self._lock:
            fresh = self.clock() - self._offers_at < self.config.offers_ttl_s
            if self._offers is not None and fresh:
                return builtins.list(self._offers)
            try:
                usable = set(self.resources.subnets()) if self.config.subnet_ids else None
                self._offers = fetch_offers(self.api, self.config.region, self.table,
                                            usable_zones=usable)
            except ProviderError as err:
                if self._offers is None:
                    raise
                log.warning("offer refresh failed, keeping the previous offers: %s", err)
            self._offers_at = self.clock()
            return builtins.list(self._offers)

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
            "ImageId": self.resources.image_id(),
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": request.instance_id,  # at most one machine per GPU Scout id
            "UserData": user_data,
            "Placement": {"AvailabilityZone": offer.zone},
            "SecurityGroupIds": [self.resources.security_group_id()],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            # A shutdown from inside the machine ends its billing too.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": tag_specs(self.config, request),
        }
        if self.config.subnet_ids:
            subnet = self.resources.subnets().get(offer.zone)
            if subnet is None:  # an offer from before the subnets changed
                raise CapacityError(offer.id, f"no configured subnet in {offer.zone}")
            params["SubnetId"] = subnet
        if self.config.key_name:
            self.resources.ensure_key_pair()
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
            response = self.api.call("run_instances", **params)
        except Ec2Error as err:
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
        found = describe(self.api, [{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
        if not found:
            raise InstanceNotFound(instance_id)
        # A live one wins over a terminated one (ids are never reused, but be sure).
        raw = sorted(found, key=lambda i: (not is_gone(i), str(i.get("LaunchTime", ""))))[-1]
        return self._view(raw, notices=spot_notices(self.api, [raw]))

    def list(self) -> builtins.list[ProviderInstance]:
        """This cluster's instances that are not shutting down or terminated."""
        found = describe(self.api, [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.config.cluster]},
            {"Name": "instance-state-name", "Values": builtins.list(LIVE_STATES)},
        ])
        notices = spot_notices(self.api, found)
        return [self._view(raw, notices=notices) for raw in found
                if tags_of(raw).get(TAG_INSTANCE)]

    def terminate(self, instance_id: str) -> None:
        """Terminate every EC2 instance carrying this GPU Scout id.

        Idempotent: none found, already shutting down or terminated, or
        "not found" from EC2 all count as done. Once ``terminate_instances``
        answers, the instance is shutting down, which AWS no longer bills.
        """
        found = describe(self.api, [{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
        ids = [i["InstanceId"] for i in found if not is_gone(i)]
        if not ids:
            return
        try:
            self.api.call("terminate_instances", InstanceIds=ids)
        except Ec2Error as err:
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
        found = [raw for raw in describe(self.api, [
            {"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]},
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.config.cluster]},
        ]) if not is_gone(raw)]
        if not found:
            raise InstanceNotFound(instance_id)
        target = found[0]
        try:
            (address,) = self.api.call("describe_addresses",
                                         AllocationIds=[allocation])["Addresses"]
        except Ec2Error as err:
            raise ProviderError(f"cannot read Elastic IP {allocation}: {err}") from err
        holder = address.get("InstanceId")
        if holder and holder != target["InstanceId"]:
            owner = describe(self.api, [{"Name": "instance-id", "Values": [holder]}])
            tags = tags_of(owner[0]) if owner else {}
            live = bool(owner) and not is_gone(owner[0])
            ours = tags.get(TAG_CLUSTER) == self.config.cluster
            if live and not (ours and tags.get(TAG_JOB) == job_id):
                log.warning("Elastic IP %s stays on %s (%s): it is not job %s's",
                            allocation, holder,
                            f"job {tags.get(TAG_JOB)}" if ours else "not a GPU Scout instance",
                            job_id)
                return None
        if holder != target["InstanceId"]:
            try:
                self.api.call("associate_address", AllocationId=allocation,
                                InstanceId=target["InstanceId"], AllowReassociation=True)
            except Ec2Error as err:
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
        """The rendered bootstrap script this request's instance boots with
        (see instances.render_user_data): LaunchError for one over EC2's
        16 KB or one holding this process's AWS secret key."""
        spec = self._package_spec(request)
        return render_user_data(
            request, region=self.config.region, agent_port=self._agent_port_for(request),
            package_spec=spec, presigned=bool(spec) and spec != self.config.package_spec,
            secrets=secrets_of(self.ec2))

    def _package_spec(self, request: LaunchRequest) -> str | None:
        """What the instance installs when its image lacks gpuscout: the
        configured spec, else this process's own code through the job's
        S3 store (uploaded on first use) with the agent's extra, else
        nothing."""
        if self.config.package_spec:
            return self.config.package_spec
        if not self.config.ship_code or not request.store_url.startswith("s3://"):
            return None
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            url = self._shipper(request.store_url).package_spec()
        except (BotoCoreError, ClientError, OSError) as err:
            raise LaunchError(f"cannot put gpuscout's code in {request.store_url} for "
                              f"{request.instance_id}: {err}") from err
        return f"{DIST_NAME}[{AGENT_EXTRA}] @ {url}"  # PEP 508: the wheel, with the extra

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

    # --- instances ---------------------------------------------------------------

    def _wait_public_ip(self, ec2_id: str) -> dict[str, Any] | None:
        deadline = self.clock() + self.config.public_ip_wait_s
        while True:
            found = describe(self.api, [{"Name": "instance-id", "Values": [ec2_id]}])
            if found and (found[0].get("PublicIpAddress") or is_gone(found[0])):
                return found[0]
            if self.clock() >= deadline:
                return found[0] if found else None
            self.sleep(1.0)

    def _view(self, raw: dict[str, Any], *, notices: Collection[str] = ()) -> ProviderInstance:
        tags = tags_of(raw)
        ip = raw.get("PublicIpAddress") if self.config.public_ip else raw.get("PrivateIpAddress")
        return ProviderInstance(
            instance_id=tags.get(TAG_INSTANCE, ""),
            job_id=tags.get(TAG_JOB, ""),
            offer_id=tags.get(TAG_OFFER, ""),
            state=state_of(raw),
            address=self._address_of(tags.get(TAG_INSTANCE, ""), ip),
            provider_ref=str(raw["InstanceId"]),
            interruption_notice=is_reclaimed(raw, notices),
        )


__all__ = ["AGENT_EXTRA", "AwsProvider"]
