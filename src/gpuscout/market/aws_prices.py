"""AWS prices: the on-demand table and the offer builder for the aws provider.

Price *lookup* for on-demand capacity is a small table in the package
(``data/aws_ondemand.csv``): AWS's on-demand list prices change rarely, and
the Pricing API needs permissions and a region of its own. Spot prices are
*fetched* live by the provider (``describe_spot_price_history``); this module
only turns what it fetched into offers, and feeds them to the offer table
(``AwsPriceFeed``). No boto3 here.

Table sources (one per row, in the ``source`` column): the two rows marked
``traces/prices/ondemand.csv`` come from ``../shared/traces/prices/
ondemand.csv``; the others are the AWS public on-demand list prices for Linux
in us-east-1. ``relative_speed`` is training throughput against one V100
(p3.2xlarge = 1.0), rough public figures (T4 ~ 0.5, A10G ~ 0.9, L4 ~ 0.7)
times the instance's GPU count: the policy compares cost per unit of work.
The CPU-only rows (m5, c5, r5: for jobs that ask for no GPU) carry 0.02, a
GPU job's speed on them; a job that asks for no GPU is priced by the hour on
every offer (``gpuscout.policy.offers_for``), so it never reads that number.
Only the types in the table are offered: it is also the list of supported
types (add a row to support another).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from io import StringIO
from typing import TYPE_CHECKING

from gpuscout.domain import Capacity, Offer

if TYPE_CHECKING:
    from gpuscout.db import Repository

AWS_PROVIDER = "aws"


@dataclass(frozen=True, slots=True)
class OnDemandPrice:
    region: str
    instance_type: str
    price_per_hour: float
    relative_speed: float


@dataclass(frozen=True, slots=True)
class Hardware:
    """What ``describe_instance_types`` says about one type."""

    instance_type: str
    gpus: int
    gpu_type: str | None
    vcpus: float
    memory_gb: float  # GiB


@dataclass(frozen=True, slots=True)
class SpotQuote:
    instance_type: str
    zone: str
    price_per_hour: float
    timestamp: datetime


def load_ondemand_table(text: str | None = None) -> dict[tuple[str, str], OnDemandPrice]:
    """The table by (region, instance type); ``text`` replaces the packaged CSV."""
    if text is None:
        text = resources.files("gpuscout.market").joinpath("data/aws_ondemand.csv").read_text()
    table: dict[tuple[str, str], OnDemandPrice] = {}
    for row in csv.DictReader(StringIO(text)):
        price = OnDemandPrice(
            region=row["region"].strip(), instance_type=row["instance_type"].strip(),
            price_per_hour=float(row["ondemand_usd_per_hour"]),
            relative_speed=float(row["relative_speed"]),
        )
        if price.price_per_hour <= 0 or price.relative_speed <= 0:
            raise ValueError(f"aws_ondemand.csv: {price.instance_type} needs positive numbers")
        table[(price.region, price.instance_type)] = price
    return table


def latest_spot_prices(quotes: Iterable[SpotQuote]) -> dict[tuple[str, str], SpotQuote]:
    """The newest quote per (instance type, zone); history pages come in any order."""
    latest: dict[tuple[str, str], SpotQuote] = {}
    for q in quotes:
        key = (q.instance_type, q.zone)
        if key not in latest or q.timestamp > latest[key].timestamp:
            latest[key] = q
    return latest


def build_offers(
    region: str,
    table: Mapping[str, OnDemandPrice],
    hardware: Mapping[str, Hardware],
    zones: Mapping[str, Iterable[str]],
    spot: Mapping[tuple[str, str], SpotQuote],
) -> list[Offer]:
    """An on-demand offer per type and zone, and a spot offer where the zone
    has a spot price. Types without hardware info (not sold in the region)
    are left out. Sorted by id, so the same inputs give the same list."""
    offers: list[Offer] = []
    for name, price in table.items():
        hw = hardware.get(name)
        if hw is None:
            continue
        for zone in sorted(set(zones.get(name, ()))):
            quotes = [(Capacity.ON_DEMAND, price.price_per_hour)]
            quote = spot.get((name, zone))
            if quote is not None:
                quotes.append((Capacity.SPOT, quote.price_per_hour))
            for capacity, per_hour in quotes:
                offers.append(Offer(
                    id=Offer.make_id(AWS_PROVIDER, zone, name, capacity),
                    provider=AWS_PROVIDER, region=region, zone=zone, instance_type=name,
                    capacity=capacity, gpus=hw.gpus, gpu_type=hw.gpu_type, vcpus=hw.vcpus,
                    memory_gb=hw.memory_gb, price_per_hour=per_hour, available=True,
                    relative_speed=price.relative_speed,
                ))
    return sorted(offers, key=lambda o: o.id)


class AwsPriceFeed:
    """GPUSCOUT_MARKET=aws: the offer table follows the aws provider's offers.

    ``source`` is the provider's ``offers`` (cached there for its refresh
    interval); each tick after ``refresh_s`` writes what changed. An offer
    that disappears from the source (a type no longer sold in a zone, a zone
    without a spot price) is kept, marked unavailable, so jobs and
    migrations that name it still resolve.
    """

    name = "aws"
    manual = False

    def __init__(self, source: Callable[[], list[Offer]], refresh_s: float = 300.0) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self._known: dict[str, Offer] = {}
        self._last: datetime | None = None
        self._synced: datetime | None = None

    def start(self, repo: Repository, now: datetime) -> None:
        self._known = {}
        self._last = None
        # Until a first fetch succeeds, the table holds what a previous run
        # wrote: as old as this start at least.
        self._synced = now
        self.tick(repo, now)

    def synced_at(self) -> datetime | None:
        """When the source last answered (``SyncedFeed``): a source that
        keeps failing (credentials expired, the API down) leaves the offers
        to age until the scout stops acting on them."""
        return self._synced

    def tick(self, repo: Repository, now: datetime) -> int:
        if self._last is not None and (now - self._last).total_seconds() < self.refresh_s:
            return 0
        self._last = now
        fresh = {o.id: o for o in self.source()}
        for offer_id, old in self._known.items():
            if offer_id not in fresh:
                fresh[offer_id] = old.with_(available=False)
        changed = [o for i, o in fresh.items() if self._known.get(i) != o]
        if changed:
            repo.seed_offers(changed, now, overwrite=True)
        self._known = fresh
        self._synced = now
        return len(changed)
