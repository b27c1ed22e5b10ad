"""Which offers may take a job now, and could any offer of a catalog ever
hold it? Pure.

``eligible`` is the one filter placement (``place_job``), moves
(``decide_move``), the simulator's baselines and ``gpuscout plan`` use: the
offer fits the job's ``Resources`` (``Offer.shortfall``, the domain), it
is available, and it is not spot in a zone avoided after an interruption
notice; ``why_ineligible`` says which of these fails.

``fits_catalog`` asks ``Offer.shortfall`` of a whole catalog,
availability aside, so a job that no offer could ever hold is refused when it
is submitted instead of waiting forever. Its reason names the closest miss:
the first requirement, in ``Offer.shortfall``'s order, that leaves no offer,
and what the catalog has instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace

from gpuscout.domain import Capacity, Offer, Resources

# Why an offer that fits is out for now (``why_ineligible``).
NO_CAPACITY = "no capacity now"
AVOIDED_ZONE = "spot in a zone avoided after an interruption notice"


def zone_key(offer: Offer) -> str:
    """The offer's zone as avoided zones name it: "provider:zone"."""
    return f"{offer.provider}:{offer.zone}"


def in_avoided_zone(offer: Offer, avoid_zones: Collection[str]) -> bool:
    """Spot in one of ``avoid_zones`` ("provider:zone"), whose capacity was
    just reclaimed (``ZONE_BACKOFF_S``). On-demand there is not affected."""
    return offer.capacity == Capacity.SPOT and zone_key(offer) in avoid_zones


def why_ineligible(offer: Offer, resources: Resources,
                   avoid_zones: Collection[str] = frozenset()) -> str | None:
    """Why ``offer`` cannot take a job needing ``resources`` now, or None
    if it can: the first requirement it does not meet (``Offer.shortfall``),
    else no capacity now, else spot in an avoided zone."""
    short = offer.shortfall(resources)
    if short is not None:
        return short
    if not offer.available:
        return NO_CAPACITY
    if in_avoided_zone(offer, avoid_zones):
        return AVOIDED_ZONE
    return None


def eligible(offer: Offer, resources: Resources,
             avoid_zones: Collection[str] = frozenset()) -> bool:
    """``offer`` may take a job needing ``resources`` now (``why_ineligible``)."""
    return why_ineligible(offer, resources, avoid_zones) is None

# At most this many names in a list of what the catalog has instead.
_MAX_NAMES = 8


# Resources that every offer meets; one requirement at a time is set on it.
_NOTHING = Resources(gpus=0, cpus=0, memory_gb=0)


@dataclass(frozen=True, slots=True)
class _Requirement:
    alone: Resources  # this one requirement, for Offer.satisfies
    clause: str  # "has 8 GPUs", "is in region X": "no offer ..."
    qualifier: str  # "with 8 GPUs", "in region X": "no offer ... has 64 vCPUs"
    instead: Callable[[Sequence[Offer]], str]  # what the offers have instead


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def _names(values: Iterable[str | None]) -> str:
    names = sorted({v for v in values if v}, key=str.lower)
    if len(names) > _MAX_NAMES:
        return ", ".join(names[:_MAX_NAMES]) + f", ... ({len(names)} in all)"
    return ", ".join(names) or "none"


def _most(key: Callable[[Offer], float], show: Callable[[Offer], str]
          ) -> Callable[[Sequence[Offer]], str]:
    def instead(offers: Sequence[Offer]) -> str:
        best = max(offers, key=lambda o: (key(o), o.instance_type))
        return f"the most: {show(best)} on {best.instance_type}"
    return instead


def _listed(what: str, value: Callable[[Offer], str | None]
            ) -> Callable[[Sequence[Offer]], str]:
    return lambda offers: f"{what}: {_names(value(o) for o in offers)}"


def _requirements(r: Resources) -> list[_Requirement]:
    """Each constraint ``r`` sets, alone, in ``Offer.shortfall``'s order."""
    def gpu_count(o: Offer) -> str:
        return f"{o.gpus} x {o.gpu_type}" if o.gpus and o.gpu_type else _plural(o.gpus, "GPU")

    def has(what: str) -> tuple[str, str]:
        return f"has {what}", f"with {what}"

    types = _listed("types", lambda o: o.gpu_type)
    capacity = r.capacity.value if r.capacity is not None else ""
    candidates = [
        (r.gpus > 0, replace(_NOTHING, gpus=r.gpus), has(_plural(r.gpus, "GPU")),
         _most(lambda o: o.gpus, gpu_count)),
        (bool(r.gpu_type), replace(_NOTHING, gpu_type=r.gpu_type),
         has(f"GPU type {r.gpu_type}"), types),
        (bool(r.gpu_types), replace(_NOTHING, gpu_types=r.gpu_types),
         has(f"GPU type {' or '.join(r.gpu_types)}"), types),
        (r.cpus > 0, replace(_NOTHING, cpus=r.cpus), has(_plural(r.cpus, "vCPU")),
         _most(lambda o: o.vcpus, lambda o: f"{o.vcpus:g}")),
        (r.memory_gb > 0, replace(_NOTHING, memory_gb=r.memory_gb),
         has(f"{r.memory_gb:g} GB memory"),
         _most(lambda o: o.memory_gb, lambda o: f"{o.memory_gb:g} GB")),
        (r.capacity is not None, replace(_NOTHING, capacity=r.capacity),
         (f"is {capacity}", f"on {capacity}"),
         _listed("capacities", lambda o: o.capacity.value)),
        (bool(r.instance_type), replace(_NOTHING, instance_type=r.instance_type),
         (f"is a {r.instance_type}", f"on {r.instance_type}"),
         _listed("types", lambda o: o.instance_type)),
        (bool(r.region), replace(_NOTHING, region=r.region),
         (f"is in region {r.region}", f"in region {r.region}"),
         _listed("regions", lambda o: o.region)),
        (bool(r.zone), replace(_NOTHING, zone=r.zone),
         (f"is in zone {r.zone}", f"in zone {r.zone}"), _listed("zones", lambda o: o.zone)),
    ]
    return [_Requirement(alone, clause, qualifier, instead)
            for given, alone, (clause, qualifier), instead in candidates if given]


def _joined(qualifiers: Sequence[str]) -> str:
    """"with 1 GPU", "with GPU type V100", "in zone z" -> "with 1 GPU and GPU
    type V100 and in zone z"."""
    out = list(qualifiers[:1])
    for prev, q in zip(qualifiers, qualifiers[1:], strict=False):
        out.append(q.removeprefix("with ") if prev.startswith("with ") else q)
    return " and ".join(out)


def fits_catalog(resources: Resources, offers: Iterable[Offer]) -> str | None:
    """None if some offer in ``offers`` could ever hold a job needing
    ``resources`` (availability and price aside), else a one-line reason
    naming the closest miss, e.g. "no offer has 1000 GPUs (the most: 8 x
    A100 on p4d.24xlarge)", "no offer has GPU type H100 (types: A100, K80,
    T4, V100)", "no offer with 8 GPUs has GPU type T4 (types: A100, V100)".

    Each requirement is checked alone with ``Offer.satisfies`` (no
    matching logic of its own here), in ``Offer.shortfall``'s order; the first
    that leaves no offer is the one reported. If some offer of the catalog
    meets it alone, the earlier requirements that narrowed the offers are
    named ("no offer with GPU type V100 has 32 vCPUs (the most: 8 on
    p3.2xlarge)"), and what is listed instead is from those offers.
    """
    catalog = list(offers)
    if any(o.satisfies(resources) for o in catalog):
        return None
    if not catalog:
        return "the catalog has no offers"
    pool = catalog
    narrowed: list[str] = []
    for req in _requirements(resources):
        left = [o for o in pool if o.satisfies(req.alone)]
        if not left:
            if narrowed and any(o.satisfies(req.alone) for o in catalog):
                return (f"no offer {_joined(narrowed)} {req.clause} "
                        f"({req.instead(pool)})")
            return f"no offer {req.clause} ({req.instead(catalog)})"
        if len(left) < len(pool):
            narrowed.append(req.qualifier)
        pool = left
    # Unreachable while _requirements mirrors Offer.shortfall; say something useful.
    return f"no offer fits: {catalog[0].shortfall(resources)}"
