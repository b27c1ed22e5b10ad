"""Each baseline on a small trace where its behaviour is known, and the
offline optimum as a lower bound."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuscout.domain import Capacity, Offer
from gpuscout.sim import Simulator, simulate
from gpuscout.sim.baselines import (
    NaivePolicy,
    OnDemandPolicy,
    SkyPilotPolicy,
    UniformProgressPolicy,
)
from gpuscout.sim.engine import JobRun
from gpuscout.sim.optimal import OptimalPolicy
from tests.unit.test_sim_helpers import EXACT, at, job, market, row


class Recording:
    """Wraps a policy and records where it placed each job, and when."""

    def __init__(self, inner):  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name = inner.name
        self.scout_interval_s = inner.scout_interval_s
        self.placed: list[tuple[float, Offer | None]] = []

    def place(self, run: JobRun, t: float) -> Offer | None:
        offer = self.inner.place(run, t)
        self.placed.append((t - run.submit, offer))
        return offer

    def scout(self, run, t):  # type: ignore[no-untyped-def]
        return self.inner.scout(run, t)

    def on_notice(self, run, t):  # type: ignore[no-untyped-def]
        return self.inner.on_notice(run, t)

    def wake(self, run, t):  # type: ignore[no-untyped-def]
        return self.inner.wake(run, t)


def test_on_demand_takes_the_cheapest_on_demand_and_stays() -> None:
    m = market(row(0, "us-east-1a", "spot", 0.5), row(0, "us-east-1a", "on-demand", 3.0),
               row(0, "us-east-1b", "on-demand", 2.5), row(3600, "us-east-1a", "on-demand", 1.0))
    policy = Recording(OnDemandPolicy())
    r = Simulator(m, EXACT).run_job(job(hours=2), policy)
    assert policy.placed[0][1] is not None and policy.placed[0][1].zone == "us-east-1b"
    assert r.migrations == 0
    assert r.cost_usd == pytest.approx(2.5 * (7200 + 180) / 3600)


def test_on_demand_with_a_deadline_takes_the_cheapest_type_fast_enough_for_it() -> None:
    # g4dn (T4, half a V100) is cheaper per work hour but would take 4 h for
    # 2 h of work; the deadline is in 3 h.
    m = market(row(0, "us-east-1a", "on-demand", 3.06),
               row(0, "us-east-1a", "on-demand", 0.526, itype="g4dn.xlarge"))
    assert m.offers(at(0).timestamp()).cheapest().instance_type == "g4dn.xlarge"
    r = simulate([job(hours=2, deadline_s=3 * 3600)], m, OnDemandPolicy(), EXACT)
    assert not r.jobs[0].deadline_missed
    assert r.jobs[0].cost_usd == pytest.approx(3.06 * (7200 + 180) / 3600)
    # Without a deadline the cheaper slow type is fine.
    r = simulate([job(hours=2)], m, OnDemandPolicy(), EXACT)
    assert r.jobs[0].cost_usd == pytest.approx(0.526 * (14400 + 180) / 3600)


@pytest.mark.parametrize(("new_price", "moves"), [(0.80, 1), (0.81, 0)])
def test_naive_moves_at_twenty_percent_by_price_alone(new_price: float, moves: int) -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 1.5),
               row(600, "us-east-1b", "spot", new_price))
    # Even for the last few minutes of a job: no cost of moving is counted.
    r = Simulator(m, EXACT).run_job(job(hours=0.2), NaivePolicy())
    assert r.migrations == moves


@pytest.mark.parametrize("policy", [NaivePolicy, SkyPilotPolicy])
def test_naive_and_skypilot_with_a_deadline_take_a_type_fast_enough_for_it(policy) -> None:  # type: ignore[no-untyped-def]
    # g4dn spot (T4, half a V100) is cheaper per work hour, but 2 h of work
    # would take it 4 h and the deadline is in 3 h: a user would ask for the V100.
    m = market(row(0, "us-east-1a", "spot", 0.918),
               row(0, "us-east-1a", "spot", 0.16, itype="g4dn.xlarge"))
    r = simulate([job(hours=2, deadline_s=3 * 3600)], m, policy(), EXACT)
    assert not r.jobs[0].deadline_missed
    assert r.jobs[0].cost_usd == pytest.approx(0.918 * (7200 + 180) / 3600)
    # Without a deadline the cheaper slow type is theirs to take.
    r = simulate([job(hours=2)], m, policy(), EXACT)
    assert r.jobs[0].cost_usd == pytest.approx(0.16 * (14400 + 180) / 3600)

def test_skypilot_spot_only_moves_only_when_preempted_to_another_zone() -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 1.2),
               row(0, "us-east-1a", "on-demand", 0.9),
               row(1800, "us-east-1b", "spot", 0.1),  # far cheaper: SkyPilot does not care
               row(3600, "us-east-1a", "spot", 1.0, available=False),
               row(3700, "us-east-1a", "spot", 1.0, available=True))
    policy = Recording(SkyPilotPolicy())
    r = Simulator(m, EXACT).run_job(job(hours=2), policy)
    assert [o.zone for _, o in policy.placed if o] == ["us-east-1a"]  # spot, not on-demand
    assert (r.migrations, r.preemptions) == (1, 1)
    # After the notice it went to zone b (a was just preempted, though back at 3700).
    assert r.cost_usd == pytest.approx(1.0 * 3720 / 3600 + 0.1 * (r.finished_at - at(3600))
                                       .total_seconds() / 3600)


def test_skypilot_waits_for_spot() -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0, available=False),
               row(0, "us-east-1a", "on-demand", 3.0), row(3000, "us-east-1a", "spot", 1.0))
    r = Simulator(m, EXACT).run_job(job(hours=1, deadline_s=3600 + 900), SkyPilotPolicy())
    assert r.deadline_missed and r.finished_at == at(3000 + 180 + 3600)


def single_zone():  # type: ignore[no-untyped-def]
    # Spot for the first hour of training only; on-demand always.
    return market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1a", "on-demand", 3.0),
                  row(3780, "us-east-1a", "spot", 1.0, available=False))


def test_uniform_progress_goes_on_demand_exactly_when_behind_the_line() -> None:
    policy = Recording(UniformProgressPolicy(EXACT))
    r = Simulator(single_zone(), EXACT).run_job(job(hours=2, deadline_s=4 * 3600), policy)
    # Preempted at 3780 s with 1 h trained; the emergency checkpoint keeps the
    # work up to 30 s before the instance is gone: 1.025 h. The line
    # 2 h x t / 4 h passes 1.025 h at t = 7380 s; the first scout tick after
    # that (every 120 s) is 7440 s, and only then does it take on-demand.
    waits = [(t, o) for t, o in policy.placed]
    assert waits[0][0] == 0 and waits[0][1] is not None  # spot at submission
    assert all(o is None for t, o in waits if 0 < t < 7440)
    assert [t for t, o in waits if o is not None and o.capacity == Capacity.ON_DEMAND] == [7440]
    assert not r.deadline_missed
    assert r.finished_at == at(7440 + 180 + 60 + (2 - 1.025) * 3600)


def test_greedy_waits_until_the_deadline_forces_on_demand() -> None:
    policy = Recording(UniformProgressPolicy(EXACT, uniform=False))
    r = Simulator(single_zone(), EXACT).run_job(job(hours=2, deadline_s=4 * 3600), policy)
    # Slack left = 14400 - t - 0.975 h - restart 240 s; forced once it is at
    # most GPU Scout's margin (60 s) + a restart (240 s): t >= 10350 s, the
    # first scout tick from then is 10440 s.
    first_od = next(t for t, o in policy.placed if o is not None and t > 0)
    assert first_od == 10440
    assert not r.deadline_missed


def test_uniform_progress_returns_to_spot_when_it_comes_back() -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0, available=False),
               row(0, "us-east-1a", "on-demand", 3.0), row(1800, "us-east-1a", "spot", 1.0))
    r = Simulator(m, EXACT).run_job(job(hours=2, deadline_s=3 * 3600),
                                    UniformProgressPolicy(EXACT))
    assert r.migrations == 1 and not r.deadline_missed


@pytest.mark.parametrize("deadline_h", [2.5, 3.0, 4.0, None])
def test_optimal_is_a_lower_bound(deadline_h: float | None) -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 0.8),
               row(0, "us-east-1a", "on-demand", 3.0),
               row(1500, "us-east-1b", "spot", 0.8, available=False),
               row(3000, "us-east-1a", "spot", 1.0, available=False),
               row(5000, "us-east-1b", "spot", 0.4, available=True),
               row(8000, "us-east-1a", "spot", 1.0, available=True))
    jobs = [job(f"j{i}", hours=2, submit_s=600 * i,
                deadline_s=None if deadline_h is None else 600 * i + deadline_h * 3600)
            for i in range(3)]
    config = replace(EXACT, boot_jitter=0.1)
    best = {j.name: j for j in simulate(jobs, m, OptimalPolicy(config), config).jobs}
    assert not any(j.deadline_missed for j in best.values())
    for name in ("gpuscout", "naive", "skypilot", "uniform_progress", "greedy", "on_demand"):
        for seed in (0, 1):
            for j in simulate(jobs, m, name, config, seed=seed).jobs:
                if not j.deadline_missed:
                    assert best[j.name].cost_usd <= j.cost_usd + 1e-9, (name, j)
    on_demand = simulate(jobs, m, "on_demand", config).jobs
    assert all(b.cost_usd < o.cost_usd for b, o in zip(best.values(), on_demand, strict=True))
