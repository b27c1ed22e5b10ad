"""Placement: the best offer for a job spec. Pure.

Offers are compared by cost per unit of work (price / relative speed), so a
cheap slow instance does not beat a fast one that finishes sooner for less.
Relative speed is a GPU speed; a job that asks for no GPU sees every offer at
speed 1.0 (``offers_for``), so it is priced by the hour.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from gpuscout.domain import Offer, Resources
from gpuscout.policy.eligibility import eligible


def rank_key(o: Offer) -> tuple[float, float, float, str]:
    """Cheapest per work hour first; ties to the steadier, then faster offer."""
    return (o.cost_per_work_hour, o.interruptions_per_day, -o.relative_speed, o.id)


class Offers:
    """A snapshot of offers with queries that read as sentences:
    ``Offers(snapshot).eligible(resources, avoid_zones).cheapest()``."""

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

    def eligible(self, resources: Resources, avoid_zones: Collection[str] = frozenset()
                 ) -> Offers:
        """The offers a job needing ``resources`` may take now
        (``policy.eligibility.eligible``: compatible, available, not spot
        in one of ``avoid_zones``)."""
        return Offers((o for o in self._offers if eligible(o, resources, avoid_zones)),
                      _ranked=self._ranked)

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


# What a work hour means, by the job's resources (``pricing``).
GPU_PRICING = "GPU work (V100 = 1.0)"
CPU_PRICING = "CPU work (no GPU asked; $/h)"


def pricing(resources: Resources) -> str:
    """The measure a job's offers are ranked by, in words (``gpuscout plan``)."""
    return GPU_PRICING if resources.asks_for_gpu else CPU_PRICING


def offer_for(resources: Resources, offer: Offer) -> Offer:
    """``offer`` as a job needing ``resources`` sees it (see ``offers_for``)."""
    if resources.asks_for_gpu or offer.relative_speed == 1.0:
        return offer
    return offer.with_(relative_speed=1.0)


def offers_for(resources: Resources, offers: Iterable[Offer]) -> Offers:
    """The offers as a job needing ``resources`` sees them: the one place the
    policy decides what a unit of the job's work costs on each offer
    (``place_job``, ``decide_move``, the simulator's baselines, the control
    plane's manual move and ``gpuscout plan`` all go through it).

    A job that asks for a GPU (``Resources.asks_for_gpu``) sees the offers
    as they are: ``relative_speed`` is GPU training throughput against one
    V100, and cost per work hour is price / relative speed.

    A job that asks for no GPU sees every offer at relative speed 1.0, so its
    cost per work hour is the price per hour: its work does not go faster on
    a GPU, and of the offers that fit it (enough vCPUs and memory, which
    ``Offer.satisfies`` checks) the cheapest per hour does the same work for
    less (a c5.xlarge at 0.069 $/h, not a g4dn.xlarge at 0.158 $/h). This is
    how SkyPilot's optimizer ranks a task without a time estimator
    (``sky/optimizer.py``: "Defaulting the task's estimated time to 1 hour"
    on every candidate, so the cheapest hourly price wins) and how Karpenter
    picks among the instance types that fit a pod's CPU and memory requests
    (by price). A vCPU-based speed (work proportional to vCPUs) was not
    chosen: a job asks for ``cpus`` and is not known to use more, so it
    would favour large instances whose extra cores sit idle, and vCPUs of
    different families are not equal either.

    An ``Offers`` in which no speed changes is returned as it is (a ranked
    snapshot stays ranked); otherwise the result is ranked when asked.
    """
    if isinstance(offers, Offers) and (
            resources.asks_for_gpu or all(o.relative_speed == 1.0 for o in offers)):
        return offers
    return Offers(offer_for(resources, o) for o in offers)
