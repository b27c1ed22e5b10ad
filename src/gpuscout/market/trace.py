"""The market trace format (DESIGN.md) and its replay.

CSV, one row per change: timestamp (ISO 8601 UTC), provider, region, zone,
instance_type, capacity (spot | on-demand), price_per_hour, available (1|0).
A value holds until the next row for the same offer.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpuscout.domain import Capacity, Offer

COLUMNS = (
    "timestamp", "provider", "region", "zone", "instance_type", "capacity",
    "price_per_hour", "available",
)


class TraceError(ValueError):
    """A trace file that does not follow the format; names file, line, field."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp: datetime
    provider: str
    region: str
    zone: str
    instance_type: str
    capacity: Capacity
    price_per_hour: float
    available: bool

    @property
    def offer_id(self) -> str:
        return Offer.make_id(self.provider, self.zone, self.instance_type, self.capacity)

    def with_available(self, available: bool) -> TraceRow:
        return dataclasses.replace(self, available=available)


def parse_timestamp(text: str) -> datetime:
    ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def read_trace(path: str | Path) -> list[TraceRow]:
    """All rows, sorted by time (stable for equal timestamps)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    rows: list[TraceRow] = []
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)  # type: ignore[arg-type]
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(TraceRow(
                    timestamp=parse_timestamp(rec["timestamp"]),
                    provider=rec["provider"], region=rec["region"], zone=rec["zone"],
                    instance_type=rec["instance_type"], capacity=Capacity(rec["capacity"]),
                    price_per_hour=float(rec["price_per_hour"]),
                    available=_parse_bool(rec["available"]),
                ))
            except (ValueError, KeyError) as err:
                raise TraceError(f"{path}:{line}: {err}") from err
    rows.sort(key=lambda r: r.timestamp)
    return rows


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"available must be 1 or 0, got {text!r}")


def write_trace(path: str | Path, rows: Iterable[TraceRow]) -> None:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([
                r.timestamp.isoformat().replace("+00:00", "Z"), r.provider, r.region, r.zone,
                r.instance_type, r.capacity.value, repr(r.price_per_hour), int(r.available),
            ])


class TraceReplay:
    """Replays a trace against wall (or simulated) time at ``speed``x.

    The trace's first timestamp is mapped to ``started_at``; ``due(now)``
    returns the rows whose trace time has come since the previous call.
    """

    def __init__(self, rows: Sequence[TraceRow], started_at: datetime, speed: float = 1.0):
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.rows = list(rows)
        self.speed = speed
        self.started_at = started_at
        self.trace_start = self.rows[0].timestamp if self.rows else started_at
        self._next = 0

    def trace_time(self, now: datetime) -> datetime:
        return self.trace_start + (now - self.started_at) * self.speed

    def due(self, now: datetime) -> list[TraceRow]:
        horizon = self.trace_time(now)
        start = self._next
        while self._next < len(self.rows) and self.rows[self._next].timestamp <= horizon:
            self._next += 1
        return self.rows[start:self._next]

    @property
    def finished(self) -> bool:
        return self._next >= len(self.rows)


def apply_rows(offers: dict[str, Offer], rows: Iterable[TraceRow], hardware: dict[str, Offer]
               ) -> dict[str, Offer]:
    """New offer values after ``rows``. ``hardware`` maps an instance type to
    an offer that carries its hardware (from the catalog); a row for a type
    not in it is an error that names the type."""
    result = dict(offers)
    for row in rows:
        current = result.get(row.offer_id)
        if current is None:
            template = hardware.get(row.instance_type)
            if template is None:
                raise TraceError(f"instance type {row.instance_type!r} is not in the catalog")
            current = template.with_(
                id=row.offer_id, provider=row.provider, region=row.region, zone=row.zone,
                capacity=row.capacity,
            )
        result[row.offer_id] = current.with_(
            price_per_hour=row.price_per_hour, available=row.available
        )
    return result
