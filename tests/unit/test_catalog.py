"""The local catalog states the market facts of traces/STATS.md and ondemand.csv."""

from __future__ import annotations

import pytest

from gpuscout.domain import Capacity, Offer, Resources
from gpuscout.market.catalog import default_local_catalog, instance_type


def _offers(instance_type_name: str, capacity: Capacity) -> list[Offer]:
    return [
        o
        for o in default_local_catalog()
        if o.instance_type == instance_type_name and o.capacity == capacity
    ]


@pytest.mark.parametrize(
    ("name", "on_demand", "spot"),
    [("p3.2xlarge", 3.06, 0.918), ("g4dn.xlarge", 0.526, 0.1578)],
)
def test_prices_match_the_traces(name: str, on_demand: float, spot: float) -> None:
    od = _offers(name, Capacity.ON_DEMAND)
    sp = _offers(name, Capacity.SPOT)
    assert len(od) >= 2 and len(sp) >= 2, "offered in at least two zones"
    assert {o.price_per_hour for o in od} == {on_demand}
    assert {o.price_per_hour for o in sp} == {spot}


def test_ids_are_unique_and_made_by_offer_make_id() -> None:
    offers = default_local_catalog()
    assert len({o.id for o in offers}) == len(offers)
    for o in offers:
        assert o.id == Offer.make_id(o.provider, o.zone, o.instance_type, o.capacity)
        assert o.provider == "local" and o.region == "us-east-1"
        assert o.zone.startswith("us-east-1")
        assert o.available


def test_every_zone_of_a_type_has_both_capacities() -> None:
    offers = default_local_catalog()
    keys = {(o.instance_type, o.zone) for o in offers}
    for itype, zone in keys:
        caps = {o.capacity for o in offers if (o.instance_type, o.zone) == (itype, zone)}
        assert caps == {Capacity.SPOT, Capacity.ON_DEMAND}


def test_gpu_spot_is_about_thirty_percent_of_on_demand() -> None:
    offers = default_local_catalog()
    gpu_types = {o.instance_type for o in offers if o.gpus > 0}
    assert {"p3.2xlarge", "g4dn.xlarge", "p2.xlarge", "g3.4xlarge"} <= gpu_types
    for name in gpu_types:
        od = instance_type(name).on_demand_price
        for spot in _offers(name, Capacity.SPOT):
            assert spot.price_per_hour / od == pytest.approx(0.30, abs=0.005)


def test_cpu_spot_differs_a_little_between_zones() -> None:
    # The 2021 trace shows small zone differences for the CPU types only.
    m5 = {o.price_per_hour for o in _offers("m5.xlarge", Capacity.SPOT)}
    assert len(m5) > 1
    assert max(m5) / min(m5) < 1.2


def test_relative_speed_ranks_v100_first_and_cpu_last() -> None:
    speed = {o.instance_type: o.relative_speed for o in default_local_catalog()}
    assert speed["p3.2xlarge"] == 1.0
    assert speed["p3.2xlarge"] > speed["g4dn.xlarge"] > speed["g3.4xlarge"] > speed["p2.xlarge"]
    assert speed["p2.xlarge"] > speed["m5.xlarge"] == speed["c5.xlarge"] > 0


def test_hardware_satisfies_the_obvious_requests() -> None:
    p3 = _offers("p3.2xlarge", Capacity.SPOT)[0]
    assert p3.satisfies(Resources(gpus=1, gpu_type="v100", cpus=8, memory_gb=61))
    assert not _offers("m5.xlarge", Capacity.SPOT)[0].satisfies(Resources(gpus=1))


def test_each_call_returns_a_fresh_list() -> None:
    first = default_local_catalog()
    first.clear()
    assert default_local_catalog()
