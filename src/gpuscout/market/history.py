"""How steady each offer's spot capacity has been lately.

Spot prices for a GPU type are often the same in every zone while capacity
is not (``../shared/traces/STATS.md``: p3.2xlarge is available 64% of the
time in a zone on average, but some zones far more than others). A
``CapacityHistory`` watches the market snapshots a scout takes (and the
interruptions and capacity errors the control plane meets) and annotates
each offer with the capacity losses per day it saw in a trailing window
(``Offer.interruptions_per_day``), so that among offers of the same cost the
steadier one is taken. The live scout and the simulator feed it the same
way; it only knows what it has seen, as a scout would.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

from gpuscout.domain import Offer

DAY_S = 86_400.0


@dataclass(slots=True)
class CapacityHistory:
    """Capacity losses per offer in the last ``window_s`` seconds."""

    window_s: float = DAY_S
    _losses: dict[str, list[float]] = field(default_factory=dict)
    _available: dict[str, bool] = field(default_factory=dict)

    def record_loss(self, offer_id: str, t: float) -> None:
        """An interruption or a capacity error on ``offer_id`` at ``t``
        (epoch seconds)."""
        losses = self._losses.setdefault(offer_id, [])
        if not losses or losses[-1] <= t:
            losses.append(t)

    def observe(self, t: float, offers: Iterable[Offer]) -> list[Offer]:
        """Take a snapshot at ``t``: an offer seen available that now is not
        lost its capacity. Returns the offers annotated with their rate."""
        out = []
        for o in offers:
            was = self._available.get(o.id)
            if was and not o.available:
                self.record_loss(o.id, t)
            self._available[o.id] = o.available
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

    def annotate(self, offer: Offer, t: float) -> Offer:
        r = self.rate(offer.id, t)
        return offer if r == offer.interruptions_per_day else offer.with_(
            interruptions_per_day=r)
