"""Loaders for the raw market traces in ``../shared/traces`` (SOURCES.md).

Each loader reads one raw file and returns ``TraceRow`` values in the
market trace format of DESIGN.md (one row per change); nothing is copied
into the repository. ``combined.py`` joins them into one market.

- spot price history (``prices/*.csv.gz``): one series per (type, zone) of
  the chosen product (Linux/UNIX); AWS re-emits unchanged prices, so only
  changes become rows.
- availability and preemption traces (``availability/``, ``preemption/``,
  skypilot-org/spot-traces): ``{"metadata": {"gap_seconds": N}, "data": [...]}``,
  one value per tick, the number of spot instances available; 0 means no
  capacity. The start time comes from the folder name (``aws-02-15-2023``).
- on-demand list prices (``prices/ondemand.csv``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpuscout.domain import Capacity
from gpuscout.market.trace import TraceError, TraceRow, parse_timestamp

ENV_TRACES_DIR = "GPUSCOUT_TRACES_DIR"
PRODUCT_LINUX = "Linux/UNIX"

# The spot-traces file names say the accelerator and node size, not the
# instance type; SOURCES.md names the types.
TRACE_INSTANCE_TYPES = {
    "v100_1": "p3.2xlarge",
    "v100_8": "p3.16xlarge",
    "k80_1": "p2.xlarge",
    "k80_8": "p2.8xlarge",
    "intel_64": "r5.16xlarge",
    "c3-88": "c3-highcpu-88",
}


def traces_dir(path: str | Path | None = None) -> Path:
    """The traces folder: ``path``, else $GPUSCOUT_TRACES_DIR, else
    ``<repo>/../shared/traces``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_TRACES_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "traces"


def _open_text(path: Path) -> io.TextIOBase:
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


# --- spot price history -------------------------------------------------------


def load_spot_prices(
    path: str | Path, *, instance_types: Collection[str] | None = None,
    zones: Collection[str] | None = None, product: str = PRODUCT_LINUX,
    provider: str = "aws",
) -> list[TraceRow]:
    """Spot price changes of ``product`` rows, one series per (type, zone),
    sorted by time. Every spot offer in the file counts as available (the
    price files say nothing about capacity)."""
    path = Path(path)
    last: dict[tuple[str, str], float] = {}
    rows: list[TraceRow] = []
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)  # type: ignore[arg-type]
        need = ("timestamp", "region", "availability_zone", "instance_type", "product",
                "spot_price_usd_per_hour")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, rec in enumerate(reader, start=2):
            if rec["product"] != product:
                continue
            itype, zone = rec["instance_type"], rec["availability_zone"]
            if instance_types is not None and itype not in instance_types:
                continue
            if zones is not None and zone not in zones:
                continue
            try:
                price = float(rec["spot_price_usd_per_hour"])
                ts = parse_timestamp(rec["timestamp"])
            except ValueError as err:
                raise TraceError(f"{path}:{line}: {err}") from err
            key = (itype, zone)
            if last.get(key) == price:
                continue  # re-emitted, unchanged
            last[key] = price
            rows.append(TraceRow(ts, provider, rec["region"], zone, itype, Capacity.SPOT,
                                 price, True))
    rows.sort(key=lambda r: r.timestamp)
    return rows


# --- availability / preemption traces ----------------------------------------


@dataclass(frozen=True, slots=True)
class AvailabilitySeries:
    """One spot-traces file: capacity per tick from ``start``."""

    zone: str
    region: str
    instance_type: str
    start: datetime
    gap_seconds: float
    values: tuple[int, ...]
    provider: str = "aws"

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.gap_seconds * len(self.values))


_FOLDER_DATE = re.compile(r"^(?P<provider>[a-z]+)-(?P<m>\d\d)-(?P<d>\d\d)-(?P<y>\d{4})$")


def _region_of(zone: str) -> str:
    # AWS: us-east-1a -> us-east-1; GCP: us-central1-a -> us-central1.
    if re.match(r".*-[a-z]$", zone):
        return zone[:-2]
    return zone[:-1]


def read_availability(path: str | Path, *, start: datetime | None = None,
                      instance_type: str | None = None) -> AvailabilitySeries:
    """One availability/preemption JSON. Its start time, zone and instance
    type come from its path unless given."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text())
        gap = float(doc["metadata"]["gap_seconds"])
        values = tuple(int(v) for v in doc["data"])
    except (ValueError, KeyError, TypeError) as err:
        raise TraceError(f"{path}: not an availability trace ({err})") from err
    if gap <= 0:
        raise TraceError(f"{path}: gap_seconds must be positive, got {gap}")
    folder = _FOLDER_DATE.match(path.parent.name)
    provider = folder["provider"] if folder else "aws"
    if start is None:
        if folder is None:
            raise TraceError(f"{path}: no start time (folder is not named like aws-02-15-2023)")
        start = datetime(int(folder["y"]), int(folder["m"]), int(folder["d"]), tzinfo=UTC)
    zone, _, kind = path.stem.partition("_")
    if instance_type is None:
        instance_type = TRACE_INSTANCE_TYPES.get(kind, kind)
    return AvailabilitySeries(zone=zone, region=_region_of(zone), instance_type=instance_type,
                              start=start, gap_seconds=gap, values=values, provider=provider)


def availability_rows(series: AvailabilitySeries, *, price_per_hour: float,
                      nodes: int = 1) -> list[TraceRow]:
    """Spot rows for one series at a flat price: available while at least
    ``nodes`` instances are; a row only where that changes (and the first)."""
    rows: list[TraceRow] = []
    previous: bool | None = None
    for i, value in enumerate(series.values):
        available = value >= nodes
        if available == previous:
            continue
        previous = available
        rows.append(TraceRow(series.start + timedelta(seconds=series.gap_seconds * i),
                             series.provider, series.region, series.zone,
                             series.instance_type, Capacity.SPOT, price_per_hour, available))
    return rows


def load_availability_dir(folder: str | Path, *, start: datetime | None = None,
                          instance_type: str | None = None) -> list[AvailabilitySeries]:
    """Every JSON in ``folder`` (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TraceError(f"{folder}: no such folder")
    return [read_availability(p, start=start, instance_type=instance_type)
            for p in sorted(folder.glob("*.json"))]


# --- on-demand list prices ----------------------------------------------------


def load_ondemand(path: str | Path) -> dict[tuple[str, str], float]:
    """(region, instance_type) -> on-demand $/h."""
    path = Path(path)
    out: dict[tuple[str, str], float] = {}
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)  # type: ignore[arg-type]
        for line, rec in enumerate(reader, start=2):
            try:
                out[(rec["region"], rec["instance_type"])] = float(rec["ondemand_usd_per_hour"])
            except (KeyError, ValueError, TypeError) as err:
                raise TraceError(f"{path}:{line}: {err}") from err
    return out


__all__ = [
    "ENV_TRACES_DIR", "PRODUCT_LINUX", "TRACE_INSTANCE_TYPES", "AvailabilitySeries",
    "availability_rows", "load_availability_dir", "load_ondemand", "load_spot_prices",
    "read_availability", "traces_dir",
]
