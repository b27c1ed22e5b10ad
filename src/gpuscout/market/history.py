"""How steady each offer's spot capacity and price have been lately.

Spot prices for a GPU type are often the same in every zone while capacity
is not (``../shared/traces/STATS.md``: p3.2xlarge is available 64% of the
time in a zone on average, but some zones far more than others). A
``CapacityHistory`` watches the market snapshots a scout takes (and the
interruptions and capacity errors the control plane meets) and annotates
each offer with the capacity losses per day it saw in a trailing window
(``Offer.interruptions_per_day``), so that among offers of the same cost the
steadier one is taken.

It also keeps each offer's prices over the same window and annotates the
offer with how often its price changed (``Offer.price_changes_per_day``)
and its time-weighted mean price while it could be had
(``Offer.mean_price_per_hour``): the move policy expects a price that keeps
changing to go back towards that mean, so that a gap between two offers
that keeps flipping is not taken to last for the rest of a job. The live
scout and the simulator feed it the same way; it only knows what it has
seen, as a scout would.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gpuscout.domain import Offer, PriceHistory

DAY_S = 86_400.0


@dataclass(slots=True)
class _Prices:
    """One offer's price and capacity as seen, one point per change of
    either (the value holds until the next point), and the start of each
    of its prices (when it was first seen, then each price change)."""

    times: list[float]
    prices: list[float]
    available: list[bool]
    starts: list[float]
    # The history as of the latest point, once worked out (it only changes
    # with a new point), and the last offer annotated with it: between
    # changes every snapshot reuses both (a simulated market takes tens of
    # thousands of snapshots).
    history: PriceHistory | None = None
    worked_out: bool = False
    annotated: tuple[Offer, float, Offer] | None = None  # (offer in, losses per day, out)

    def see(self, t: float, price: float, available: bool) -> None:
        if t < self.times[-1]:
            return  # out of order: keep the newer view
        if t == self.times[-1]:  # a second look at the same instant replaces the first
            self.worked_out = False
            if len(self.times) == 1:
                self.prices[0], self.available[0] = price, available
                return
            self.times.pop()
            self.prices.pop()
            self.available.pop()
            if self.starts[-1] == t:
                self.starts.pop()
        if price == self.prices[-1] and available == self.available[-1]:
            return
        if price != self.prices[-1]:
            self.starts.append(t)
        self.worked_out = False
        self.times.append(t)
        self.prices.append(price)
        self.available.append(available)

    def prune(self, start: float) -> int:
        """Forget what ended before ``start`` (when it is most of what is
        kept); the index of the point in force at ``start`` afterwards."""
        i = max(0, bisect_right(self.times, start) - 1)
        if i > len(self.times) // 2:
            del self.times[:i], self.prices[:i], self.available[:i]
            i = 0
        # The holds that ended before the window: starts[k + 1] <= start.
        k = bisect_right(self.starts, start) - 1
        if k > len(self.starts) // 2:
            del self.starts[:k]
        return i


@dataclass(slots=True)
class CapacityHistory:
    """Capacity losses and price changes per offer in the last ``window_s``
    seconds. A day: spot demand follows the working day, so a shorter
    window would take the quiet or the busy half of it for the whole."""

    window_s: float = DAY_S
    _losses: dict[str, list[float]] = field(default_factory=dict)
    _available: dict[str, bool] = field(default_factory=dict)
    _prices: dict[str, _Prices] = field(default_factory=dict)

    def record_loss(self, offer_id: str, t: float) -> None:
        """An interruption or a capacity error on ``offer_id`` at ``t``
        (epoch seconds)."""
        losses = self._losses.setdefault(offer_id, [])
        if not losses or losses[-1] <= t:
            losses.append(t)

    def observe(self, t: float, offers: Iterable[Offer]) -> list[Offer]:
        """Take a snapshot at ``t``: an offer seen available that now is not
        lost its capacity; a price that differs from the last one seen
        changed. Returns the offers annotated with their history."""
        out = []
        for o in offers:
            was = self._available.get(o.id)
            if was and not o.available:
                self.record_loss(o.id, t)
            self._available[o.id] = o.available
            track = self._prices.get(o.id)
            if track is None:
                self._prices[o.id] = _Prices([t], [o.price_per_hour], [o.available], [t])
            else:
                track.see(t, o.price_per_hour, o.available)
            out.append(self.annotate(o, t))
        return out

    def rate(self, offer_id: str, t: float) -> float:
        """Capacity losses per day on ``offer_id`` in the window before ``t``."""
        losses = self._losses.get(offer_id)
        if not losses:
            return 0.0
        recent = len(losses) - bisect_left(losses, t - self.window_s)
        if recent < len(losses) // 2:  # keep the list short
            del losses[: len(losses) - recent]
        return recent * DAY_S / self.window_s

    def points(self, offer_id: str) -> list[tuple[float, float, bool]]:
        """``offer_id``'s (time, price, available) as seen, one point per
        change, oldest first (about the last window: older points are
        pruned as the history is worked out); a copy, for display."""
        track = self._prices.get(offer_id)
        if track is None:
            return []
        return list(zip(list(track.times), list(track.prices), list(track.available),
                        strict=False))

    def price_history(self, offer_id: str, t: float) -> PriceHistory | None:
        """How ``offer_id``'s price moved in the window before its latest
        change (``PriceHistory``; the first price seen counts from when it
        was first seen); None when it did not change in the window before
        ``t``. Taken as of the latest change, so that it holds until the
        next one."""
        return self._history(self._prices.get(offer_id), t)

    def _history(self, track: _Prices | None, t: float) -> PriceHistory | None:
        if track is None or len(track.starts) < 2 or track.starts[-1] <= t - self.window_s:
            return None
        if not track.worked_out:
            track.history = self._work_out(track)
            track.worked_out = True
        return track.history

    def _work_out(self, track: _Prices) -> PriceHistory | None:
        end = track.times[-1]
        start = end - self.window_s
        i = track.prune(start)
        starts, times, prices, available = track.starts, track.times, track.prices, track.available
        lo = max(start, times[0])
        paid = held = 0.0
        for k in range(i, len(times) - 1):
            a, b = max(times[k], lo), times[k + 1]
            if b > a and available[k]:
                paid += prices[k] * (b - a)
                held += b - a
        if held <= 0:
            return None  # never available in the window: nothing to go by
        mean = paid / held
        # The holds that ended in the window, and each hold's price (the
        # one in force at its start) less the mean, the current one last.
        first = max(0, bisect_right(starts, start) - 1)
        holds = tuple(b - a for a, b in zip(starts[first:], starts[first + 1:], strict=False))
        at = [prices[max(0, bisect_right(times, x) - 1)] for x in starts[first:]]
        level = [p - mean for p in at]
        var = sum(d * d for d in level[:-1])
        cov = sum(d * e for d, e in zip(level, level[1:], strict=False))
        correlation = max(-1.0, min(1.0, cov / var)) if var > 0 else 0.0
        return PriceHistory(datetime.fromtimestamp(starts[-1], UTC), holds, tuple(at[:-1]),
                            mean, correlation)

    def annotate(self, offer: Offer, t: float) -> Offer:
        r = self.rate(offer.id, t)
        track = self._prices.get(offer.id)
        prices = self._history(track, t)
        if r == offer.interruptions_per_day and prices is offer.price_history:
            return offer
        if track is None:
            return offer.with_(interruptions_per_day=r, price_history=prices)
        last = track.annotated
        if (last is not None and last[0] is offer and last[1] == r
                and last[2].price_history is prices):
            return last[2]
        out = offer.with_(interruptions_per_day=r, price_history=prices)
        track.annotated = (offer, r, out)
        return out
