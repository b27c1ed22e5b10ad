"""Placement: the best offer for a job spec. Pure.

Offers are compared by cost per unit of work (price / relative speed), so a
cheap slow instance does not beat a fast one that finishes sooner for less.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from gpuscout.domain import Capacity, Offer, Resources


def rank_key(o: Offer) -> tuple[float, float, float, str]:
    """Cheapest per work hour first; ties to the steadier, then faster offer."""
    return (o.cost_per_work_hour, o.interruptions_per_day, -o.relative_speed, o.id)


class Offers:
    """A snapshot of offers with queries that read as sentences:
    ``Offers(snapshot).available().compatible(resources).cheapest()``."""

    def __init__(self, offers: Iterable[Offer], *, _ranked: bool = False) -> None:
        self._offers = tuple(offers)
        self._ranked = _ranked

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._offers)

    def __len__(self) -> int:
        return len(self._offers)

    def available(self) -> Offers:
        return Offers((o for o in self._offers if o.available), _ranked=self._ranked)

    def compatible(self, resources: Resources) -> Offers:
        return Offers((o for o in self._offers if o.satisfies(resources)), _ranked=self._ranked)

    def excluding(self, offer_ids: Collection[str]) -> Offers:
        return Offers((o for o in self._offers if o.id not in offer_ids), _ranked=self._ranked)

    def sorted_by_cost(self) -> list[Offer]:
        # Ties go to the offer whose capacity has been steadier lately (GPU
        # spot prices are often the same in every zone while capacity is
        # not), then to the faster machine, then to the id, so the choice is
        # deterministic for a snapshot.
        if self._ranked:
            return list(self._offers)
        return sorted(self._offers, key=rank_key)

    def ranked(self) -> Offers:
        """Sorted once, cheapest per work hour first; a scout pass over many
        jobs ranks the snapshot once and walks it per job."""
        return self if self._ranked else Offers(self.sorted_by_cost(), _ranked=True)

    def cheapest(self) -> Offer | None:
        ranked = self.sorted_by_cost()
        return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class Placement:
    offer: Offer
    reason: str


def choose_offer(
    resources: Resources, offers: Iterable[Offer], *, exclude: Collection[str] = (),
    avoid_zones: Collection[str] = (),
) -> Placement | None:
    """The cheapest available offer that fits, or None if nothing fits.
    Spot offers in ``avoid_zones`` ("provider:zone") are left out."""
    candidates = Offers(offers).available().compatible(resources).excluding(exclude)
    if avoid_zones:
        candidates = Offers(o for o in candidates if not (
            o.capacity == Capacity.SPOT and f"{o.provider}:{o.zone}" in avoid_zones))
    best = candidates.cheapest()
    if best is None:
        return None
    return Placement(
        offer=best,
        reason=(
            f"cheapest available compatible offer: {best.id} at "
            f"${best.price_per_hour:.4f}/h (${best.cost_per_work_hour:.4f} per work hour)"
        ),
    )
