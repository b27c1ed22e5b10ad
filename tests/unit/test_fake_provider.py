"""FakeProvider keeps the Provider contract and does what tests script."""

from __future__ import annotations

import pytest

from gpuscout.domain import Capacity, Offer
from gpuscout.market.catalog import default_local_catalog
from gpuscout.providers import (
    CapacityError,
    FakeProvider,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    Provider,
    ProviderState,
)


@pytest.fixture
def offer() -> Offer:
    return next(o for o in default_local_catalog() if o.capacity == Capacity.SPOT)


def request(offer: Offer, instance_id: str = "i-1", job_id: str = "j-1") -> LaunchRequest:
    return LaunchRequest(
        instance_id=instance_id, job_id=job_id, offer=offer, command="true",
        store_url="file:///tmp/store",
    )


def test_is_a_provider_with_the_local_catalog_by_default() -> None:
    fake = FakeProvider()
    assert isinstance(fake, Provider)
    assert fake.offers() == default_local_catalog()


def test_launch_is_pending_then_running_and_records_the_request(offer: Offer) -> None:
    fake = FakeProvider()
    req = request(offer)
    launched = fake.launch(req)
    assert launched.state == ProviderState.PENDING
    assert (launched.instance_id, launched.job_id, launched.offer_id) == ("i-1", "j-1", offer.id)
    assert fake.launch_calls == [req]
    assert fake.get("i-1").state == ProviderState.RUNNING
    assert [i.instance_id for i in fake.list()] == ["i-1"]
    assert fake.request_of("i-1") is req


def test_refs_and_addresses_are_deterministic(offer: Offer) -> None:
    def run() -> list[tuple[str, str | None]]:
        fake = FakeProvider(base_port=9000)
        return [
            (p.provider_ref, p.address)
            for p in (fake.launch(request(offer, f"i-{n}")) for n in range(3))
        ]

    assert run() == run() == [
        ("fake-1", "127.0.0.1:9001"), ("fake-2", "127.0.0.1:9002"), ("fake-3", "127.0.0.1:9003"),
    ]


def test_address_for_points_instances_anywhere(offer: Offer) -> None:
    fake = FakeProvider(address_for=lambda req, n: f"agent-{req.instance_id}-{n}:80")
    assert fake.launch(request(offer, "i-7")).address == "agent-i-7-1:80"


def test_held_pending_until_marked_running(offer: Offer) -> None:
    fake = FakeProvider(auto_run=False)
    fake.launch(request(offer))
    assert fake.get("i-1").state == ProviderState.PENDING
    fake.mark_running("i-1")
    assert fake.get("i-1").state == ProviderState.RUNNING


def test_next_launch_error_fails_once_and_is_recorded(offer: Offer) -> None:
    fake = FakeProvider()
    fake.next_launch_error = LaunchError("quota")
    with pytest.raises(LaunchError, match="quota"):
        fake.launch(request(offer, "i-1"))
    fake.launch(request(offer, "i-2"))
    assert [r.instance_id for r in fake.launch_calls] == ["i-1", "i-2"]
    with pytest.raises(InstanceNotFound):
        fake.get("i-1")


def test_unavailable_offers_raise_capacity_error(offer: Offer) -> None:
    fake = FakeProvider()
    fake.unavailable_offers.add(offer.id)
    with pytest.raises(CapacityError) as info:
        fake.launch(request(offer))
    assert info.value.offer_id == offer.id
    fake.unavailable_offers.clear()
    fake.launch(request(offer))


def test_offer_marked_unavailable_in_the_request_raises_capacity_error(offer: Offer) -> None:
    with pytest.raises(CapacityError):
        FakeProvider().launch(request(offer.with_(available=False)))


def test_a_reused_instance_id_is_refused(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    with pytest.raises(LaunchError):
        fake.launch(request(offer))


def test_terminate_is_idempotent_and_not_found_is_done(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    fake.terminate("i-1")
    fake.terminate("i-1")
    fake.terminate("nope")
    assert fake.terminate_calls == ["i-1", "i-1", "nope"]
    assert fake.get("i-1").state == ProviderState.TERMINATED
    assert fake.list() == []


def test_next_terminate_error_leaves_the_instance_running(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    fake.next_terminate_error = LaunchError("api down")
    with pytest.raises(LaunchError):
        fake.terminate("i-1")
    assert fake.get("i-1").state == ProviderState.RUNNING
    fake.terminate("i-1")
    assert fake.get("i-1").state == ProviderState.TERMINATED


def test_die_terminates_without_a_terminate_call(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    fake.die("i-1")
    assert fake.get("i-1").state == ProviderState.TERMINATED
    assert fake.terminate_calls == []
    with pytest.raises(InstanceNotFound):
        fake.die("unknown")


def test_interruption_notice_is_reported_by_get_and_list(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    assert not fake.get("i-1").interruption_notice
    fake.notify_interruption("i-1")
    assert fake.get("i-1").interruption_notice
    assert fake.list()[0].interruption_notice
    assert fake.get("i-1").state == ProviderState.RUNNING


def test_forget_makes_get_raise_not_found(offer: Offer) -> None:
    fake = FakeProvider()
    fake.launch(request(offer))
    fake.terminate("i-1")
    fake.forget("i-1")
    with pytest.raises(InstanceNotFound):
        fake.get("i-1")
    fake.terminate("i-1")  # still fine


def test_list_keeps_launch_order_and_skips_terminated(offer: Offer) -> None:
    fake = FakeProvider()
    for n in range(4):
        fake.launch(request(offer, f"i-{n}"))
    fake.die("i-1")
    fake.terminate("i-2")
    assert fake.running_ids() == ["i-0", "i-3"]


def test_custom_catalog_is_copied(offer: Offer) -> None:
    catalog = [offer]
    fake = FakeProvider(catalog)
    catalog.clear()
    returned = fake.offers()
    returned.clear()
    assert fake.offers() == [offer]
