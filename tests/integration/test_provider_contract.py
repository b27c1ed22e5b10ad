"""The Provider contract (providers/base.py), one suite run over every
provider: the fake (what unit tests stand on), the local one (real process
trees) and AWS on moto's EC2 server, as the object-store suite runs over
its backends. A provider that passes here can carry the control plane.

What the contract promises, and each test checks:
- ``offers`` are one market's, with unique ids and a price;
- ``launch`` returns at once, the instance PENDING (or already RUNNING) for
  the job and offer asked, found by ``get`` and ``list``;
- ``get`` of an unknown id raises InstanceNotFound;
- ``terminate`` returns once the instance is gone, and is idempotent, an
  unknown id included; a terminated instance is TERMINATED (or unknown) and
  out of ``list``;
- ``on_route`` answers None or the instance's new address, and may be
  called again.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuscout.domain import Capacity, Offer
from gpuscout.providers.base import (
    InstanceNotFound,
    LaunchRequest,
    Provider,
    ProviderState,
)
from gpuscout.providers.fake import FakeProvider
from gpuscout.providers.local import LocalProvider
from tests.integration.aws_moto import launch_request, new_config

PROVIDERS = ["fake", "local", "aws-on-moto"]


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Provider]:
    if request.param == "fake":
        yield FakeProvider()
    elif request.param == "local":
        local = LocalProvider(tmp_path / "local", boot_delay_s=30.0, terminate_grace_s=2)
        yield local
        for instance in local.list():
            local.terminate(instance.instance_id)
    else:
        request.getfixturevalue("aws_env")
        from gpuscout.providers.aws import AwsProvider

        yield AwsProvider(new_config())


def an_offer(provider: Provider) -> Offer:
    """A spot GPU offer the provider sells, the cheapest."""
    offers = [o for o in provider.offers() if o.gpus >= 1 and o.capacity == Capacity.SPOT]
    return min(offers, key=lambda o: (o.price_per_hour, o.id))


def request_for(provider: Provider, offer: Offer, job_id: str) -> LaunchRequest:
    # A command that idles: the local provider runs it (after a boot delay
    # longer than the test), the others never do.
    return launch_request(offer, f"i-{uuid.uuid4().hex[:12]}", job_id=job_id,
                          command="sleep 600", agent_token="t")


def test_offers_are_the_providers_own_with_unique_ids_and_prices(provider: Provider) -> None:
    offers = provider.offers()
    assert offers, "a provider with nothing to sell"
    assert len({o.id for o in offers}) == len(offers)
    # One market per provider (the fake stands in for the local one and
    # sells its catalog).
    assert len({o.provider for o in offers}) == 1
    assert all(o.price_per_hour > 0 for o in offers if o.available)
    assert any(o.gpus >= 1 for o in offers)


def test_launch_returns_at_once_and_get_and_list_find_the_instance(provider: Provider) -> None:
    offer = an_offer(provider)
    req = request_for(provider, offer, "job-contract")
    launched = provider.launch(req)
    assert (launched.instance_id, launched.job_id, launched.offer_id) == (
        req.instance_id, "job-contract", offer.id)
    assert launched.state in (ProviderState.PENDING, ProviderState.RUNNING)
    assert launched.provider_ref
    got = provider.get(req.instance_id)
    assert (got.instance_id, got.job_id, got.offer_id) == (req.instance_id, "job-contract",
                                                           offer.id)
    assert got.state != ProviderState.TERMINATED
    assert req.instance_id in {i.instance_id for i in provider.list()}
    provider.terminate(req.instance_id)


def test_get_of_an_unknown_instance_is_instance_not_found(provider: Provider) -> None:
    with pytest.raises(InstanceNotFound):
        provider.get("i-never-launched")


def test_terminate_is_final_and_idempotent(provider: Provider) -> None:
    offer = an_offer(provider)
    keep, doomed = (request_for(provider, offer, f"job-{n}") for n in ("keep", "doomed"))
    provider.launch(keep)
    provider.launch(doomed)
    provider.terminate(doomed.instance_id)
    try:
        assert provider.get(doomed.instance_id).state == ProviderState.TERMINATED
    except InstanceNotFound:
        pass  # gone altogether: as good
    listed = {i.instance_id for i in provider.list()}
    assert doomed.instance_id not in listed and keep.instance_id in listed
    provider.terminate(doomed.instance_id)  # again: nothing to do, no error
    provider.terminate("i-never-launched")  # unknown: done already
    assert provider.get(keep.instance_id).state != ProviderState.TERMINATED
    provider.terminate(keep.instance_id)


def test_on_route_answers_none_or_an_address_and_can_be_repeated(provider: Provider) -> None:
    offer = an_offer(provider)
    req = request_for(provider, offer, "job-route")
    provider.launch(req)
    first = provider.on_route("job-route", req.instance_id)
    again = provider.on_route("job-route", req.instance_id)
    assert first is None or isinstance(first, str)
    assert again in (None, first)
    provider.terminate(req.instance_id)
