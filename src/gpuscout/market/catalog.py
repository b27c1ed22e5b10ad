"""Catalog of instance types: hardware, relative speed, reference prices.

Price *lookup* lives here; price *fetching* (trace replay, the AWS price
history) lives in the price feeds, which update the offers built from this
catalog. The local provider launches these offers as OS processes, so the
numbers only have to be realistic, not live.

Sources (read from ``../shared/traces``; no trace file is copied here):
- Spot prices: medians of the 2021 us-east-1 spot price history
  (``prices/lucianamarques-us-east-1-2021.csv.gz``, Linux/UNIX, 2021-03-02 to
  2021-05-31), per availability zone, as tabulated in ``traces/STATS.md``.
  The GPU types were flat in every zone for the whole 90 days; the CPU types
  moved a little, and their zones differ by a few percent (the ``f`` zone is
  the dearest), which is kept below.
- On-demand prices: ``prices/ondemand.csv`` for p3.2xlarge (3.06) and
  g4dn.xlarge (0.526), and m5.large (0.096, so m5.xlarge = 2 x 0.096 = 0.192);
  the AWS public us-east-1 list prices for p2.xlarge (0.90), g3.4xlarge (1.14)
  and c5.xlarge (0.17), which are not in that file.
- Zones: each type is offered in up to three zones among those where the
  trace has a price for it.
- Relative speed: GPU training throughput against one V100 (p3.2xlarge = 1.0);
  rough public figures (T4 ~ half a V100 in mixed precision, K80 ~ a quarter,
  M60 ~ 0.3); CPU-only types ~ 0.02. That is a GPU job's speed: a job that
  asks for no GPU sees every offer at 1.0 and is priced by the hour
  (``gpuscout.policy.offers_for``), so it goes to c5.xlarge, not g4dn.xlarge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpuscout.domain import Capacity, Offer

LOCAL_PROVIDER = "local"
LOCAL_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class InstanceType:
    """One instance type with the prices GPU Scout uses as its reference."""

    name: str
    gpus: int
    gpu_type: str | None
    vcpus: float
    memory_gb: float  # GiB, as AWS lists it
    relative_speed: float  # training throughput, V100 = 1.0
    on_demand_price: float  # $/h, the same in every zone of the region
    spot_price_by_zone: Mapping[str, float] = field(default_factory=dict)  # $/h

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(self.spot_price_by_zone)


INSTANCE_TYPES: tuple[InstanceType, ...] = (
    InstanceType(
        "p3.2xlarge", gpus=1, gpu_type="V100", vcpus=8, memory_gb=61,
        relative_speed=1.0, on_demand_price=3.06,
        spot_price_by_zone={"us-east-1a": 0.918, "us-east-1b": 0.918, "us-east-1f": 0.918},
    ),
    InstanceType(
        "g4dn.xlarge", gpus=1, gpu_type="T4", vcpus=4, memory_gb=16,
        relative_speed=0.5, on_demand_price=0.526,
        spot_price_by_zone={"us-east-1a": 0.1578, "us-east-1b": 0.1578, "us-east-1f": 0.1578},
    ),
    InstanceType(
        "p2.xlarge", gpus=1, gpu_type="K80", vcpus=4, memory_gb=61,
        relative_speed=0.25, on_demand_price=0.90,
        spot_price_by_zone={"us-east-1a": 0.27, "us-east-1b": 0.27, "us-east-1c": 0.27},
    ),
    InstanceType(
        "g3.4xlarge", gpus=1, gpu_type="M60", vcpus=16, memory_gb=122,
        relative_speed=0.3, on_demand_price=1.14,
        spot_price_by_zone={"us-east-1a": 0.342, "us-east-1c": 0.342, "us-east-1d": 0.342},
    ),
    InstanceType(
        "m5.xlarge", gpus=0, gpu_type=None, vcpus=4, memory_gb=16,
        relative_speed=0.02, on_demand_price=0.192,
        spot_price_by_zone={"us-east-1a": 0.0747, "us-east-1b": 0.0739, "us-east-1f": 0.0786},
    ),
    InstanceType(
        "c5.xlarge", gpus=0, gpu_type=None, vcpus=4, memory_gb=8,
        relative_speed=0.02, on_demand_price=0.17,
        spot_price_by_zone={"us-east-1a": 0.0691, "us-east-1b": 0.0686, "us-east-1f": 0.0784},
    ),
)

_BY_NAME: dict[str, InstanceType] = {t.name: t for t in INSTANCE_TYPES}


def instance_type(name: str) -> InstanceType:
    """The catalog entry for ``name``; KeyError if the catalog lacks it."""
    return _BY_NAME[name]


def offers_for(
    itype: InstanceType, *, provider: str = LOCAL_PROVIDER, region: str = LOCAL_REGION
) -> list[Offer]:
    """A spot and an on-demand offer of ``itype`` in each of its zones."""
    offers: list[Offer] = []
    for zone, spot_price in itype.spot_price_by_zone.items():
        prices = ((Capacity.SPOT, spot_price), (Capacity.ON_DEMAND, itype.on_demand_price))
        for capacity, price in prices:
            offers.append(
                Offer(
                    id=Offer.make_id(provider, zone, itype.name, capacity),
                    provider=provider,
                    region=region,
                    zone=zone,
                    instance_type=itype.name,
                    capacity=capacity,
                    gpus=itype.gpus,
                    gpu_type=itype.gpu_type,
                    vcpus=itype.vcpus,
                    memory_gb=itype.memory_gb,
                    price_per_hour=price,
                    available=True,
                    relative_speed=itype.relative_speed,
                )
            )
    return offers


def default_local_catalog() -> list[Offer]:
    """Every offer the local provider sells: all types x zones x capacities.

    A fresh list each call (offers are immutable; the list is the caller's).
    """
    return [offer for itype in INSTANCE_TYPES for offer in offers_for(itype)]
