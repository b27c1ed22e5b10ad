"""Trace format, replay at a speed factor, and the price feeds."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.db import open_repository
from gpuscout.domain import Capacity
from gpuscout.market.catalog import default_local_catalog
from gpuscout.market.feeds import ManualFeed, TraceFeed, open_feed
from gpuscout.market.trace import TraceError, TraceReplay, TraceRow, read_trace, write_trace

T0 = datetime(2021, 3, 2, tzinfo=UTC)
HEADER = "timestamp,provider,region,zone,instance_type,capacity,price_per_hour,available\n"
P3A = "local:us-east-1a:p3.2xlarge:spot"


def row(minutes: float, price: float, available: bool = True, zone: str = "us-east-1a"
        ) -> TraceRow:
    return TraceRow(T0 + timedelta(minutes=minutes), "local", "us-east-1", zone, "p3.2xlarge",
                    Capacity.SPOT, price, available)


def test_trace_round_trips_exactly(tmp_path: Path) -> None:
    rows = [row(0, 0.918), row(5, 0.1 + 0.2, False), row(7, 1 / 3, zone="us-east-1b")]
    for name in ("t.csv", "t.csv.gz"):
        write_trace(tmp_path / name, rows)
        assert read_trace(tmp_path / name) == rows


def test_rows_are_sorted_by_time(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "2021-03-02T00:10:00Z,local,us-east-1,us-east-1a,p3.2xlarge,spot,"
                    "0.5,1\n2021-03-02T00:00:00Z,local,us-east-1,us-east-1a,p3.2xlarge,spot,"
                    "0.9,0\n")
    assert [r.price_per_hour for r in read_trace(path)] == [0.9, 0.5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("timestamp,provider\n", "missing column"),
        (HEADER + "yesterday,local,r,z,p3.2xlarge,spot,0.5,1\n", ":2:"),
        (HEADER + "2021-03-02T00:00:00Z,local,r,z,p3.2xlarge,reserved,0.5,1\n", "reserved"),
        (HEADER + "2021-03-02T00:00:00Z,local,r,z,p3.2xlarge,spot,cheap,1\n", "cheap"),
        (HEADER + "2021-03-02T00:00:00Z,local,r,z,p3.2xlarge,spot,0.5,maybe\n", "available"),
    ],
)
def test_bad_traces_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_missing_trace_file() -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace("/nonexistent/trace.csv")


def test_replay_maps_trace_time_at_the_speed_factor() -> None:
    rows = [row(0, 1.0), row(60, 0.5), row(120, 0.25)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    replay = TraceReplay(rows, start, speed=60)  # one trace hour per real minute
    assert replay.due(start) == rows[:1]
    assert replay.due(start + timedelta(seconds=59)) == []
    assert replay.due(start + timedelta(seconds=60)) == rows[1:2]
    assert replay.due(start + timedelta(seconds=600)) == rows[2:]
    assert replay.finished
    with pytest.raises(ValueError):
        TraceReplay(rows, start, speed=0)


def test_trace_feed_updates_offers_as_time_passes(tmp_path: Path) -> None:
    repo = open_repository(f"sqlite:///{tmp_path / 'db.sqlite'}")
    rows = [row(0, 0.9), row(1, 0.3, available=False)]
    feed = TraceFeed(default_local_catalog(), rows, speed=60)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    feed.start(repo, start)
    assert len(repo.list_offers()) == len(default_local_catalog())
    assert repo.get_offer(P3A).price_per_hour == 0.9
    assert feed.tick(repo, start + timedelta(seconds=0.5)) == 0
    assert feed.tick(repo, start + timedelta(seconds=1)) == 1
    offer = repo.get_offer(P3A)
    assert (offer.price_per_hour, offer.available) == (0.3, False)
    assert feed.manual is False


def test_trace_of_an_unknown_instance_type_is_refused(tmp_path: Path) -> None:
    repo = open_repository(f"sqlite:///{tmp_path / 'db.sqlite'}")
    rows = [TraceRow(T0, "local", "us-east-1", "us-east-1a", "x9.huge", Capacity.SPOT, 1, True)]
    with pytest.raises(TraceError, match="x9.huge"):
        TraceFeed(default_local_catalog(), rows).start(repo, T0)


def test_manual_feed_keeps_prices_users_set_across_restarts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    repo = open_repository(url)
    ManualFeed(default_local_catalog()).start(repo, T0)
    repo.update_offer(P3A, T0, price_per_hour=0.1)
    ManualFeed(default_local_catalog()).start(open_repository(url), T0)
    assert open_repository(url).get_offer(P3A).price_per_hour == 0.1


def test_open_feed(tmp_path: Path) -> None:
    assert open_feed("manual", default_local_catalog()).manual
    path = tmp_path / "t.csv"
    write_trace(path, [row(0, 0.5)])
    feed = open_feed(f"trace:{path}@30", default_local_catalog())
    assert isinstance(feed, TraceFeed) and feed.speed == 30
    with pytest.raises(ValueError, match="speed"):
        open_feed(f"trace:{path}@fast", default_local_catalog())
