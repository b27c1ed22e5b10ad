"""``/api/v1/offers``: the market as the scout sees it, and manual changes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from gpuscout.api.deps import PlaneDep, Reader, Writer
from gpuscout.api.errors import UNREADABLE_BODY, answers
from gpuscout.api.schemas import OfferPublic, OffersPublic, OfferUpdate
from gpuscout.domain import Capacity

router = APIRouter(prefix="/offers", tags=["offers"], dependencies=[Reader])


@router.get("", summary="Offers, by id")
def list_offers(
    plane: PlaneDep, available: bool | None = None, capacity: Capacity | None = None,
) -> OffersPublic:
    # The market as the scout sees it, not repo.list_offers(): an offer that
    # just failed to launch is shown unavailable while the scout skips it,
    # and the demo's offers only while its job lives.
    offers = [
        o for o in plane.market()
        if (available is None or o.available == available)
        and (capacity is None or o.capacity == capacity)
    ]
    return OffersPublic(data=[OfferPublic.from_domain(o) for o in offers], count=len(offers))


@router.patch("/{offer_id}", dependencies=[Writer],
              summary="Set an offer's price and/or availability (manual market only; 409 "
                      "otherwise)",
              responses=answers({400: UNREADABLE_BODY, 404: "no offer with this id",
                                 409: "the market is not manual, or the offer is one of the "
                                      "demo's scripted offers"}))
def update_offer(
    offer_id: str, plane: PlaneDep,
    body: Annotated[OfferUpdate, Body(openapi_examples={
        "price": {"summary": "a new price", "value": {"price_per_hour": 0.42}},
        "gone": {"summary": "capacity gone", "value": {"available": False}},
    })],
) -> OfferPublic:
    offer = plane.update_offer(offer_id, price_per_hour=body.price_per_hour,
                               available=body.available)
    return OfferPublic.from_domain(offer)
