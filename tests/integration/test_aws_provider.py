"""The AWS provider against moto's EC2 server, through plain boto3.

What a user relies on: offers with GPU hardware, zones and live spot prices;
spot and on-demand launches that carry the tags, IMDSv2 and a user-data that
is the bootstrap script, small and free of AWS secrets; instances found by
tag; idempotent terminate; capacity refusals as typed errors; throttling
retried with jittered backoff.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import pytest

from gpuscout.domain import Capacity, Offer
from gpuscout.market.aws_prices import AwsPriceFeed
from gpuscout.providers.aws import (
    AwsConfig,
    AwsProvider,
    ThrottledError,
    check_user_data,
    newest_image,
)
from gpuscout.providers.aws import ec2_client as aws_ec2_client
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    ProviderError,
    ProviderState,
    QuotaError,
)
from gpuscout.providers.bootstrap import MAX_USER_DATA_BYTES
from tests.integration.aws_moto import (
    TEST_SECRET,
    FaultyEc2,
    dropping_proxy,
    ec2_client,
    launch_request,
    new_config,
)
from tests.s3_servers import S3Endpoint

pytestmark = pytest.mark.usefixtures("aws_env")


request = functools.partial(
    launch_request, job_id="j-1", command="python -m gpuscout.examples.linreg --steps 100",
    agent_token="agent-token-1", control_url="http://10.0.0.5:8080")


def pick(offers: list[Offer], instance_type: str, capacity: Capacity) -> Offer:
    return next(o for o in offers if o.instance_type == instance_type and o.capacity == capacity)


@pytest.fixture
def provider() -> AwsProvider:
    return AwsProvider(new_config())


def describe(ec2_id: str) -> dict[str, Any]:
    answer = ec2_client().describe_instances(InstanceIds=[ec2_id])
    return answer["Reservations"][0]["Instances"][0]  # type: ignore[no-any-return]


def test_offers_have_gpu_hardware_zones_and_spot_prices(provider: AwsProvider) -> None:
    offers = provider.offers()
    g4 = [o for o in offers if o.instance_type == "g4dn.xlarge"]
    assert {o.capacity for o in g4} == {Capacity.SPOT, Capacity.ON_DEMAND}
    assert len({o.zone for o in g4}) >= 2 and all(o.zone.startswith("us-east-1") for o in g4)
    spot = [o for o in g4 if o.capacity == Capacity.SPOT]
    assert all(o.price_per_hour > 0 for o in spot)  # moto's spot price history
    on_demand = pick(offers, "g4dn.xlarge", Capacity.ON_DEMAND)
    assert on_demand.price_per_hour == 0.526  # from the packaged table
    assert (on_demand.gpus, on_demand.gpu_type, on_demand.vcpus, on_demand.memory_gb) == (
        1, "T4", 4, 16)
    assert on_demand.id == "aws:" + on_demand.zone + ":g4dn.xlarge:on-demand"
    assert pick(offers, "g5.12xlarge", Capacity.SPOT).gpus == 4
    # Every offered type is in the table; types moto does not sell are left out.
    assert {o.instance_type for o in offers} <= set(provider.table)
    assert all(o.provider == "aws" and o.region == "us-east-1" for o in offers)


def test_offers_are_cached_for_the_refresh_interval() -> None:
    now = [0.0]
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(offers_ttl_s=60), client=spy, clock=lambda: now[0])
    first = provider.offers()
    calls = len(spy.calls)
    now[0] = 59.0
    assert provider.offers() == first and len(spy.calls) == calls
    # A failed refresh keeps the previous offers.
    now[0] = 61.0
    spy.fail("describe_instance_types", "InternalError")
    assert provider.offers() == first
    assert len(spy.calls) == calls + 1


def test_spot_history_is_paginated_and_the_latest_price_wins() -> None:
    """Pages in any order: the newest quote per type and zone is the price."""
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    pages = [
        {"SpotPriceHistory": [_quote("g4dn.xlarge", "us-east-1a", "0.20", "2026-01-02")],
         "NextToken": "p2"},
        {"SpotPriceHistory": [_quote("g4dn.xlarge", "us-east-1a", "0.30", "2026-01-01"),
                              _quote("g4dn.xlarge", "us-east-1b", "0.25", "2026-01-01")]},
    ]
    seen: list[dict[str, Any]] = []

    def history(**params: Any) -> dict[str, Any]:
        seen.append(params)
        return pages[len(seen) - 1]

    spy._client = _Override(spy._client, describe_spot_price_history=history)
    offers = {o.id: o for o in provider.offers()}
    assert offers["aws:us-east-1a:g4dn.xlarge:spot"].price_per_hour == 0.20
    assert offers["aws:us-east-1b:g4dn.xlarge:spot"].price_per_hour == 0.25
    assert [p.get("NextToken") for p in seen] == [None, "p2"]
    assert seen[0]["ProductDescriptions"] == ["Linux/UNIX"]
    # A zone without a spot price has an on-demand offer only.
    zones_d = [o for o in offers.values() if o.instance_type == "g4dn.xlarge"
               and o.zone not in ("us-east-1a", "us-east-1b")]
    assert zones_d and all(o.capacity == Capacity.ON_DEMAND for o in zones_d)


def test_launch_spot_and_on_demand_tagged_with_imdsv2(provider: AwsProvider) -> None:
    offers = provider.offers()
    spot = pick(offers, "g4dn.xlarge", Capacity.SPOT)
    on_demand = pick(offers, "g5.xlarge", Capacity.ON_DEMAND)
    a = provider.launch(request(spot, "i-spot"))
    b = provider.launch(request(on_demand, "i-od"))
    assert a.state == ProviderState.PENDING and a.offer_id == spot.id
    assert a.provider_ref.startswith("i-") and a.address and a.address.endswith(":8700")

    raw_a, raw_b = describe(a.provider_ref), describe(b.provider_ref)
    assert raw_a.get("InstanceLifecycle") == "spot"
    assert raw_b.get("InstanceLifecycle") in (None, "scheduled", "normal")
    assert raw_a["InstanceType"] == "g4dn.xlarge"
    assert raw_a["Placement"]["AvailabilityZone"] == spot.zone
    assert raw_b["Placement"]["AvailabilityZone"] == on_demand.zone
    assert raw_a["MetadataOptions"]["HttpTokens"] == "required"
    tags = {t["Key"]: t["Value"] for t in raw_a["Tags"]}
    assert tags["gpuscout:cluster"] == provider.config.cluster
    assert (tags["gpuscout:job"], tags["gpuscout:instance"]) == ("j-1", "i-spot")
    assert raw_a["PrivateIpAddress"] + ":8700" == a.address
    # Both in the cluster's security group, which opens only the agent port.
    group_id = raw_a["SecurityGroups"][0]["GroupId"]
    assert raw_b["SecurityGroups"][0]["GroupId"] == group_id
    group = ec2_client().describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert group["GroupName"] == f"gpuscout-{provider.config.cluster}"
    assert [(p["FromPort"], p["ToPort"]) for p in group["IpPermissions"]] == [(8700, 8700)]


def test_security_group_and_key_pair_are_reused(tmp_path: Any) -> None:
    config = new_config(key_name=f"k-{new_config().cluster}", key_dir=tmp_path)
    first, second = AwsProvider(config), AwsProvider(config)  # e.g. a restarted control plane
    offer = pick(first.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    x = first.launch(request(offer, "i-x"))
    y = second.launch(request(offer, "i-y"))
    ec2 = ec2_client()
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"gpuscout-{config.cluster}"]}])
    assert len(groups["SecurityGroups"]) == 1
    assert describe(x.provider_ref)["KeyName"] == describe(y.provider_ref)["KeyName"] == \
        config.key_name
    assert len(ec2.describe_key_pairs(KeyNames=[config.key_name])["KeyPairs"]) == 1
    key_file = tmp_path / f"{config.key_name}.pem"
    assert key_file.read_text().strip() and oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_user_data_is_the_bootstrap_small_and_without_secrets(provider: AwsProvider) -> None:
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    launched = provider.launch(request(offer, "i-ud"))
    answer = ec2_client().describe_instance_attribute(InstanceId=launched.provider_ref,
                                                      Attribute="userData")
    data = base64.b64decode(answer["UserData"]["Value"])
    assert len(data) < 16 * 1024
    text = data.decode()
    assert text.startswith("#!/bin/bash") and "exec \"$PY\" -m gpuscout.agent" in text
    assert "export GPUSCOUT_INSTANCE_ID=i-ud" in text
    assert "export GPUSCOUT_AGENT_PORT=8700" in text
    assert "export GPUSCOUT_AGENT_TOKEN=agent-token-1" in text  # the instance's own token
    for secret in ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", TEST_SECRET):
        assert secret not in text
    # The code comes by a presigned URL (tests/integration/test_aws_code.py),
    # which names the access key id, the public half of the credential.
    assert "X-Amz-Signature=" in text


def test_user_data_refuses_secrets_and_oversize(provider: AwsProvider) -> None:
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    with pytest.raises(LaunchError, match="credentials"):
        provider.launch(request(offer, "i-s1", env={"AWS_SECRET_ACCESS_KEY": "x"}))
    with pytest.raises(LaunchError, match="credentials"):
        provider.launch(request(offer, "i-s2", command=f"train --key {TEST_SECRET}"))
    with pytest.raises(LaunchError, match="16384"):
        provider.launch(request(offer, "i-s3", command="x" * MAX_USER_DATA_BYTES))
    with pytest.raises(LaunchError):
        check_user_data("#!/bin/bash\nexport aws_session_token=abc\n")
    assert provider.list() == []  # nothing was launched


def test_list_get_and_terminate_by_tag(provider: AwsProvider) -> None:
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    provider.launch(request(offer, "i-a", job_id="j-a"))
    provider.launch(request(offer, "i-b", job_id="j-b"))
    other = AwsProvider(new_config())  # another cluster on the same account
    other.launch(request(offer, "i-other"))

    listed = {i.instance_id: i for i in provider.list()}
    assert set(listed) == {"i-a", "i-b"}
    assert listed["i-b"].job_id == "j-b" and listed["i-b"].state == ProviderState.RUNNING
    got = provider.get("i-a")
    assert (got.instance_id, got.job_id, got.offer_id) == ("i-a", "j-a", offer.id)
    assert not got.interruption_notice

    provider.terminate("i-a")
    assert provider.get("i-a").state == ProviderState.TERMINATED
    provider.terminate("i-a")  # again: already done
    assert describe(got.provider_ref)["State"]["Name"] == "terminated"
    assert [i.instance_id for i in provider.list()] == ["i-b"]
    provider.terminate("i-never-launched")  # unknown: done
    with pytest.raises(InstanceNotFound):
        provider.get("i-never-launched")
    assert [i.instance_id for i in other.list()] == ["i-other"]


def test_terminate_tolerates_not_found_from_ec2() -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    provider.launch(request(offer, "i-nf"))
    spy.fail("terminate_instances", "InvalidInstanceID.NotFound")
    provider.terminate("i-nf")  # EC2 forgot it meanwhile: done
    spy.fail("terminate_instances", "UnauthorizedOperation")
    with pytest.raises(ProviderError, match="UnauthorizedOperation"):
        provider.terminate("i-nf")


def test_get_reports_a_spot_interruption_notice() -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    launched = provider.launch(request(offer, "i-int"))
    real = spy._client
    raw = describe(launched.provider_ref)

    def instances(**params: Any) -> dict[str, Any]:
        answer = real.describe_instances(**params)
        for r in answer["Reservations"]:
            for i in r["Instances"]:
                i["SpotInstanceRequestId"] = "sir-1"
        return answer  # type: ignore[no-any-return]

    def requests(**params: Any) -> dict[str, Any]:
        assert params["SpotInstanceRequestIds"] == ["sir-1"]
        return {"SpotInstanceRequests": [{
            "SpotInstanceRequestId": "sir-1", "InstanceId": raw["InstanceId"],
            "Status": {"Code": "marked-for-termination"}}]}

    spy._client = _Override(real, describe_instances=instances,
                            describe_spot_instance_requests=requests)
    assert provider.get("i-int").interruption_notice
    assert [i.interruption_notice for i in provider.list()] == [True]


@pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "SpotMaxPriceTooLow",
                                  "MaxSpotInstanceCountExceeded"])
def test_capacity_refusals_are_capacity_errors(code: str) -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    spy.fail("run_instances", code)
    with pytest.raises(CapacityError) as caught:
        provider.launch(request(offer, "i-cap"))
    assert caught.value.offer_id == offer.id and code in caught.value.reason
    assert provider.list() == []


@pytest.mark.parametrize("code", ["VcpuLimitExceeded", "InstanceLimitExceeded",
                                  "MaxSpotInstanceCountExceeded"])
def test_quota_refusals_say_they_are_the_accounts_limit(code: str) -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    spy.fail("run_instances", code)
    with pytest.raises(QuotaError) as caught:
        provider.launch(request(offer, "i-quota"))
    assert str(caught.value).startswith(f"account quota reached launching {offer.id}: {code}")
    assert "not a capacity shortage" in str(caught.value)
    assert isinstance(caught.value, CapacityError)  # backed off like one
    spy.fail("run_instances", "InsufficientInstanceCapacity")
    with pytest.raises(CapacityError) as shortage:
        provider.launch(request(offer, "i-short"))
    assert not isinstance(shortage.value, QuotaError)


def test_other_refusals_are_launch_errors() -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    spy.fail("run_instances", "InvalidAMIID.NotFound")
    with pytest.raises(LaunchError, match="InvalidAMIID.NotFound"):
        provider.launch(request(offer, "i-bad"))
    with pytest.raises(CapacityError):
        provider.launch(request(offer.with_(available=False), "i-unavailable"))


def test_throttling_is_retried_by_botocore_with_jittered_backoff(
        instant_retries: list[float]) -> None:
    spy = FaultyEc2(ec2_client())
    provider = AwsProvider(new_config(), client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    spy.fail("run_instances", "RequestLimitExceeded", times=3)
    launched = provider.launch(request(offer, "i-thr"))
    assert launched.state == ProviderState.PENDING
    assert spy.calls.count("run_instances") == 4
    # Full jitter: retry n waits a draw from [0, 1 s * 2**(n-1)] (botocore's
    # base for throttling), capped at 20 s.
    assert len(instant_retries) == 3
    assert all(0 <= d <= min(20.0, 2.0 ** n) for n, d in enumerate(instant_retries))
    assert [i.instance_id for i in provider.list()] == ["i-thr"]  # one machine, not four

    spy.fail("describe_instances", "Throttling", times=10)
    with pytest.raises(ThrottledError) as caught:
        provider.get("i-thr")
    assert caught.value.retryable and caught.value.attempts == provider.config.max_attempts
    assert spy.calls.count("describe_instances") == 1 + provider.config.max_attempts


def test_a_dropped_connection_is_retried_not_raised(
        moto_server: S3Endpoint, instant_retries: list[float]) -> None:
    """The endpoint resets the first two connections (a restart, a load
    balancer's hiccup): botocore retries, the caller sees offers."""
    config = new_config()
    with dropping_proxy(moto_server.url, drops=2) as (url, dropped):
        provider = AwsProvider(config, client=aws_ec2_client(config, endpoint_url=url))
        offers = provider.offers()
        launched = provider.launch(request(pick(offers, "g4dn.xlarge", Capacity.SPOT),
                                           "i-drop"))
    assert dropped == [2] and len(instant_retries) == 2
    assert offers == AwsProvider(config).offers()
    assert describe(launched.provider_ref)["InstanceType"] == "g4dn.xlarge"


def test_an_endpoint_that_stays_unreachable_is_a_provider_error_after_the_retries(
        moto_server: S3Endpoint, instant_retries: list[float]) -> None:
    config = new_config(max_attempts=3)
    with dropping_proxy(moto_server.url, drops=None) as (url, dropped):
        provider = AwsProvider(config, client=aws_ec2_client(config, endpoint_url=url))
        with pytest.raises(ProviderError, match="describe_instance_types failed"):
            provider.offers()
    assert dropped == [3] and len(instant_retries) == 2


def test_ami_by_name_pattern_picks_the_newest() -> None:
    assert newest_image([
        {"ImageId": "ami-old", "CreationDate": "2024-01-01T00:00:00.000Z"},
        {"ImageId": "ami-new", "CreationDate": "2025-06-01T00:00:00.000Z"},
        {"ImageId": "ami-mid", "CreationDate": "2025-01-01T00:00:00.000Z"},
    ])["ImageId"] == "ami-new"  # type: ignore[index]
    ec2 = ec2_client()
    images = ec2.describe_images(Owners=["amazon"])["Images"]
    name = images[0]["Name"]
    provider = AwsProvider(new_config(ami_id=None, ami_name_pattern=name))
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    launched = provider.launch(request(offer, "i-ami"))
    assert describe(launched.provider_ref)["ImageId"] == images[0]["ImageId"]
    missing = AwsProvider(new_config(ami_id=None, ami_name_pattern="no such image *"))
    with pytest.raises(LaunchError, match="GPUSCOUT_AWS_AMI_ID"):
        missing.launch(request(offer, "i-noami"))


def test_price_feed_follows_the_provider(tmp_path: Any) -> None:
    from datetime import UTC, datetime, timedelta

    from gpuscout.db import open_repository

    repo = open_repository(f"sqlite:///{tmp_path / 'db.sqlite'}")
    offers = [pick(AwsProvider(new_config()).offers(), "g4dn.xlarge", Capacity.SPOT)]
    feed = AwsPriceFeed(lambda: list(offers), refresh_s=60)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    feed.start(repo, t0)
    assert [o.id for o in repo.list_offers()] == [offers[0].id]
    gone = offers.pop()
    assert feed.tick(repo, t0 + timedelta(seconds=30)) == 0  # not yet due
    assert feed.tick(repo, t0 + timedelta(seconds=61)) == 1
    assert repo.get_offer(gone.id).available is False


def test_config_from_settings(tmp_path: Any) -> None:
    from gpuscout.config import Settings

    settings = Settings(home=tmp_path, provider="aws", aws={
        "region": "eu-west-1", "subnet_ids": "subnet-1, subnet-2", "cluster": "c1",
        "instance_profile": "gpuscout-agent", "ship_code": False, "code_url_ttl_s": 600,
        "elastic_ip": "eipalloc-0abc12"})
    config = AwsConfig.from_settings(settings)
    assert (config.ship_code, config.code_url_ttl_s) == (False, 600)
    assert config.elastic_ip == "eipalloc-0abc12"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="aws.elastic_ip"):
        Settings(home=tmp_path, aws={"elastic_ip": "203.0.113.7"})  # an address, not its allocation
    assert config.region == "eu-west-1" and config.subnet_ids == ("subnet-1", "subnet-2")
    assert (config.cluster, config.instance_profile) == ("c1", "gpuscout-agent")
    assert config.key_dir == tmp_path / "aws"


def test_aws_settings_come_from_gpuscout_aws_variables(tmp_path: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuscout.config import Settings

    for name, value in {"REGION": "eu-west-1", "SUBNET_IDS": "subnet-1, subnet-2",
                        "AGENT_PORT": "9000", "OFFERS_REFRESH_S": "30",
                        "AMI_NAME_PATTERN": "mine *", "PUBLIC_IP": "true"}.items():
        monkeypatch.setenv(f"GPUSCOUT_AWS_{name}", value)
    monkeypatch.setenv("GPUSCOUT_SCOUT_INTERVAL_S", "7")
    settings = Settings(home=tmp_path)
    aws = AwsConfig.from_settings(settings)
    assert (aws.region, aws.subnet_ids, aws.agent_port) == (
        "eu-west-1", ("subnet-1", "subnet-2"), 9000)
    assert (aws.offers_ttl_s, aws.ami_name_pattern, aws.public_ip) == (30.0, "mine *", True)
    assert settings.scout_interval_s == 7 and aws.cluster == AwsConfig().cluster
    monkeypatch.setenv("GPUSCOUT_AWS_AGENT_PORT", "0")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="aws.agent_port"):
        Settings(home=tmp_path)


def _quote(instance_type: str, zone: str, price: str, day: str) -> dict[str, Any]:
    return {"InstanceType": instance_type, "AvailabilityZone": zone, "SpotPrice": price,
            "Timestamp": f"{day}T00:00:00Z", "ProductDescription": "Linux/UNIX"}


class _Override:
    """A client whose named operations are replaced, the rest passed through."""

    def __init__(self, client: Any, **operations: Any) -> None:
        self._client = client
        self._operations = operations

    def __getattr__(self, name: str) -> Any:
        return self._operations.get(name) or getattr(self._client, name)


def test_the_iam_policy_allows_every_call_the_provider_makes(tmp_path: Any) -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    policy = json.loads((root / "deploy" / "aws" / "iam-policy.json").read_text())
    allowed = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        allowed |= {actions} if isinstance(actions, str) else set(actions)
    spy = FaultyEc2(ec2_client())
    name = ec2_client().describe_images(Owners=["amazon"])["Images"][0]["Name"]
    config = new_config(ami_id=None, ami_name_pattern=name, key_name=f"k-{new_config().cluster}",
                        key_dir=tmp_path)
    config = config.model_copy(
        update={"elastic_ip": ec2_client().allocate_address(Domain="vpc")["AllocationId"]})
    provider = AwsProvider(config, client=spy)
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.SPOT)
    provider.launch(request(offer, "i-iam"))
    provider.get("i-iam")
    provider.list()
    provider.on_route("j-1", "i-iam")
    provider.terminate("i-iam")
    used = {"ec2:" + "".join(part.title() for part in call.split("_")) for call in spy.calls}
    assert {"ec2:RunInstances", "ec2:CreateSecurityGroup", "ec2:AssociateAddress"} <= used
    assert used - allowed == set()
    # The instances' own role reaches the store only.
    instance = json.loads((root / "deploy" / "aws" / "instance-policy.json").read_text())
    assert {a.split(":")[0] for s in instance["Statement"] for a in
            ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])} == {"s3"}


def test_subnets_limit_offers_to_their_zones_and_carry_the_launch() -> None:
    ec2 = ec2_client()
    subnet = next(s for s in ec2.describe_subnets()["Subnets"]
                  if s["AvailabilityZone"] == "us-east-1b")
    provider = AwsProvider(new_config(subnet_ids=(subnet["SubnetId"],)))
    offers = provider.offers()
    assert offers and {o.zone for o in offers} == {"us-east-1b"}
    launched = provider.launch(request(pick(offers, "g4dn.xlarge", Capacity.SPOT), "i-sub"))
    raw = describe(launched.provider_ref)
    assert (raw["SubnetId"], raw["VpcId"]) == (subnet["SubnetId"], subnet["VpcId"])
    elsewhere = pick(AwsProvider(new_config()).offers(), "g4dn.xlarge", Capacity.SPOT)
    assert elsewhere.zone != "us-east-1b"
    with pytest.raises(CapacityError, match="no configured subnet"):
        provider.launch(request(elsewhere, "i-elsewhere"))


def eip_holder(allocation: str) -> str | None:
    (address,) = ec2_client().describe_addresses(AllocationIds=[allocation])["Addresses"]
    return address.get("InstanceId")


def test_the_elastic_ip_follows_one_job_from_instance_to_instance() -> None:
    ec2 = ec2_client()
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    provider = AwsProvider(new_config(elastic_ip=allocation))
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    a1 = provider.launch(request(offer, "i-a1", job_id="j-a"))
    b1 = provider.launch(request(offer, "i-b1", job_id="j-b"))
    a2 = provider.launch(request(offer, "i-a2", job_id="j-a"))

    assert provider.on_route("j-a", "i-a1") is None  # private addresses: unchanged
    assert eip_holder(allocation) == a1.provider_ref
    provider.on_route("j-a", "i-a1")  # again: nothing to do
    # Another job's route does not take it from a live instance of job j-a...
    provider.on_route("j-b", "i-b1")
    assert eip_holder(allocation) == a1.provider_ref
    # ...but j-a's move takes it along, from the old instance to the new one.
    provider.on_route("j-a", "i-a2")
    assert eip_holder(allocation) == a2.provider_ref
    # Once j-a's instance is gone, the address is free for j-b.
    provider.terminate("i-a2")
    provider.on_route("j-b", "i-b1")
    assert eip_holder(allocation) == b1.provider_ref
    with pytest.raises(InstanceNotFound):
        provider.on_route("j-a", "i-a2")  # terminated
    # Without an Elastic IP configured, nothing is called.
    spy = FaultyEc2(ec2_client())
    AwsProvider(new_config(), client=spy).on_route("j-b", "i-b1")
    assert spy.calls == []


def test_the_elastic_ip_is_not_taken_from_an_instance_gpuscout_does_not_own() -> None:
    ec2 = ec2_client()
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    theirs = ec2.run_instances(ImageId=new_config().ami_id, InstanceType="t3.micro",
                               MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ec2.associate_address(AllocationId=allocation, InstanceId=theirs)
    provider = AwsProvider(new_config(elastic_ip=allocation))
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    provider.launch(request(offer, "i-mine"))
    provider.on_route("j-1", "i-mine")
    assert eip_holder(allocation) == theirs
    ec2.terminate_instances(InstanceIds=[theirs])


def test_with_public_addresses_the_elastic_ip_becomes_the_agents_address() -> None:
    ec2 = ec2_client()
    allocation = ec2.allocate_address(Domain="vpc")
    provider = AwsProvider(new_config(elastic_ip=allocation["AllocationId"], public_ip=True))
    offer = pick(provider.offers(), "g4dn.xlarge", Capacity.ON_DEMAND)
    launched = provider.launch(request(offer, "i-pub"))
    assert launched.address != f"{allocation['PublicIp']}:8700"
    assert provider.on_route("j-1", "i-pub") == f"{allocation['PublicIp']}:8700"
    assert provider.get("i-pub").address == f"{allocation['PublicIp']}:8700"
    assert provider.on_route("j-1", "i-pub") is None  # already there
