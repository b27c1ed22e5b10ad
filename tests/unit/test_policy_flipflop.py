"""Markets whose gap flips (issue 12, item 6): two T4 spot offers at 0.10
and 0.16 $/h swapping every 15 minutes, and a 12-hour job. Priced as if
the gap of the moment lasted for the rest of the job, every flip looked
worth a move: GPU Scout moved 9 times and paid $3.24 against $3.12 for
staying put. The policy now prices the rest of the job at the prices
expected from each offer's last day of changes (``expected_price``, fed by
``market.history``): a gap that keeps flipping is worth the minutes it is
expected to last, while one that opened and stays is followed as before.

The simulator runs the market as the live scout sees it; the tables check
the forecast, the history it is made from, and ``decide_move`` on it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from gpuscout.domain import (
    Capacity,
    Job,
    JobSpec,
    JobStatus,
    Offer,
    PriceHistory,
    Progress,
    Resources,
)
from gpuscout.market.history import DAY_S, CapacityHistory
from gpuscout.market.trace import TraceRow
from gpuscout.policy import MoveCosts, MovePolicy, decide_move, expected_price
from gpuscout.sim import GpuScoutPolicy, SimConfig, SimJob, SimMarket, Simulator
from gpuscout.sim.engine import Action, JobRun

T0 = datetime(2023, 1, 1, tzinfo=UTC)
T4 = "g4dn.xlarge"  # one T4, relative speed 0.5: 12 work hours take 24 h
ZONES = ("us-east-1a", "us-east-1b")


def flip_market(period_s: float, *, low: float = 0.10, high: float = 0.16,
                hours: float = 24.0) -> SimMarket:
    """Two T4 spot offers, one at ``low`` and one at ``high``, swapping every
    ``period_s`` seconds for ``hours`` (the last prices hold after that)."""
    rows = []
    for k in range(int(hours * 3600 / period_s) + 1):
        at = T0 + timedelta(seconds=k * period_s)
        prices = (low, high) if k % 2 == 0 else (high, low)
        rows += [TraceRow(at, "aws", "us-east-1", zone, T4, Capacity.SPOT, price, True)
                 for zone, price in zip(ZONES, prices, strict=True)]
    return SimMarket(rows)


def twelve_hour_job(submit_s: float = 0.0) -> SimJob:
    spec = JobSpec(name="train", command="sim", expected_duration_hours=12.0,
                   resources=Resources(gpus=1, gpu_type="T4"))
    return SimJob(spec, T0 + timedelta(seconds=submit_s))


class StayPut:
    """Launch on the first offer (us-east-1a) and never move."""

    name = "stay_put"
    scout_interval_s = 120.0

    def place(self, run: JobRun, t: float) -> Offer | None:
        return next(o for o in run.market.offers(t) if o.zone == ZONES[0])

    def scout(self, run: JobRun, t: float) -> Action | None:
        return None

    def on_notice(self, run: JobRun, t: float) -> Offer | None:
        return None

    def wake(self, run: JobRun, t: float) -> float:
        return math.inf


def gpuscout() -> GpuScoutPolicy:
    # Asked at every scout tick, as the live scout asks.
    return GpuScoutPolicy.for_config(SimConfig(), heartbeat_s=120.0)


# --- the market of the issue, in the simulator ------------------------------------------


@pytest.mark.parametrize("submit_h", [0.0, 6.0])
def test_a_gap_flipping_every_15_minutes_is_not_chased(submit_h: float) -> None:
    market = flip_market(900, hours=24.0 + submit_h)
    job = twelve_hour_job(submit_h * 3600)
    stayed = Simulator(market, SimConfig()).run_job(job, StayPut())
    scout = Simulator(market, SimConfig()).run_job(job, gpuscout())
    assert stayed.cost_usd == pytest.approx(3.12, abs=0.01)  # 24 h at 0.13 $/h on average
    assert scout.finished_at is not None and stayed.finished_at is not None
    hours = (scout.finished_at - job.submit_at).total_seconds() / 3600
    # No dearer than staying put, and at most 2 moves per 12 h (of job and of run).
    assert scout.cost_usd <= stayed.cost_usd + 1e-9
    assert scout.migrations <= 2
    assert scout.migrations <= 2 * hours / 12


@pytest.mark.parametrize("period_min", [2, 5, 10, 15])
def test_faster_flips_are_not_chased_either(period_min: float) -> None:
    market = flip_market(period_min * 60)
    job = twelve_hour_job()
    stayed = Simulator(market, SimConfig()).run_job(job, StayPut())
    scout = Simulator(market, SimConfig()).run_job(job, gpuscout())
    assert scout.cost_usd <= stayed.cost_usd + 1e-9
    assert scout.migrations <= 2


def test_a_gap_that_flips_every_6_hours_is_still_followed() -> None:
    # Each gap lasts hours: following it pays, as it did before.
    market = flip_market(6 * 3600, hours=30)
    job = twelve_hour_job()
    stayed = Simulator(market, SimConfig()).run_job(job, StayPut())
    scout = Simulator(market, SimConfig()).run_job(job, gpuscout())
    assert 1 <= scout.migrations <= 4
    assert scout.cost_usd < 0.95 * stayed.cost_usd


def test_a_price_that_drops_and_stays_is_followed_at_once() -> None:
    # Both at 0.16 for a day, then us-east-1b drops to 0.10 for good.
    drop_s = 86_400.0
    rows = [TraceRow(T0, "aws", "us-east-1", zone, T4, Capacity.SPOT, 0.16, True)
            for zone in ZONES]
    rows.append(TraceRow(T0 + timedelta(seconds=drop_s), "aws", "us-east-1", ZONES[1], T4,
                         Capacity.SPOT, 0.10, True))
    market = SimMarket(rows)
    policy = gpuscout()
    policy.record = True
    job = twelve_hour_job(submit_s=drop_s - 3600)
    result = Simulator(market, SimConfig()).run_job(job, policy)
    moves = [d for d in policy.decisions if getattr(d, "move", False)]
    assert result.migrations == 1 and len(moves) == 1
    assert moves[0].decided_at is not None
    assert (moves[0].decided_at - T0).total_seconds() - drop_s <= 120  # the next scout pass


# --- expected_price: the forecast ---------------------------------------------------------

NOW = T0 + timedelta(days=2)


def t4(price: float, history: PriceHistory | None = None, *, zone: str = "a") -> Offer:
    return Offer(id=f"aws:{zone}:{T4}:spot", provider="aws", region="us-east-1", zone=zone,
                 instance_type=T4, capacity=Capacity.SPOT, gpus=1, gpu_type="T4", vcpus=4,
                 memory_gb=16, price_per_hour=price, relative_speed=0.5,
                 price_history=history)


def history(*, age_min: float, holds_min: tuple[float, ...], prices: tuple[float, ...],
            mean: float, correlation: float) -> PriceHistory:
    return PriceHistory(since=NOW - timedelta(minutes=age_min),
                        holds_s=tuple(60.0 * h for h in holds_min), hold_prices=prices,
                        mean_price_per_hour=mean, correlation=correlation)


# Two prices swapping every 15 minutes for the last two hours.
FLIP = dict(holds_min=(15.0,) * 8, prices=(0.10, 0.16) * 4, mean=0.13, correlation=-1.0)


def later(c: float, hold_h: float, x: float) -> float:
    """The integral of c * exp(-(1 - c) y / hold_h) over [0, x]."""
    if x <= 0:
        return 0.0
    if c == 1.0:
        return x
    return c * hold_h / (1 - c) * (1 - math.exp(-(1 - c) * x / hold_h))


@pytest.mark.parametrize(("case", "offer", "start_h", "hours", "expected"), [
    # No history: the current price, whatever the interval.
    ("no history", t4(0.16), 0.0, 24.0, 0.16),
    ("no history, later", t4(0.10), 5.0, 1.0, 0.10),
    # Flipping every 15 minutes, the current price 0 minutes old: it holds
    # for the next quarter hour...
    ("flip, this quarter hour", t4(0.10, history(age_min=0, **FLIP)), 0.0, 0.25, 0.10),
    # ... and 10 minutes in, for 5 more.
    ("flip, 10 minutes in", t4(0.10, history(age_min=10, **FLIP)), 0.0, 5 / 60, 0.10),
    # Over a day, it is the mean, less (for the cheap side) the quarter hour
    # it still holds and plus half a quarter hour on the dear side after.
    ("flip, a day", t4(0.10, history(age_min=0, **FLIP)), 0.0, 24.0,
     0.13 - 0.03 * (0.25 + later(-1.0, 0.25, 23.75)) / 24),
    # Past the quarter hour, the other price first.
    ("flip, the next hold", t4(0.10, history(age_min=0, **FLIP)), 0.25, 0.0,
     0.13 - 0.03 * -1.0),
    # Independent prices (correlation 0): the mean once the current one is over.
    ("spike, after it", t4(0.50, history(age_min=0, holds_min=(60.0,), prices=(0.10,),
                                         mean=0.10, correlation=0.0)), 1.0, 3.0, 0.10),
    ("spike, across its end", t4(0.50, history(age_min=0, holds_min=(60.0,), prices=(0.10,),
                                               mean=0.10, correlation=0.0)), 0.0, 2.0, 0.30),
    # A price that drifts and stays (correlation 1) holds.
    ("drift", t4(0.10, history(age_min=0, holds_min=(30.0, 30.0), prices=(0.16, 0.13),
                               mean=0.13, correlation=1.0)), 0.0, 24.0, 0.10),
    # A price that has outlasted every recent one holds too.
    ("outlasted", t4(0.10, history(age_min=120, **FLIP)), 0.0, 24.0, 0.10),
    # Of the recent prices above the mean (0.40 and 0.50 ones), those that
    # outlast the current one's age of 20 minutes are what it is expected
    # to last (here 10 and 40 more minutes); the long stretch at the usual
    # price does not count.
    ("residual life", t4(0.50, history(age_min=20, holds_min=(10.0, 30.0, 60.0, 600.0),
                                       prices=(0.50, 0.40, 0.50, 0.09), mean=0.10,
                                       correlation=0.0)), 0.0, 1.0,
     0.10 + 0.40 * (10 + 40) / 2 / 60),
])
def test_expected_price(case: str, offer: Offer, start_h: float, hours: float,
                        expected: float) -> None:
    assert expected_price(offer, NOW, start_h, hours) == pytest.approx(expected, abs=1e-9), case


def test_the_expected_price_of_a_flip_tends_to_the_mean() -> None:
    cheap = t4(0.10, history(age_min=0, **FLIP))
    dear = t4(0.16, history(age_min=0, **FLIP), zone="b")
    gaps = [expected_price(dear, NOW, 0, h) - expected_price(cheap, NOW, 0, h)
            for h in (0.25, 1, 4, 24, 96)]
    assert gaps[0] == pytest.approx(0.06)
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:], strict=False))
    # Over a day the quarter-hour gap is worth 1/192 of it: half a quarter hour.
    assert gaps[3] * 24 == pytest.approx(0.06 * 0.125, rel=0.01)


# --- the history the forecast comes from ---------------------------------------------------


def seen(price: float, available: bool = True) -> Offer:
    return t4(price).with_(available=available)


def test_a_price_that_never_changed_has_no_history() -> None:
    h = CapacityHistory()
    for k in range(10):
        (o,) = h.observe(k * 600.0, [seen(0.16)])
    assert o.price_history is None


def test_a_flipping_price_has_its_holds_mean_and_a_correlation_of_minus_one() -> None:
    h = CapacityHistory()
    for k in range(9):  # 0.10, 0.16, ... every 15 minutes for two hours
        (o,) = h.observe(k * 900.0, [seen(0.10 if k % 2 == 0 else 0.16)])
    ph = o.price_history
    assert ph is not None
    assert ph.since == datetime.fromtimestamp(8 * 900.0, UTC)
    assert ph.holds_s == (900.0,) * 8
    assert ph.hold_prices == (0.10, 0.16) * 4
    assert ph.mean_price_per_hour == pytest.approx(0.13)
    assert ph.correlation == pytest.approx(-1.0)
    # Looks between changes do not change it.
    (again,) = h.observe(8 * 900.0 + 120, [seen(0.10)])
    assert again.price_history is ph


def test_the_mean_leaves_out_the_time_the_offer_could_not_be_had() -> None:
    h = CapacityHistory()
    h.observe(0.0, [seen(0.10)])
    h.observe(3600.0, [seen(3.00, available=False)])  # a spike above on-demand: no capacity
    h.observe(7200.0, [seen(0.10)])
    (o,) = h.observe(10_800.0, [seen(0.12)])
    assert o.price_history is not None
    assert o.price_history.mean_price_per_hour == pytest.approx(0.10)
    assert o.price_history.holds_s == (3600.0, 3600.0, 3600.0)
    assert o.price_history.hold_prices == (0.10, 3.00, 0.10)


def test_a_change_older_than_the_window_is_forgotten() -> None:
    h = CapacityHistory()
    h.observe(0.0, [seen(0.16)])
    h.observe(3600.0, [seen(0.10)])
    (o,) = h.observe(3600.0 + DAY_S - 60, [seen(0.10)])
    assert o.price_history is not None
    (o,) = h.observe(3600.0 + DAY_S + 60, [seen(0.10)])
    assert o.price_history is None


# --- decide_move on such offers ----------------------------------------------------------------


def running_job(offer_id: str) -> Job:
    spec = JobSpec(name="j", command="true", resources=Resources(gpus=1),
                   expected_duration_hours=12.0)
    return Job(id="job", spec=spec, status=JobStatus.RUNNING, created_at=T0, offer_id=offer_id,
               instance_id="i", progress=Progress(step=0, total_steps=1000), started_at=T0)


COSTS = MoveCosts(boot_s=180, checkpoint_s=30, restore_s=60)


@pytest.mark.parametrize(("case", "current", "target", "moves"), [
    # The market just after a flip: current now dear, target cheap.
    ("flipping", t4(0.16, history(age_min=0, **FLIP)),
     t4(0.10, history(age_min=0, **FLIP), zone="b"), False),
    # The same prices without a history: the gap is taken to last, as before.
    ("no history", t4(0.16), t4(0.10, zone="b"), True),
    # A drop that has held for longer than any recent change: it lasts.
    ("a drop that held", t4(0.16, history(age_min=300, **FLIP)),
     t4(0.10, history(age_min=300, **FLIP), zone="b"), True),
    # The target just dropped after a day at 0.16: nothing says it flips back.
    ("a fresh drop", t4(0.16), t4(0.10, history(age_min=1, holds_min=(24 * 60 - 1,),
                                                 prices=(0.16,), mean=0.16, correlation=0.0),
                                  zone="b"), True),
    # The current offer spiked a minute ago; spikes there last an hour.
    ("a spike", t4(0.50, history(age_min=1, holds_min=(300.0, 60.0) * 4,
                                 prices=(0.16, 0.50) * 4, mean=0.22, correlation=-1.0)),
     t4(0.10, zone="b"), True),
    # A dip on the target a minute ago: dips there last 10 minutes, and its
    # usual price is dearer than the current one's.
    ("a dip", t4(0.16), t4(0.10, history(age_min=1, holds_min=(120.0, 10.0) * 4,
                                         prices=(0.17, 0.10) * 4, mean=(0.17 * 12 + 0.10) / 13,
                                         correlation=-1.0), zone="b"), False),
    # The same dips on a target whose usual price is cheaper: worth it.
    ("a cheaper usual price", t4(0.16), t4(0.10, history(
        age_min=1, holds_min=(120.0, 10.0) * 4, prices=(0.15, 0.10) * 4,
        mean=(0.15 * 12 + 0.10) / 13, correlation=-1.0), zone="b"), True),
])
def test_decide_move_prices_the_gap_by_its_history(case: str, current: Offer, target: Offer,
                                                   moves: bool) -> None:
    d = decide_move(running_job(current.id), current, [current, target], MovePolicy(), NOW,
                    costs=COSTS)
    assert d.move == moves, (case, d.reason)
    assert d.savings >= 0.2  # every case is over the threshold at today's prices
    if not moves:
        assert "expected from their recent changes" in d.reason
