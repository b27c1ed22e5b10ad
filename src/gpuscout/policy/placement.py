"""Placement: the best offer for a job spec. Pure.

Offers are compared by cost per unit of work (price / relative speed), so a
cheap slow instance does not beat a fast one that finishes sooner for less.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from gpuscout.domain import Offer, Resources


class Offers:
    """A snapshot of offers with queries that read as sentences:
    ``Offers(snapshot).available().compatible(resources).cheapest()``."""

    def __init__(self, offers: Iterable[Offer]) -> None:
        self._offers = tuple(offers)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._offers)

    def __len__(self) -> int:
        return len(self._offers)

    def available(self) -> Offers:
        return Offers(o for o in self._offers if o.available)

    def compatible(self, resources: Resources) -> Offers:
        return Offers(o for o in self._offers if o.satisfies(resources))

    def excluding(self, offer_ids: Collection[str]) -> Offers:
        return Offers(o for o in self._offers if o.id not in offer_ids)

    def sorted_by_cost(self) -> list[Offer]:
        # Ties go to the faster machine, then to the id, so the choice is
        # deterministic for a snapshot.
        return sorted(self._offers, key=lambda o: (o.cost_per_work_hour, -o.relative_speed, o.id))

    def cheapest(self) -> Offer | None:
        ranked = self.sorted_by_cost()
        return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class Placement:
    offer: Offer
    reason: str


def choose_offer(
    resources: Resources, offers: Iterable[Offer], *, exclude: Collection[str] = ()
) -> Placement | None:
    """The cheapest available offer that fits, or None if nothing fits."""
    best = Offers(offers).available().compatible(resources).excluding(exclude).cheapest()
    if best is None:
        return None
    return Placement(
        offer=best,
        reason=(
            f"cheapest available compatible offer: {best.id} at "
            f"${best.price_per_hour:.4f}/h (${best.cost_per_work_hour:.4f} per work hour)"
        ),
    )
