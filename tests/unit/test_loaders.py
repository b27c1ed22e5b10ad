"""Trace loaders: table tests on small synthetic files, smoke tests on the
real traces in ../shared/traces."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.domain import Capacity
from gpuscout.market.combined import combined_market, flat_spot_prices
from gpuscout.market.loaders import (
    availability_rows,
    load_availability_dir,
    load_ondemand,
    load_spot_prices,
    read_availability,
    traces_dir,
)
from gpuscout.market.trace import TraceError, read_trace, write_trace

T0 = datetime(2023, 2, 15, tzinfo=UTC)
HEADER = "timestamp,region,availability_zone,instance_type,product,spot_price_usd_per_hour\n"


def write_prices(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write(HEADER + "".join(line + "\n" for line in lines))
    return path


def write_availability(folder: Path, name: str, values: list[int], gap: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": values}))
    return path


def test_spot_prices_keep_linux_changes_only(tmp_path: Path) -> None:
    path = write_prices(tmp_path / "p.csv.gz", [
        "2021-03-01T00:00:00Z,us-east-1,us-east-1a,m5.large,Linux/UNIX,0.040",
        "2021-03-01T01:00:00Z,us-east-1,us-east-1a,m5.large,Linux/UNIX,0.040",  # re-emitted
        "2021-03-01T02:00:00Z,us-east-1,us-east-1a,m5.large,Windows,0.090",  # other product
        "2021-03-01T03:00:00Z,us-east-1,us-east-1a,m5.large,Linux/UNIX,0.050",
        "2021-03-01T00:30:00Z,us-east-1,us-east-1b,m5.large,Linux/UNIX,0.045",
        "2021-03-01T00:10:00Z,us-east-1,us-east-1b,c5.large,Linux/UNIX,0.030",
    ])
    rows = load_spot_prices(path)
    assert [(r.zone, r.instance_type, r.price_per_hour) for r in rows] == [
        ("us-east-1a", "m5.large", 0.040), ("us-east-1b", "c5.large", 0.030),
        ("us-east-1b", "m5.large", 0.045), ("us-east-1a", "m5.large", 0.050)]
    assert all(r.capacity == Capacity.SPOT and r.available for r in rows)
    assert [r.zone for r in load_spot_prices(path, zones={"us-east-1b"})] == ["us-east-1b"] * 2
    only = load_spot_prices(path, instance_types={"c5.large"})
    assert [r.instance_type for r in only] == ["c5.large"]


def test_spot_prices_bad_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        load_spot_prices(tmp_path / "missing.csv.gz")
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,price\n2021-01-01,1\n")
    with pytest.raises(TraceError, match="missing column"):
        load_spot_prices(bad)
    nan = write_prices(tmp_path / "nan.csv.gz",
                       ["2021-03-01T00:00:00Z,us-east-1,us-east-1a,m5.large,Linux/UNIX,cheap"])
    with pytest.raises(TraceError, match=r"nan.csv.gz:2"):
        load_spot_prices(nan)


@pytest.mark.parametrize(("name", "itype", "region"), [
    ("us-east-1a_v100_1.json", "p3.2xlarge", "us-east-1"),
    ("us-west-2b_k80_8.json", "p2.8xlarge", "us-west-2"),
    ("us-east-1c_intel_64.json", "r5.16xlarge", "us-east-1"),
    ("us-central1-a_c3-88.json", "c3-highcpu-88", "us-central1"),
])
def test_availability_names(tmp_path: Path, name: str, itype: str, region: str) -> None:
    path = write_availability(tmp_path / "aws-02-15-2023", name, [0, 1])
    series = read_availability(path)
    assert (series.instance_type, series.region, series.start) == (itype, region, T0)
    assert series.zone == name.split("_")[0]


def test_availability_rows_at_changes(tmp_path: Path) -> None:
    path = write_availability(tmp_path / "aws-02-15-2023", "us-east-1a_v100_1.json",
                              [0, 0, 1, 1, 1, 0, 1], gap=195)
    series = read_availability(path)
    rows = availability_rows(series, price_per_hour=0.918)
    assert [(r.timestamp, r.available) for r in rows] == [
        (T0, False), (T0 + timedelta(seconds=390), True), (T0 + timedelta(seconds=975), False),
        (T0 + timedelta(seconds=1170), True)]
    assert {r.price_per_hour for r in rows} == {0.918}
    assert series.end == T0 + timedelta(seconds=7 * 195)


def test_multi_node_availability_needs_enough_nodes(tmp_path: Path) -> None:
    path = write_availability(tmp_path / "aws-08-03-2023", "us-east-1f_v100_1.json",
                              [4, 1, 0, 4])
    rows = availability_rows(read_availability(path), price_per_hour=1.0, nodes=4)
    assert [r.available for r in rows] == [True, False, True]


def test_availability_errors(tmp_path: Path) -> None:
    folder = tmp_path / "misc"
    folder.mkdir()
    (folder / "x_v100_1.json").write_text("{not json")
    with pytest.raises(TraceError, match="not an availability trace"):
        read_availability(folder / "x_v100_1.json")
    write_availability(folder, "y_v100_1.json", [1])
    with pytest.raises(TraceError, match="no start time"):
        read_availability(folder / "y_v100_1.json")
    assert read_availability(folder / "y_v100_1.json", start=T0).start == T0
    with pytest.raises(TraceError, match="no such folder"):
        load_availability_dir(tmp_path / "nope")


def test_ondemand_table(tmp_path: Path) -> None:
    path = tmp_path / "od.csv"
    path.write_text("region,instance_type,ondemand_usd_per_hour,source\n"
                    "us-east-1,p3.2xlarge,3.06,list\n")
    assert load_ondemand(path) == {("us-east-1", "p3.2xlarge"): 3.06}


def test_combined_market(tmp_path: Path) -> None:
    folder = tmp_path / "aws-02-15-2023"
    write_availability(folder, "us-east-1a_v100_1.json", [1, 0, 1], gap=100)
    write_availability(folder, "us-east-2b_v100_1.json", [0, 1, 1], gap=100)
    series = load_availability_dir(folder)
    rows = combined_market(availability=series, spot_price={"p3.2xlarge": 0.918},
                           ondemand={("us-east-1", "p3.2xlarge"): 3.06,
                                     ("us-east-2", "p3.2xlarge"): 3.06})
    spot = [(r.zone, (r.timestamp - T0).seconds, r.available) for r in rows
            if r.capacity == Capacity.SPOT]
    assert spot == [("us-east-1a", 0, True), ("us-east-2b", 0, False),
                    ("us-east-1a", 100, False), ("us-east-2b", 100, True),
                    ("us-east-1a", 200, True)]
    od = [(r.zone, r.price_per_hour, r.available, r.timestamp) for r in rows
          if r.capacity == Capacity.ON_DEMAND]
    assert od == [("us-east-1a", 3.06, True, T0), ("us-east-2b", 3.06, True, T0)]
    # The combined market is a DESIGN.md trace: it round-trips through the CSV.
    write_trace(tmp_path / "m.csv", rows)
    assert read_trace(tmp_path / "m.csv") == rows


def test_combined_prices_from_price_rows(tmp_path: Path) -> None:
    path = write_prices(tmp_path / "p.csv.gz", [
        "2023-02-14T00:00:00Z,us-east-1,us-east-1a,p3.2xlarge,Linux/UNIX,0.9",
        "2023-02-15T00:01:40Z,us-east-1,us-east-1a,p3.2xlarge,Linux/UNIX,1.2",
        "2023-02-16T00:00:00Z,us-east-1,us-east-1a,p3.2xlarge,Linux/UNIX,1.0",
    ])
    prices = load_spot_prices(path)
    assert flat_spot_prices(prices) == {"p3.2xlarge": 1.0}
    series = [read_availability(write_availability(tmp_path / "aws-02-15-2023",
                                                   "us-east-1a_v100_1.json", [1, 1, 0]),
                                )]
    rows = combined_market(price_rows=prices, availability=series)
    assert [(r.price_per_hour, r.available) for r in rows] == [
        (0.9, True), (1.2, True), (1.2, False), (1.0, False)]


def test_traces_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert traces_dir(tmp_path) == tmp_path
    monkeypatch.setenv("GPUSCOUT_TRACES_DIR", str(tmp_path))
    assert traces_dir() == tmp_path
    monkeypatch.delenv("GPUSCOUT_TRACES_DIR")
    assert traces_dir().parts[-2:] == ("shared", "traces")


# --- the real files --------------------------------------------------------------

REAL = traces_dir()


def test_real_price_files() -> None:
    for name, n_types in (("iantruslove-us-east-1-2009-2013.csv.gz", 15),
                          ("lucianamarques-sa-east-1-2020.csv.gz", 176)):
        rows = load_spot_prices(REAL / "prices" / name)
        assert len({r.instance_type for r in rows}) == n_types
        assert rows == sorted(rows, key=lambda r: r.timestamp)
    gpu = load_spot_prices(REAL / "prices/lucianamarques-us-east-1-2021.csv.gz",
                           instance_types={"p3.2xlarge"})
    assert {r.price_per_hour for r in gpu} == {0.918}  # flat all spring (STATS.md)
    assert load_ondemand(REAL / "prices/ondemand.csv")[("us-east-1", "p3.2xlarge")] == 3.06


def test_real_availability_files() -> None:
    files = sorted(REAL.glob("availability/**/*.json")) + sorted(REAL.glob("preemption/**/*.json"))
    assert len(files) == 34
    for path in files:
        series = read_availability(path)
        assert series.values and series.gap_seconds in (30, 32, 34, 195, 300, 600)
    nine = load_availability_dir(REAL / "availability/1-node/aws-02-15-2023")
    assert len(nine) == 9 and {s.instance_type for s in nine} == {"p3.2xlarge"}
    share = sum(sum(v > 0 for v in s.values) for s in nine) / sum(len(s.values) for s in nine)
    assert share == pytest.approx(0.644, abs=0.001)  # STATS.md: per-AZ mean
