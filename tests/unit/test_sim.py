"""The simulator: accounting on hand-computed traces, preemptions,
determinism, and the same decisions as the live scout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuscout.cli.main import app
from gpuscout.market.trace import write_trace
from gpuscout.policy import JobView, MovePolicy, Offers, decide_move
from gpuscout.sim import GpuScoutPolicy, SimConfig, Simulator, simulate
from gpuscout.sim import policies as sim_policies
from gpuscout.sim.baselines import NaivePolicy, OnDemandPolicy, SkyPilotPolicy
from tests.unit.test_sim_helpers import EXACT, at, job, market, row


def test_cost_and_progress_on_demand() -> None:
    m = market(row(0, "us-east-1a", "on-demand", 3.0))
    r = Simulator(m, EXACT).run_job(job(hours=2), OnDemandPolicy())
    assert r.finished_at == at(180 + 7200)  # boot, then 2 h of work at speed 1
    assert r.cost_usd == pytest.approx(3.0 * (7200 + 180) / 3600)
    assert (r.migrations, r.preemptions, r.deadline_missed, r.budget_missed) == (0, 0, False, False)


def test_progress_at_relative_speed() -> None:
    m = market(row(0, "us-east-1a", "on-demand", 1.0, itype="g4dn.xlarge"))  # speed 0.5
    r = Simulator(m, EXACT).run_job(job(hours=2), OnDemandPolicy())
    assert r.finished_at == at(180 + 4 * 3600)
    assert r.cost_usd == pytest.approx(1.0 * (4 * 3600 + 180) / 3600)


def test_cost_follows_the_price() -> None:
    m = market(row(0, "us-east-1a", "on-demand", 3.0), row(3600, "us-east-1a", "on-demand", 6.0))
    r = Simulator(m, EXACT).run_job(job(hours=2, budget=9.0), OnDemandPolicy())
    assert r.cost_usd == pytest.approx(3.0 + 6.0 * (3600 + 180) / 3600)
    assert r.budget_missed


def spot_drop_market():  # type: ignore[no-untyped-def]
    # Zone a loses capacity 70 minutes into training; zone b always has it.
    return market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 1.0),
                  row(180 + 4200, "us-east-1a", "spot", 1.0, available=False))


def test_preemption_loses_work_since_last_checkpoint() -> None:
    config = replace(EXACT, emergency_checkpoint=False, checkpoint_period_s=1800)
    r = Simulator(spot_drop_market(), config).run_job(job(hours=2), SkyPilotPolicy())
    # Notice at 4380 s, gone at 4500 s; checkpoints at 1980 and 3780 s: 1 h kept,
    # the 0.2 h trained since is lost. The replacement in zone b launches at the
    # notice and trains from 4380 + 180 + 60 s for the remaining hour.
    assert r.work_lost_hours == pytest.approx(0.2)
    assert r.finished_at == at(4620 + 3600)
    assert r.cost_usd == pytest.approx(4500 / 3600 + (8220 - 4380) / 3600)
    assert (r.migrations, r.preemptions) == (1, 1)


def test_emergency_checkpoint_in_the_notice_window() -> None:
    r = Simulator(spot_drop_market(), EXACT).run_job(job(hours=2), SkyPilotPolicy())
    saved = (4500 - 30 - 180) / 3600  # checkpointed 30 s before the instance is gone
    assert r.work_lost_hours == pytest.approx(30 / 3600)
    assert r.finished_at == at(4620 + (2 - saved) * 3600)


def test_a_policy_told_of_a_preemption_sees_the_work_the_emergency_checkpoint_keeps() -> None:
    seen: list[float] = []

    class Watching(SkyPilotPolicy):
        def on_notice(self, run, t):  # type: ignore[no-untyped-def]
            seen.append(run.work_at(t))
            return super().on_notice(run, t)

    r = Simulator(spot_drop_market(), EXACT).run_job(job(hours=2), Watching())
    # Not the old instance's training counted on top of what it saves.
    assert seen == [pytest.approx((4500 - 30 - 180) / 3600)]
    assert r.preemptions == 1

def test_make_before_break_move_accounting() -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 2.0),
               row(3600, "us-east-1b", "spot", 0.5))
    r = Simulator(m, EXACT).run_job(job(hours=2), NaivePolicy())
    # Move asked at 3600 s: the replacement boots until 3780 (the old one
    # trains), checkpoint + restore until 3870 (both billed), then 1 h on b.
    assert r.migrations == 1
    assert r.finished_at == at(3870 + 3600)
    assert r.cost_usd == pytest.approx(1.0 * 3870 / 3600 + 0.5 * (7470 - 3600) / 3600)


def test_deterministic_for_a_seed() -> None:
    m = spot_drop_market()
    jobs = [job(f"j{i}", hours=1 + i, submit_s=600 * i) for i in range(4)]
    config = SimConfig(boot_jitter=0.2)
    first = simulate(jobs, m, "gpuscout", config, seed=7)
    assert simulate(jobs, m, "gpuscout", config, seed=7) == first
    assert simulate(jobs, m, "gpuscout", config, seed=8) != first


def test_job_that_never_finds_capacity_gives_up() -> None:
    m = market(row(0, "us-east-1a", "spot", 1.0, available=False))
    r = Simulator(m, replace(EXACT, max_hours=3)).run_job(job(hours=1), SkyPilotPolicy())
    assert r.finished_at is None and r.deadline_missed and r.cost_usd == 0


def test_sim_asks_the_policy_as_the_live_scout_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decide_move call the simulator's adapter makes is the call
    ControlPlane.scout_once makes for the same job and snapshot: offers
    ranked once, the current offer looked up in them, the JobView from the
    job's start, its price moves and the zones avoided, the same costs."""
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 1.1),
               row(0, "us-east-1a", "on-demand", 3.0),
               row(3600, "us-east-1b", "spot", 0.5), row(3 * 3600, "us-east-1a", "spot", 0.3),
               row(4 * 3600, "us-east-1a", "spot", 0.3, available=False),
               row(6 * 3600, "us-east-1a", "spot", 0.2))
    calls = []
    real = sim_policies.decide_move

    def spy(job, current, offers, policy, now, *, view=None, costs=None):  # type: ignore[no-untyped-def]
        decision = real(job, current, offers, policy, now, view=view, costs=costs)
        calls.append((job, list(offers), policy, now, view, costs, decision))
        return decision

    monkeypatch.setattr(sim_policies, "decide_move", spy)
    policy = GpuScoutPolicy.for_config(EXACT, heartbeat_s=120.0)
    result = Simulator(m, EXACT).run([job("a", hours=8), job("b", hours=3, submit_s=1800,
                                                             deadline_s=6 * 3600)], policy)
    assert len(calls) > 50 and result.migrations >= 2
    assert any(d.move for *_, d in calls)
    moves: dict[str, int] = {}
    for job_value, snapshot, move_policy, now, view, costs, decision in calls:
        # scout_once: offers = Offers(ctx.offers()).ranked(); by_id; _view(...)
        offers = Offers(snapshot).ranked()
        by_id = {o.id: o for o in offers}
        assert job_value.started_at is not None
        live_view = JobView(running_s=(now - job_value.started_at).total_seconds(),
                            price_moves=view.price_moves, avoid_zones=view.avoid_zones)
        live = decide_move(job_value, by_id.get(job_value.offer_id or ""), offers,
                           move_policy, now, view=live_view, costs=costs)
        assert live == decision
        assert move_policy == MovePolicy()
        assert view.price_moves == moves.get(job_value.id, 0)
        if decision.move and decision.trigger == "price":
            moves[job_value.id] = moves.get(job_value.id, 0) + 1


# --- the CLI -----------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    trace = tmp_path / "trace.csv"
    write_trace(trace, [
        row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1b", "spot", 1.0),
        row(0, "us-east-1a", "on-demand", 3.0),
        row(4380, "us-east-1a", "spot", 1.0, available=False)])
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- name: first\n  submit_at: 2023-01-01T00:00:00Z\n"
                    "  expected_duration_hours: 2\n  resources: {gpus: 1}\n"
                    "- name: second\n  submit_at: '2023-01-01T01:00:00Z'\n"
                    "  expected_duration_hours: 1\n  deadline: 2023-01-01T01:30:00Z\n"
                    "  budget_usd: 0.5\n  resources: {gpus: 1}\n")
    return trace, jobs


@pytest.mark.parametrize("policy", ["gpuscout", "naive", "skypilot", "uniform_progress",
                                    "on_demand", "optimal", "greedy"])
def test_cli_json_last_line(files: tuple[Path, Path], policy: str) -> None:
    trace, jobs = files
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--policy", policy,
                                      "--jobs", str(jobs), "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["policy"] == policy
    assert set(summary) == {"policy", "total_cost_usd", "deadline_misses", "budget_misses",
                            "migrations", "jobs"}
    assert [j["name"] for j in summary["jobs"]] == ["first", "second"]
    assert all({"name", "cost_usd", "migrations", "finished_at"} <= set(j)
               for j in summary["jobs"])
    assert summary["deadline_misses"] == 1  # one hour of work in 30 minutes: nobody can
    assert summary["total_cost_usd"] == pytest.approx(sum(j["cost_usd"]
                                                          for j in summary["jobs"]), abs=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"trace": "missing.csv"}, "no such trace file"),
    ({"jobs": "missing.yaml"}, "no such jobs file"),
    ({"policy": "cheapest"}, "unknown policy 'cheapest'"),
    ({"jobs_text": "- name: [unclosed\n"}, "not valid YAML"),
    ({"jobs_text": "- name: x\n  expected_duration_hours: 1\n"}, "submit_at is required"),
    ({"jobs_text": "- name: x\n  submit_at: soon\n  expected_duration_hours: 1\n"},
     "submit_at"),
    ({"jobs_text": "- name: x\n  submit_at: 2023-01-01T00:00:00Z\n  expected_duration_hours: 1\n"
                   "  colour: red\n"}, "unknown field(s) colour"),
    ({"trace_text": "timestamp,provider\n"}, "missing column"),
])
def test_cli_bad_input(files: tuple[Path, Path], tmp_path: Path, change: dict[str, str],
                       message: str) -> None:
    trace, jobs = files
    policy = change.get("policy", "gpuscout")
    if "trace" in change:
        trace = tmp_path / change["trace"]
    if "jobs" in change:
        jobs = tmp_path / change["jobs"]
    if "jobs_text" in change:
        jobs.write_text(change["jobs_text"])
    if "trace_text" in change:
        trace.write_text(change["trace_text"])
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--policy", policy,
                                      "--jobs", str(jobs)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_cli_availability_folder(tmp_path: Path, files: tuple[Path, Path]) -> None:
    _, jobs = files
    folder = tmp_path / "aws-01-01-2023"
    folder.mkdir()
    (folder / "us-east-1a_v100_1.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 600}, "data": [1] * 6 + [0] * 6 + [1] * 100}))
    result = CliRunner().invoke(app, ["simulate", "--trace", str(folder), "--policy", "skypilot",
                                      "--jobs", str(jobs), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    first = summary["jobs"][0]
    assert first["migrations"] == 0 and first["cost_usd"] > 2 * 0.918  # waited out the gap
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["simulate", "--trace", str(empty), "--policy", "naive",
                                      "--jobs", str(jobs)])
    assert result.exit_code == 1 and "no availability JSON files" in result.output


def test_a_preempted_job_returns_to_spot_in_that_zone_once_the_ban_is_over() -> None:
    # The only spot pool reclaims the instance at 1 h and has capacity again
    # 5 minutes later; on-demand costs 3x. The job (no deadline) rides
    # on-demand only until the zone's ban (ZONE_BACKOFF_S, 10 minutes) ends.
    m = market(row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1a", "on-demand", 3.0),
               row(3600, "us-east-1a", "spot", 1.0, available=False),
               row(3900, "us-east-1a", "spot", 1.0))
    moves: list[tuple[float, str]] = []

    class Watching(GpuScoutPolicy):
        def scout(self, run, t):  # type: ignore[no-untyped-def]
            action = super().scout(run, t)
            if action is not None and action[0] is not None:
                moves.append((t - run.submit, action[0].capacity.value))
            return action

    policy = Watching.for_config(EXACT, heartbeat_s=120.0)
    r = Simulator(m, EXACT).run_job(job(hours=4), policy)
    assert r.preemptions == 1
    assert moves and moves[0][1] == "spot"
    assert 3600 + 600 <= moves[0][0] <= 3600 + 600 + 120


def test_a_job_preempted_again_and_again_returns_to_spot_each_time_the_ban_ends() -> None:
    # The spot pool reclaims the instance every hour and is back 5 minutes
    # later. Each return to spot counts as a price move, but the growing
    # dwell (10, 20, 40 minutes...) and the cap hold moves between offers,
    # not a job that spot's absence put on on-demand: each return comes in
    # the scout pass after the zone's 10-minute ban.
    rows = [row(0, "us-east-1a", "spot", 1.0), row(0, "us-east-1a", "on-demand", 3.0)]
    for hour in range(1, 6):
        rows += [row(hour * 3600, "us-east-1a", "spot", 1.0, available=False),
                 row(hour * 3600 + 300, "us-east-1a", "spot", 1.0)]
    returns: list[float] = []

    class Watching(GpuScoutPolicy):
        def scout(self, run, t):  # type: ignore[no-untyped-def]
            action = super().scout(run, t)
            if action is not None and action[0] is not None:
                returns.append(t - run.submit)
            return action

    policy = Watching.for_config(EXACT, heartbeat_s=120.0)
    r = Simulator(market(*rows), EXACT).run_job(job(hours=6), policy)
    assert r.preemptions == 5
    assert len(returns) == 5
    for hour, t in enumerate(returns, start=1):
        assert hour * 3600 + 600 <= t <= hour * 3600 + 600 + 120, (hour, t)
