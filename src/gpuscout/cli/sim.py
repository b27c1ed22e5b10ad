"""``gpuscout simulate``: run a policy over a market trace, offline.

Registered in cli/main.py with ``app.command("simulate")(simulate)``.
Contract as the rest of the CLI: an error is one red line on stderr, exit 1.
Each job of the jobs file is validated as the API validates a submitted one
(``domain.jobinput.JobCreate``, through ``sim.load_jobs``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


def availability_market(folder: Path) -> list:  # type: ignore[type-arg]
    """A market from a folder of availability traces: each type at the
    catalog's spot price where it has capacity, on-demand at its list price."""
    from gpuscout.market import catalog
    from gpuscout.market.combined import combined_market
    from gpuscout.market.loaders import load_availability_dir
    from gpuscout.market.trace import TraceError

    series = load_availability_dir(folder)
    if not series:
        raise TraceError(f"{folder}: no availability JSON files")
    spot, ondemand = {}, {}
    for s in series:
        try:
            itype = catalog.instance_type(s.instance_type)
        except KeyError:
            raise TraceError(f"{folder}: {s.instance_type} is not in the catalog") from None
        spot[itype.name] = min(itype.spot_price_by_zone.values())
        ondemand[(s.region, itype.name)] = itype.on_demand_price
    return combined_market(availability=series, spot_price=spot, ondemand=ondemand)


def simulate(
    trace: Annotated[Path, typer.Option(
        "--trace", help="market trace (DESIGN.md CSV, .gz ok), or a folder of spot-traces "
                        "availability JSON (priced from the catalog: spot when available, "
                        "on-demand always)")],
    policy: Annotated[str, typer.Option("--policy", help="gpuscout | naive | skypilot | "
                                        "uniform_progress | greedy | on_demand | optimal")],
    jobs: Annotated[Path, typer.Option("--jobs", help="YAML list of job specs with submit_at")],
    seed: Annotated[int, typer.Option("--seed", help="seed of the simulated boot times")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="end with one JSON summary line")]
    = False,
) -> None:
    """Simulate jobs on a market trace under a policy (trace-driven, offline)."""
    from gpuscout.market.trace import TraceError, read_trace
    from gpuscout.sim import JobsFileError, SimMarket, UnknownPolicy, load_jobs, make_policy
    from gpuscout.sim import simulate as run

    def fail(message: str) -> None:
        # Not markup: a message may quote the user's text ([...] included).
        err.print(f"error: {message}", style="bold red", markup=False, highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)

    try:
        chosen = make_policy(policy)
        rows = availability_market(trace) if trace.is_dir() else read_trace(trace)
        if not rows:
            fail(f"{trace}: the trace has no rows")
        market = SimMarket(rows)
        job_list = load_jobs(jobs)
    except (UnknownPolicy, TraceError, JobsFileError) as error:
        fail(str(error))
        return
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read input: {error}")
        return
    started = time.perf_counter()
    result = run(job_list, market, chosen, seed=seed)
    elapsed = time.perf_counter() - started

    table = Table(title=f"policy {result.policy}: {len(result.jobs)} jobs on {trace.name}")
    for col in ("job", "cost $", "migrations", "preemptions", "finished", "deadline", "budget"):
        table.add_column(col, justify="left" if col in ("job", "finished") else "right")
    for j in result.jobs:
        table.add_row(Text(j.name), f"{j.cost_usd:.2f}", str(j.migrations), str(j.preemptions),
                      j.finished_at.strftime("%Y-%m-%d %H:%M") if j.finished_at else "-",
                      "missed" if j.deadline_missed else "ok",
                      "over" if j.budget_missed else "ok")
    out.print(table)
    out.print(f"total ${result.total_cost_usd:.2f}; deadline misses {result.deadline_misses}; "
              f"budget misses {result.budget_misses}; migrations {result.migrations} "
              f"({elapsed:.2f}s)", highlight=False)
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
