"""One market from the raw traces: spot prices from the price history,
spot capacity from the availability traces, on-demand always available at
its list price (one on-demand offer per zone the market names).

An offer with no capacity is unavailable; the simulator preempts an
instance on it with a 2-minute notice. So is a spot offer while its price
is above the on-demand price of its type and region: a spot request's
maximum price defaults to the on-demand price on EC2, and an instance whose
spot price rises above its maximum is interrupted (in the 2009-2013 bidding
era, prices spiked to 2.5x on-demand and more; a bid at the on-demand price
was the common choice).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from gpuscout.domain import Capacity, Offer
from gpuscout.market.loaders import AvailabilitySeries, availability_rows
from gpuscout.market.trace import TraceRow

# Hardware of the instance types the traces name: gpus, gpu type, vcpus,
# memory (GiB), training speed against one V100. Types not listed are
# CPU-only with speed 1.0 (their work is measured on that type itself).
HARDWARE: dict[str, tuple[int, str | None, float, float, float]] = {
    "p3.2xlarge": (1, "V100", 8, 61, 1.0),
    "p3.8xlarge": (4, "V100", 32, 244, 4.0),
    "p3.16xlarge": (8, "V100", 64, 488, 8.0),
    "p3dn.24xlarge": (8, "V100", 96, 768, 8.5),
    "p2.xlarge": (1, "K80", 4, 61, 0.25),
    "p2.8xlarge": (8, "K80", 32, 488, 2.0),
    "p2.16xlarge": (16, "K80", 64, 732, 4.0),
    "g4dn.xlarge": (1, "T4", 4, 16, 0.5),
    "g4dn.2xlarge": (1, "T4", 8, 32, 0.5),
    "g4dn.4xlarge": (1, "T4", 16, 64, 0.5),
    "g4dn.8xlarge": (1, "T4", 32, 128, 0.5),
    "g4dn.12xlarge": (4, "T4", 48, 192, 2.0),
    "g4dn.16xlarge": (1, "T4", 64, 256, 0.5),
    "g3s.xlarge": (1, "M60", 4, 30.5, 0.3),
    "g3.4xlarge": (1, "M60", 16, 122, 0.3),
    "g3.8xlarge": (2, "M60", 32, 244, 0.6),
    "g3.16xlarge": (4, "M60", 64, 488, 1.2),
    "g2.2xlarge": (1, "K520", 8, 15, 0.15),
    "g2.8xlarge": (4, "K520", 32, 60, 0.6),
    "cg1.4xlarge": (2, "M2050", 16, 22.5, 0.1),
}


def offer_template(instance_type: str) -> Offer:
    """An offer carrying ``instance_type``'s hardware (placeholders for the rest)."""
    gpus, gpu_type, vcpus, memory, speed = HARDWARE.get(instance_type, (0, None, 1, 1, 1.0))
    return Offer(id="", provider="", region="", zone="", instance_type=instance_type,
                 capacity=Capacity.SPOT, gpus=gpus, gpu_type=gpu_type, vcpus=vcpus,
                 memory_gb=memory, price_per_hour=0.0, available=True, relative_speed=speed)


def flat_spot_prices(price_rows: Iterable[TraceRow]) -> dict[str, float]:
    """instance type -> median spot price over all its zones and changes
    (what an availability trace of another year is priced at)."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in price_rows:
        if r.capacity == Capacity.SPOT:
            by_type[r.instance_type].append(r.price_per_hour)
    return {t: statistics.median(v) for t, v in by_type.items()}


def _merge(prices: Sequence[TraceRow], capacity: Sequence[TraceRow]) -> list[TraceRow]:
    """One spot series from a price series and a capacity series of the
    same offer: a row wherever either changes."""
    events = sorted([(r.timestamp, 0, r) for r in prices] + [(r.timestamp, 1, r) for r in capacity],
                    key=lambda e: (e[0], e[1]))
    price: float | None = None
    available: bool | None = None
    out: list[TraceRow] = []
    template = capacity[0] if capacity else prices[0]
    for ts, kind, r in events:
        if kind == 0:
            price = r.price_per_hour
        else:
            available = r.available
        if price is None or available is None:
            continue
        if out and out[-1].timestamp == ts:
            out.pop()
        out.append(TraceRow(ts, template.provider, template.region, template.zone,
                            template.instance_type, Capacity.SPOT, price, available))
    return out


def combined_market(
    *, price_rows: Sequence[TraceRow] = (), availability: Sequence[AvailabilitySeries] = (),
    ondemand: Mapping[tuple[str, str], float] | None = None,
    spot_price: Mapping[str, float] | None = None, nodes: int = 1,
    start: datetime | None = None, max_price_ondemand: bool = True,
) -> list[TraceRow]:
    """Trace rows for one market, sorted by time.

    - Offers with an availability series take their capacity from it and
      their price from ``price_rows`` of the same (type, zone) when those
      cover the series' time, else ``spot_price[type]``, else the type's
      median price in ``price_rows``.
    - Spot offers in ``price_rows`` with no availability series are always
      available.
    - Each (region, zone, type) named gets an on-demand offer at
      ``ondemand[(region, type)]``, available from the market's first instant.
    - With ``max_price_ondemand`` (EC2's default maximum price), a spot
      offer has no capacity while its price is above that on-demand price.
    """
    flat = {**flat_spot_prices(price_rows), **(spot_price or {})}
    prices_by_offer: dict[str, list[TraceRow]] = defaultdict(list)
    for r in price_rows:
        prices_by_offer[r.offer_id].append(r)
    rows: list[TraceRow] = []
    covered: set[str] = set()
    for series in availability:
        price = flat.get(series.instance_type)
        if price is None:
            raise ValueError(f"no spot price for {series.instance_type} "
                             f"(zone {series.zone}): give spot_price")
        cap = availability_rows(series, price_per_hour=price, nodes=nodes)
        if not cap:
            continue
        covered.add(cap[0].offer_id)
        own = prices_by_offer.get(cap[0].offer_id, [])
        if own and own[0].timestamp <= series.start and own[-1].timestamp >= series.start:
            rows.extend(_merge(own, cap))
        else:
            rows.extend(cap)
    for offer_id, series_rows in prices_by_offer.items():
        if offer_id not in covered:
            rows.extend(series_rows)
    if ondemand is not None and max_price_ondemand:
        rows = [r.with_available(False) if r.capacity == Capacity.SPOT and r.available
                and r.price_per_hour > ondemand.get((r.region, r.instance_type), math.inf)
                else r for r in rows]
    if ondemand is not None and rows:
        first = start or min(r.timestamp for r in rows)
        seen = sorted({(r.provider, r.region, r.zone, r.instance_type) for r in rows})
        for provider, region, zone, itype in seen:
            od = ondemand.get((region, itype))
            if od is not None:
                rows.append(TraceRow(first, provider, region, zone, itype, Capacity.ON_DEMAND,
                                     od, True))
    rows.sort(key=lambda r: r.timestamp)
    return rows


__all__ = ["HARDWARE", "combined_market", "flat_spot_prices", "offer_template"]
