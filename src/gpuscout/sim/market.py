"""A market trace indexed for the simulator: prices and capacity per offer
as step functions of time (epoch seconds), and the offer snapshot at any
instant, built once per change and shared by every job."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpuscout.domain import Offer
from gpuscout.market.combined import offer_template
from gpuscout.market.history import CapacityHistory
from gpuscout.market.trace import TraceRow
from gpuscout.policy import Offers


@dataclass(slots=True)
class _Series:
    times: list[float]
    prices: list[float]
    available: list[bool]
    # Start of each unavailable stretch (an available -> unavailable change).
    drops: list[float]


class SimMarket:
    """Offers from trace rows. ``hardware`` overrides the hardware of an
    instance type (an Offer whose gpus, speed, ... are used)."""

    def __init__(self, rows: Sequence[TraceRow],
                 hardware: Mapping[str, Offer] | None = None) -> None:
        if not rows:
            raise ValueError("the market trace has no rows")
        rows = sorted(rows, key=lambda r: r.timestamp)
        hardware = dict(hardware or {})
        self.templates: dict[str, Offer] = {}
        self.series: dict[str, _Series] = {}
        changes: list[tuple[float, TraceRow]] = []
        for r in rows:
            t = r.timestamp.timestamp()
            oid = r.offer_id
            if oid not in self.templates:
                base = hardware.get(r.instance_type) or offer_template(r.instance_type)
                self.templates[oid] = base.with_(
                    id=oid, provider=r.provider, region=r.region, zone=r.zone,
                    capacity=r.capacity, price_per_hour=r.price_per_hour, available=r.available)
                self.series[oid] = _Series([], [], [], [])
            s = self.series[oid]
            if s.times and s.times[-1] == t:
                s.prices[-1], s.available[-1] = r.price_per_hour, r.available
            else:
                if s.available and s.available[-1] and not r.available:
                    s.drops.append(t)
                s.times.append(t)
                s.prices.append(r.price_per_hour)
                s.available.append(r.available)
            changes.append((t, r))
        self.start = changes[0][0]
        self.end = changes[-1][0]
        self.times: list[float] = sorted({t for t, _ in changes})
        self._rows_by_time = changes
        self._snapshots: list[Offers] = []
        self._build_snapshots()

    def _build_snapshots(self) -> None:
        # Each snapshot is what a scout would see at that instant, with the
        # capacity losses per day it would have seen so far (as the live
        # control plane annotates its offers).
        current: dict[str, Offer] = {}
        history = CapacityHistory()
        i = 0
        for t in self.times:
            while i < len(self._rows_by_time) and self._rows_by_time[i][0] <= t:
                r = self._rows_by_time[i][1]
                current[r.offer_id] = self.templates[r.offer_id].with_(
                    price_per_hour=r.price_per_hour, available=r.available)
                i += 1
            self._snapshots.append(Offers(history.observe(t, current.values())).ranked())

    # --- queries -----------------------------------------------------------

    def version(self, t: float) -> int:
        """Index of the snapshot in force at ``t`` (-1 before the trace)."""
        return bisect_right(self.times, t) - 1

    def offers(self, t: float) -> Offers:
        """Every offer at ``t``, ranked cheapest per work hour first."""
        v = self.version(t)
        return self._snapshots[v] if v >= 0 else Offers(())

    def next_change(self, t: float) -> float:
        i = bisect_right(self.times, t)
        return self.times[i] if i < len(self.times) else math.inf

    def _at(self, offer_id: str, t: float) -> int:
        return bisect_right(self.series[offer_id].times, t) - 1

    def price(self, offer_id: str, t: float) -> float:
        i = self._at(offer_id, t)
        return self.series[offer_id].prices[max(i, 0)]

    def available(self, offer_id: str, t: float) -> bool:
        i = self._at(offer_id, t)
        return i >= 0 and self.series[offer_id].available[i]

    def next_unavailable(self, offer_id: str, t: float) -> float:
        """The first time after ``t`` at which the offer loses capacity
        (``t`` itself if it has none at ``t``)."""
        if not self.available(offer_id, t):
            return t
        drops = self.series[offer_id].drops
        i = bisect_right(drops, t)
        return drops[i] if i < len(drops) else math.inf

    def cost(self, offer_id: str, a: float, b: float) -> float:
        """Dollars for running on the offer from ``a`` to ``b`` (seconds)."""
        if b <= a:
            return 0.0
        s = self.series[offer_id]
        i = max(0, bisect_right(s.times, a) - 1)
        total, t = 0.0, a
        while t < b:
            nxt = s.times[i + 1] if i + 1 < len(s.times) else math.inf
            seg_end = min(b, nxt)
            total += s.prices[i] * (seg_end - t)
            t = seg_end
            i += 1
        return total / 3600.0

    def offer(self, offer_id: str, t: float) -> Offer:
        return self.templates[offer_id].with_(price_per_hour=self.price(offer_id, t),
                                              available=self.available(offer_id, t))
