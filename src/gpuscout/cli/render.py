"""Rich renderings of the API's JSON shapes (see api/schemas.py).

Pure: JSON dicts in, Rich renderables out, so the commands stay thin and
the tables can be read in a test's captured output.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {
    "pending": "dim", "scouting": "cyan", "provisioning": "cyan", "running": "green",
    "migrating": "magenta", "recovering": "yellow", "completed": "bold green",
    "failed": "bold red", "cancelled": "dim",
    # migrations and instances
    "in_progress": "magenta", "terminated": "dim", "terminating": "yellow",
}

Json = dict[str, Any]


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if abs(value) < 1 else f"${value:,.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def clock_time(value: str | None) -> str:
    """``HH:MM:SS`` (UTC, as the API reports) or ``-``."""
    t = parse_time(value)
    return t.strftime("%H:%M:%S") if t else "-"


def progress(job: Json) -> str:
    p = job.get("progress") or {}
    total = p.get("total_steps")
    return f"{p.get('step', 0)}/{total}" if total else str(p.get("step", 0))


def jobs_table(jobs: list[Json]) -> Table:
    table = Table(title=f"Jobs ({len(jobs)})", title_justify="left")
    for column in ("ID", "NAME", "STATUS", "STEP", "COST", "SAVINGS", "OFFER"):
        table.add_column(column, no_wrap=column in ("ID", "STATUS"),
                         justify="right" if column in ("STEP", "COST", "SAVINGS") else "left")
    for job in jobs:
        table.add_row(job["id"], job["name"], status_text(job["status"]), progress(job),
                      money(job.get("cost_usd")), money(job.get("savings_usd")),
                      job.get("offer_id") or "-")
    return table


def job_details(job: Json) -> Table:
    spec = job.get("spec") or {}
    res = spec.get("resources") or {}
    p = job.get("progress") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    gpus = f"{res.get('gpus', 0)} x {res.get('gpu_type') or 'any GPU'}" if res.get("gpus") \
        else "none"
    rows: list[tuple[str, RenderableType]] = [
        ("job", f"{job['id']}  ({job['name']})"),
        ("status", status_text(job["status"])),
        ("progress", f"step {progress(job)}" + (
            f", loss {p['loss']:.6g}" if p.get("loss") is not None else "")),
        ("offer", job.get("offer_id") or "-"),
        ("instance", job.get("instance_id") or "-"),
        ("cost", f"{money(job.get('cost_usd'))} (saved {money(job.get('savings_usd'))})"),
        ("budget", money(spec.get("budget_usd"))),
        ("endpoint", job.get("endpoint") or "-"),
        ("resources", f"GPUs: {gpus}; CPUs: {res.get('cpus')}; memory: "
                      f"{res.get('memory_gb')} GB"),
        ("command", spec.get("command", "")),
        ("created", job.get("created_at") or "-"),
        ("started", job.get("started_at") or "-"),
        ("finished", job.get("finished_at") or "-"),
    ]
    if job.get("error"):
        rows.append(("error", Text(job["error"], style="red")))
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _offset(start: datetime | None, value: str | None) -> str:
    t = parse_time(value)
    if t is None:
        return "-"
    if start is None:
        return clock_time(value)
    return f"+{(t - start).total_seconds():.1f}s"


def migrations_table(migrations: list[Json]) -> Table:
    """One row per move; phase times are offsets from the move's start."""
    table = Table(title=f"Migrations ({len(migrations)})", title_justify="left")
    for column in ("STARTED", "REASON", "STATUS", "PHASE", "FROM -> TO", "SAVING",
                   "CKPT", "RESUME", "DOWNTIME", "READY", "CKPTED", "RESUMED", "SWITCHED",
                   "DONE"):
        table.add_column(column)
    for m in migrations:
        start = parse_time(m.get("started_at"))
        downtime = m.get("downtime_s")
        table.add_row(
            clock_time(m.get("started_at")), m["reason"], status_text(m["status"]), m["phase"],
            f"{m['from_offer_id']}\n-> {m['to_offer_id']}", percent(m.get("expected_savings")),
            str(m.get("checkpoint_step") if m.get("checkpoint_step") is not None else "-"),
            str(m.get("resume_step") if m.get("resume_step") is not None else "-"),
            f"{downtime:.2f}s" if downtime is not None else "-",
            _offset(start, m.get("replacement_ready_at")),
            _offset(start, m.get("checkpointed_at")), _offset(start, m.get("resumed_at")),
            _offset(start, m.get("switched_at")), _offset(start, m.get("finished_at")),
        )
        if m.get("error"):
            table.add_row("", Text(f"error: {m['error']}", style="red"))
    return table


def events_table(events: list[Json]) -> Table:
    table = Table(title=f"Recent events ({len(events)})", title_justify="left")
    table.add_column("TIME", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("MESSAGE")
    for e in events:
        table.add_row(clock_time(e.get("time")), e["kind"], e["message"])
    return table


def decision_text(decisions: list[Json]) -> Text:
    if not decisions:
        return Text("scout: no decision yet", style="dim")
    d = decisions[-1]
    verb = "move" if d["move"] else "stay"
    line = f"scout: {verb} ({d['reason']})"
    if d.get("target_offer_id"):
        line += f"; best other offer {d['target_offer_id']}, saving {percent(d.get('savings'))}"
    return Text(line, style="magenta" if d["move"] else "")


def show_job(job: Json, migrations: list[Json], events: list[Json],
             decisions: list[Json]) -> Group:
    return Group(job_details(job), Text(""), decision_text(decisions), Text(""),
                 migrations_table(migrations), events_table(events))


def offers_table(offers: list[Json]) -> Table:
    table = Table(title=f"Offers ({len(offers)})", title_justify="left")
    for column, justify in (("ID", "left"), ("TYPE", "left"), ("CAPACITY", "left"),
                            ("ZONE", "left"), ("GPUS", "right"), ("VCPUS", "right"),
                            ("MEM GB", "right"), ("$/HOUR", "right"), ("$/WORK-HOUR", "right"),
                            ("AVAILABLE", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for o in offers:
        gpus = f"{o['gpus']} x {o['gpu_type']}" if o.get("gpus") else "0"
        table.add_row(
            o["id"], o["instance_type"], o["capacity"], o["zone"], gpus, f"{o['vcpus']:g}",
            f"{o['memory_gb']:g}", f"{o['price_per_hour']:.4f}",
            f"{o['cost_per_work_hour']:.4f}",
            Text("yes", style="green") if o["available"] else Text("no", style="red"),
        )
    return table


def instances_table(instances: list[Json]) -> Table:
    table = Table(title=f"Instances ({len(instances)})", title_justify="left")
    for column in ("ID", "JOB", "OFFER", "STATUS", "ADDRESS", "CREATED", "TERMINATED"):
        table.add_column(column)
    for i in instances:
        table.add_row(i["id"], i["job_id"], i["offer_id"], status_text(i["status"]),
                      i.get("address") or "-", clock_time(i.get("created_at")),
                      clock_time(i.get("terminated_at")))
    return table
