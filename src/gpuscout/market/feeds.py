"""Price feeds: what updates the offers the scout reads.

A feed seeds the offer table at start and, on each ``tick``, writes the
changes that are due. The database is the one place offers live, so the API,
the scout and the dashboard all read the same snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpuscout.db import Repository
from gpuscout.domain import Offer
from gpuscout.market.trace import TraceReplay, TraceRow, apply_rows, read_trace


class PriceFeed(Protocol):
    name: str
    # Whether users may set prices and availability (PATCH /offers/{id}).
    manual: bool

    def start(self, repo: Repository, now: datetime) -> None: ...

    def tick(self, repo: Repository, now: datetime) -> int:
        """Apply due changes; return how many offers changed."""
        ...


@runtime_checkable
class SyncedFeed(Protocol):
    """A feed that knows when it last brought the offer table up to date
    with its market: the scout acts on no offers older than
    ``MovePolicy.max_offer_age_s`` (Karpenter's ``Synced()`` guard). A feed
    without it (manual: the table is the market) is always current."""

    def synced_at(self) -> datetime | None:
        """When the offers last matched the market; None: not yet known."""
        ...


class ManualFeed:
    """Offers from the catalog; changes come only from users (API, CLI)."""

    name = "manual"
    manual = True

    def __init__(self, catalog: Sequence[Offer]) -> None:
        self.catalog = list(catalog)

    def start(self, repo: Repository, now: datetime) -> None:
        # Keep what users set before a restart.
        repo.seed_offers(self.catalog, now, overwrite=False)

    def tick(self, repo: Repository, now: datetime) -> int:
        return 0


class TraceFeed:
    """Replays a market trace at ``speed``x real time from ``start``."""

    manual = False

    def __init__(self, catalog: Sequence[Offer], rows: Sequence[TraceRow], speed: float = 1.0,
                 name: str = "trace") -> None:
        self.catalog = list(catalog)
        self.hardware = {o.instance_type: o for o in self.catalog}
        self.rows = list(rows)
        self.speed = speed
        self.name = name
        self.replay: TraceReplay | None = None
        self._offers: dict[str, Offer] = {}
        self._synced_at: datetime | None = None

    @classmethod
    def from_spec(cls, spec: str, catalog: Sequence[Offer]) -> TraceFeed:
        """``PATH[@SPEED]``, as in GPUSCOUT_MARKET=trace:PATH@60."""
        path, _, speed = spec.partition("@")
        try:
            factor = float(speed) if speed else 1.0
        except ValueError as err:
            raise ValueError(f"trace speed must be a number, got {speed!r}") from err
        return cls(catalog, read_trace(Path(path)), factor, name=f"trace:{path}")

    def start(self, repo: Repository, now: datetime) -> None:
        self.replay = TraceReplay(self.rows, now, self.speed)
        # Offers the trace names start from the catalog's hardware; the rows
        # due at the trace's first instant set their first price.
        self._offers = {o.id: o for o in self.catalog}
        self._offers = apply_rows(self._offers, self.replay.due(now), self.hardware)
        repo.seed_offers(self._offers.values(), now, overwrite=True)
        self._synced_at = now

    def tick(self, repo: Repository, now: datetime) -> int:
        if self.replay is None:
            self.start(repo, now)
            return len(self._offers)
        rows = self.replay.due(now)
        changed = {r.offer_id for r in rows}
        if rows:
            self._offers = apply_rows(self._offers, rows, self.hardware)
            repo.seed_offers([self._offers[i] for i in changed], now, overwrite=True)
        self._synced_at = now  # every row due by now is in the table
        return len(changed)

    def synced_at(self) -> datetime | None:
        """The last tick: the replay is in process, so the table is as
        current as the loop that ticks it (``SyncedFeed``)."""
        return self._synced_at


def open_feed(market: str, catalog: Sequence[Offer]) -> PriceFeed:
    kind, _, rest = market.partition(":")
    if kind == "manual":
        return ManualFeed(catalog)
    if kind == "trace":
        return TraceFeed.from_spec(rest, catalog)
    raise ValueError(f"market {market!r} is not available here (use manual or trace:PATH)")
