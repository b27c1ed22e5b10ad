"""Offers and prices read from EC2: hardware, zones and live spot prices.

The types offered are those of the on-demand table (market/aws_prices.py);
for them EC2 answers the hardware (``describe_instance_types``), the zones
that sell them (``describe_instance_type_offerings``) and the spot price in
effect now per type and zone (``describe_spot_price_history``), each read
across all its pages. market/aws_prices.py turns them into Offers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from gpuscout.domain import Offer
from gpuscout.market.aws_prices import (
    Hardware,
    OnDemandPrice,
    SpotQuote,
    build_offers,
    latest_spot_prices,
)
from gpuscout.providers.aws.ec2 import Ec2


def fetch_offers(ec2: Ec2, region: str, table: Mapping[str, OnDemandPrice], *,
                 usable_zones: Collection[str] | None = None) -> list[Offer]:
    """Spot and on-demand offers of ``table``'s types in ``region``;
    ``usable_zones``: only these zones (None: every zone)."""
    names = sorted(table)
    if not names:
        return []
    type_filter = [{"Name": "instance-type", "Values": names}]
    hardware = {t["InstanceType"]: hardware_of(t) for t in ec2.pages(
        "describe_instance_types", "InstanceTypes", Filters=type_filter)}
    zones: dict[str, set[str]] = {}
    for o in ec2.pages("describe_instance_type_offerings", "InstanceTypeOfferings",
                       LocationType="availability-zone", Filters=type_filter):
        zones.setdefault(o["InstanceType"], set()).add(o["Location"])
    if usable_zones is not None:
        zones = {t: z & set(usable_zones) for t, z in zones.items()}
    # StartTime=now: AWS answers the price in effect now for each type and zone.
    quotes = [
        SpotQuote(instance_type=q["InstanceType"], zone=q["AvailabilityZone"],
                  price_per_hour=float(q["SpotPrice"]), timestamp=as_datetime(q["Timestamp"]))
        for q in ec2.pages("describe_spot_price_history", "SpotPriceHistory",
                           InstanceTypes=names, ProductDescriptions=["Linux/UNIX"],
                           StartTime=datetime.now(UTC))
    ]
    return build_offers(region, table, hardware, zones, latest_spot_prices(quotes))


def hardware_of(t: dict[str, Any]) -> Hardware:
    """An instance type's hardware, from its ``describe_instance_types`` entry."""
    gpus = t.get("GpuInfo", {}).get("Gpus", [])
    return Hardware(
        instance_type=t["InstanceType"],
        gpus=sum(int(g.get("Count", 0)) for g in gpus),
        gpu_type=str(gpus[0]["Name"]) if gpus else None,
        vcpus=float(t["VCpuInfo"]["DefaultVCpus"]),
        memory_gb=float(t["MemoryInfo"]["SizeInMiB"]) / 1024.0,
    )


def as_datetime(value: Any) -> datetime:
    """A timestamp as botocore parses it (or its ISO 8601 text), in UTC if naive."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


__all__ = ["as_datetime", "fetch_offers", "hardware_of"]
