"""Rich renderings of the API's JSON shapes (see api/schemas.py).

Pure: JSON dicts in, Rich renderables out, so the commands stay thin and
the tables can be read in a test's captured output.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
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


def saving_phrase(savings: float | None) -> str:
    """"25% cheaper" or "191% dearer" (never a negative saving)."""
    if savings is None:
        return "-"
    return f"{percent(savings)} cheaper" if savings >= 0 else f"{percent(-savings)} dearer"


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def clock_time(value: str | None) -> str:
    """``HH:MM:SS`` (UTC, as the API reports) or ``-``."""
    t = parse_time(value)
    return t.strftime("%H:%M:%S") if t else "-"


def offer_label(offer_id: str | None) -> str:
    """``local:us-east-1a:g4dn.xlarge:spot`` -> ``g4dn.xlarge spot us-east-1a``
    (the provider is the same for every offer of one control plane)."""
    if not offer_id:
        return "-"
    parts = offer_id.split(":")
    return f"{parts[2]} {parts[3]} {parts[1]}" if len(parts) == 4 else offer_id


def one_line(text: Any) -> Text:
    """A user's text (a job name) as one line of plain text: control
    characters (a newline) escaped, never read as Rich markup. The API
    refuses them in a name; this keeps a row whole whatever a server holds."""
    value = str(text)
    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in value))


def progress(job: Json) -> str:
    p = job.get("progress") or {}
    total = p.get("total_steps")
    return f"{p.get('step', 0)}/{total}" if total else str(p.get("step", 0))


def jobs_table(jobs: list[Json]) -> Table:
    table = _table(f"Jobs ({len(jobs)})")
    table.add_column("ID", no_wrap=True)
    table.add_column("NAME", overflow="fold")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("STEP", justify="right", no_wrap=True)
    table.add_column("COST", justify="right", no_wrap=True)
    table.add_column("SAVINGS", justify="right", no_wrap=True)
    table.add_column("OFFER", overflow="fold")
    for job in jobs:
        table.add_row(job["id"], one_line(job["name"]), status_text(job["status"]),
                      progress(job), money(job.get("cost_usd")), money(job.get("savings_usd")),
                      offer_label(job.get("offer_id")))
    return table


def job_details(job: Json) -> Table:
    spec = job.get("spec") or {}
    res = spec.get("resources") or {}
    p = job.get("progress") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    gpu_type = res.get("gpu_type")
    if isinstance(gpu_type, list):
        gpu_type = " or ".join(gpu_type)
    gpus = f"{res.get('gpus', 0)} x {gpu_type or 'any GPU'}" if res.get("gpus") else "none"
    limits = "; ".join(f"{k.replace('_', ' ')}: {res[k]}" for k in
                       ("capacity", "instance_type", "region", "zone") if res.get(k))
    rows: list[tuple[str, RenderableType]] = [
        ("job", one_line(f"{job['id']}  ({job['name']})")),
        ("status", status_text(job["status"])),
        ("progress", f"step {progress(job)}" + (
            f", loss {p['loss']:.6g}" if p.get("loss") is not None else "")),
        ("offer", job.get("offer_id") or "-"),
        ("instance", job.get("instance_id") or "-"),
        ("cost", f"{money(job.get('cost_usd'))} (saved {money(job.get('savings_usd'))})"),
        ("budget", money(spec.get("budget_usd"))),
        ("endpoint", job.get("endpoint") or "-"),
        ("resources", f"GPUs: {gpus}; CPUs: {res.get('cpus')}; memory: "
                      f"{res.get('memory_gb')} GB" + (f"; {limits}" if limits else "")),
        ("command", spec.get("command", "")),
        ("created", job.get("created_at") or "-"),
        ("started", job.get("started_at") or "-"),
        ("finished", job.get("finished_at") or "-"),
    ]
    extras = {
        "setup": spec.get("setup"),
        "workdir": spec.get("workdir"),
        "envs": " ".join(f"{k}={v}" for k, v in (spec.get("envs") or {}).items()),
        "secrets": ", ".join(spec.get("secrets") or ()),  # names only: values are never shown
        "restarts": (f"{job.get('restarts', 0)} of {spec['max_restarts_on_errors']}"
                     if spec.get("max_restarts_on_errors") else None),
    }
    rows[10:10] = [(k, str(v)) for k, v in extras.items() if v]
    if job.get("error"):
        rows.append(("error", Text(job["error"], style="red")))
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold",
                 box=box.SIMPLE_HEAD, header_style="bold")


def _offset(start: datetime | None, value: str | None) -> str:
    t = parse_time(value)
    if t is None:
        return "-"
    if start is None:
        return clock_time(value)
    return f"+{(t - start).total_seconds():.1f}s"


def migrations_table(migrations: list[Json]) -> Table:
    """One row per move; phase times are offsets from the move's start."""
    table = _table(f"Migrations ({len(migrations)})")
    table.add_column("STARTED", no_wrap=True)
    table.add_column("REASON", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("FROM -> TO", overflow="fold")
    table.add_column("STEPS", justify="right", no_wrap=True)
    table.add_column("DOWNTIME", justify="right", no_wrap=True)
    table.add_column("PHASES", no_wrap=True)
    for m in migrations:
        start = parse_time(m.get("started_at"))
        downtime = m.get("downtime_s")
        status = status_text(m["status"])
        if m["status"] == "in_progress":
            status.append(f"\n{m['phase']}", style="dim")
        phases = "\n".join(
            f"{label} {_offset(start, m.get(key))}"
            for label, key in (("ready", "replacement_ready_at"), ("ckpt", "checkpointed_at"),
                               ("resumed", "resumed_at"), ("switched", "switched_at"),
                               ("done", "finished_at"))
            if m.get(key))
        table.add_row(
            clock_time(m.get("started_at")), m["reason"], status,
            f"{offer_label(m['from_offer_id'])}\n-> {offer_label(m['to_offer_id'])}\n"
            f"({saving_phrase(m.get('expected_savings'))} expected)",
            f"ckpt {_or_dash(m.get('checkpoint_step'))}\n"
            f"resume {_or_dash(m.get('resume_step'))}",
            f"{downtime:.2f}s" if downtime is not None else "-", phases or "-",
        )
        if m.get("error"):
            table.add_row("", "", Text(f"error: {m['error']}", style="red"))
    return table


def events_table(events: list[Json]) -> Table:
    table = _table(f"Recent events ({len(events)})")
    table.add_column("TIME", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("MESSAGE")
    for e in events:
        table.add_row(clock_time(e.get("time")), e["kind"], e["message"])
    return table


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def decision_text(decisions: list[Json]) -> Text:
    """The latest decision: what and why, then the numbers it weighed."""
    if not decisions:
        return Text("scout: no decision yet", style="dim")
    d = decisions[-1]
    trigger = d.get("trigger", "price")
    verb = ("launch" if d["move"] else "wait") if trigger == "placement" else (
        "move" if d["move"] else "stay")
    when = clock_time(d.get("decided_at")) if d.get("decided_at") else ""
    text = Text(f"scout: {verb} [{trigger}{' at ' + when if when else ''}] ({d['reason']})",
                style="magenta" if d["move"] else "")
    numbers = []
    if d.get("current_cost_per_work_hour") is not None or d.get("target_cost_per_work_hour"):
        numbers.append(f"per work hour {_money(d.get('current_cost_per_work_hour'))} -> "
                       f"{_money(d.get('target_cost_per_work_hour'))}")
    if d.get("target_offer_id") and trigger != "placement":
        numbers.append(f"saving {d.get('savings', 0.0):.1%}"
                       + (f" (threshold {d['threshold']:.0%})"
                          if d.get("threshold") is not None else ""))
    if d.get("remaining_work_hours") is not None:
        numbers.append(f"remaining {d['remaining_work_hours']:.2f} work h")
    if d.get("expected_saving_usd") is not None:
        numbers.append(f"expected saving {_money(d['expected_saving_usd'])}")
    if d.get("move_cost_usd") is not None:
        numbers.append(f"move cost {_money(d['move_cost_usd'])}")
    if d.get("budget_left_usd") is not None:
        numbers.append(f"budget left ${d['budget_left_usd']:.2f}")
    if d.get("deadline_slack_s") is not None:
        numbers.append(f"deadline slack {d['deadline_slack_s'] / 3600:.2f} h")
    if numbers:
        text.append("\n  " + ", ".join(numbers), style="dim")
    return text


_ENDED = ("completed", "failed", "cancelled")


def show_job(job: Json, migrations: list[Json], events: list[Json],
             decisions: list[Json]) -> Group:
    # A job that ended has no decision that applies any more.
    scout = (Text(f"scout: none (the job is {job['status']})", style="dim")
             if job.get("status") in _ENDED else decision_text(decisions))
    return Group(job_details(job), Text(""), scout, Text(""),
                 migrations_table(migrations), events_table(events))


def offers_table(offers: list[Json]) -> Table:
    # The id names provider, zone, type and capacity, and is what `market
    # set` takes, so it is shown whole; the rest fits in 80 columns beside it.
    table = _table(f"Offers ({len(offers)})")
    width = max((len(o["id"]) for o in offers), default=2)
    table.add_column("ID", no_wrap=True, min_width=width)
    table.add_column("GPUS", no_wrap=True)
    table.add_column("$/HOUR", justify="right", no_wrap=True)
    table.add_column("$/WORK-H", justify="right", no_wrap=True)
    table.add_column("AVAIL", no_wrap=True)
    for o in offers:
        gpus = f"{o['gpus']} x {o['gpu_type']}" if o.get("gpus") else "-"
        table.add_row(
            o["id"], gpus, f"{o['price_per_hour']:.4f}", f"{o['cost_per_work_hour']:.4f}",
            Text("yes", style="green") if o["available"] else Text("no", style="red"),
        )
    return table


def instances_table(instances: list[Json]) -> Table:
    table = _table(f"Instances ({len(instances)})")
    for column in ("ID", "JOB", "OFFER", "STATUS", "ADDRESS", "CREATED", "TERMINATED"):
        table.add_column(column, no_wrap=column != "OFFER", overflow="fold")
    for i in instances:
        table.add_row(i["id"], i["job_id"], offer_label(i["offer_id"]), status_text(i["status"]),
                      i.get("address") or "-", clock_time(i.get("created_at")),
                      clock_time(i.get("terminated_at")))
    return table
