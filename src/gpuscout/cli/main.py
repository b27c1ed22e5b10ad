"""``gpuscout``: the command line (Typer + Rich).

``up`` runs the control plane in this process; every other command is a thin
client of the REST API (cli/client.py). The API's URL comes from ``--url``
or ``GPUSCOUT_URL`` (default http://127.0.0.1:8080), the token from
``--token``, ``GPUSCOUT_API_TOKEN`` or ``$GPUSCOUT_HOME/api_token``. Both
options are accepted before the command (``gpuscout --url U jobs``) and after
it (``gpuscout jobs --url U``).

Contract: an error is one red line on stderr naming the problem, and exit
code 1; never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import yaml  # type: ignore[import-untyped]  # (no stubs in the dev extras)
from rich.console import Console

from gpuscout.cli import render
from gpuscout.cli.client import DEFAULT_URL, ApiClient, ApiError, resolve_token

if TYPE_CHECKING:  # the client commands do not pay for importing the server
    from rich.table import Table

    from gpuscout.config import Settings
    from gpuscout.domain import JobSpec, Offer, Resources
    from gpuscout.service import Service

app = typer.Typer(
    name="gpuscout", no_args_is_help=True, add_completion=False,
    pretty_exceptions_show_locals=False,  # never print a token held in a local
    help="GPU Scout keeps ML training jobs on the cheapest GPU capacity that is really "
         "available, and moves them live without losing work.",
)
market_app = typer.Typer(no_args_is_help=False, help="The offers the scout chooses from.")
app.add_typer(market_app, name="market")

out = Console()
err = Console(stderr=True)
PIPED_WIDTH = 400


# --- connection options -------------------------------------------------------


@dataclass
class Target:
    url: str = DEFAULT_URL
    token: str | None = None


UrlOption = Annotated[str | None, typer.Option(
    "--url", help="API base URL (env: GPUSCOUT_URL; default: http://127.0.0.1:8080)",
    show_default=False)]
TokenOption = Annotated[str | None, typer.Option(
    "--token", help="API token (env: GPUSCOUT_API_TOKEN; else $GPUSCOUT_HOME/api_token)",
    show_default=False)]


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="GPUSCOUT_URL",
                                     help="API base URL")] = DEFAULT_URL,
    token: Annotated[str | None, typer.Option("--token", envvar="GPUSCOUT_API_TOKEN",
                                              help="API token", show_default=False)] = None,
) -> None:
    global out, err
    # Made per invocation so that COLUMNS and the streams in effect now count.
    # Piped (to grep, a file): rows are not wrapped at 80 columns, so one
    # job stays on one line; COLUMNS, when set, still decides.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    out, err = Console(width=PIPED_WIDTH if piped else None), Console(stderr=True)
    ctx.obj = Target(url=url, token=token)


def _client(ctx: typer.Context, url: str | None, token: str | None) -> ApiClient:
    root = ctx.find_root().obj
    target = root if isinstance(root, Target) else Target()
    return ApiClient(url or target.url, resolve_token(token or target.token))


def fail(message: str) -> NoReturn:
    err.print(f"error: {message}", style="bold red", markup=False, highlight=False,
              soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """API errors become one red line and exit code 1."""
    try:
        yield
    except ApiError as error:
        fail(error.message)


# --- up -------------------------------------------------------------------------


# Settings fields and the flags that set them, to name a bad value's flag.
_FLAGS = {"host": "--host", "port": "--port", "home": "--home",
          "scout_interval_s": "--scout-interval", "savings_threshold": "--savings-threshold",
          "market": "--market", "boot_delay_s": "--boot-delay"}


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="port to serve on (default: 8080)",
                                             show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default: 127.0.0.1)",
                                             show_default=False)] = None,
    home: Annotated[Path | None, typer.Option(help="state folder (default: ~/.gpuscout)",
                                              show_default=False)] = None,
    scout_interval: Annotated[float | None, typer.Option(
        help="seconds between scout passes per job (default: 120)", show_default=False)] = None,
    savings_threshold: Annotated[float | None, typer.Option(
        help="move when this much cheaper per unit of work (default: 0.20)",
        show_default=False)] = None,
    market: Annotated[str | None, typer.Option(
        help="price feed: manual | trace:PATH | trace:PATH@SPEED | aws (default: manual)",
        show_default=False)] = None,
    boot_delay: Annotated[float | None, typer.Option(
        help="simulated boot time of a local instance, seconds (default: 5)",
        show_default=False)] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="add the demo's own market and submit its job (once per home)")] = False,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the control plane, API, user proxy and dashboard in the foreground."""
    from pydantic import ValidationError

    from gpuscout.config import Settings

    # Only flags actually given become settings, so the environment still
    # applies to the rest.
    given: dict[str, Any] = {
        k: v for k, v in {
            "host": host, "port": port, "home": home, "scout_interval_s": scout_interval,
            "savings_threshold": savings_threshold, "market": market,
            "boot_delay_s": boot_delay,
        }.items() if v is not None
    }
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = []
        for e in error.errors():
            name = str(e["loc"][0]) if e["loc"] else "settings"
            where = f"{_FLAGS.get(name, name)} / GPUSCOUT_{name.upper()}"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        fail("; ".join(problems))
    _serve(settings, demo=demo, log_level=log_level)


def _serve(settings: Settings, *, demo: bool, log_level: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from gpuscout.server import run_server
    from gpuscout.service import build_service

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    debug = log_level.lower() == "debug"
    if not debug:  # one line per agent poll, per schema migration step
        for noisy in ("httpx", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    host, port = settings.host, settings.port
    from gpuscout.providers.base import ProviderError

    try:
        service = build_service(settings, control_url=f"http://{host}:{port}")
    except (ValueError, OSError, SQLAlchemyError, ProviderError) as error:
        fail(f"cannot start: {error}")
    if demo:
        from gpuscout.demo import enable_demo

        enable_demo(service)

    def started(url: str) -> None:
        out.print(f"[bold green]GPU Scout is up[/] at {url}  (market: {service.plane.feed.name})")
        out.print(f"  dashboard  {url}/")
        out.print(f"  API        {url}/api/v1  (docs: {url}/docs)")
        token_file = settings.home / "api_token"
        from_file = token_file.exists() and token_file.read_text().strip() == service.token
        where = str(token_file) if from_file else "GPUSCOUT_API_TOKEN"
        # The demo is for a person at this machine: show the token itself.
        out.print(f"  token      {service.token if demo else where}", markup=False,
                  highlight=False)
        if demo:
            try:
                _submit_demo(service, url)
            except Exception as error:  # the server keeps running; say why there is no demo
                err.print(f"error: could not submit the demo job: {error}", style="bold red",
                          markup=False, highlight=False)
        out.print("  stop with Ctrl-C")

    try:
        # The dashboard polls every 2 s: access lines only when debugging.
        run_server(service, host, port, log_level=log_level, access_log=debug,
                   on_started=started)
    except OSError as error:
        fail(str(error))
    except KeyboardInterrupt:
        pass
    _leave_instances(service, demo=demo)
    out.print("GPU Scout stopped")


def _leave_instances(service: Service, *, demo: bool) -> None:
    """Instances outlive the control plane, as cloud machines do, so a
    restart resumes their jobs. The demo's job is the exception: it is
    cancelled, so `make run` followed by Ctrl-C leaves no process behind."""
    from gpuscout.demo import cancel_demo
    from gpuscout.domain.states import TERMINAL, JobStatus

    if demo:
        for job in cancel_demo(service):
            out.print(f"  demo job   {job.id} cancelled; its instances are terminated")
    live = service.repo.list_jobs([s for s in JobStatus if s not in TERMINAL])
    if live:
        out.print(f"  {len(live)} job(s) keep running on their instances; `gpuscout up` with "
                  "the same home picks them up again (or cancel them to stop them)")


def _submit_demo(service: Service, url: str) -> None:
    """Submit the demo job, once per home: a later start finds it."""
    from gpuscout.demo import submit_demo

    job, submitted = submit_demo(service)
    if submitted or not job.status.is_terminal():
        verb = "submitted" if submitted else "resumed"
        out.print(f"  demo job   {job.id} {verb}: watch it move at {url}/ "
                  f"(or `gpuscout show {job.id}`)")
        return
    out.print(f"  demo job   {job.id} ran in this home already ({job.status.value}); the demo "
              "submits its job once per home: to watch it again, start with a new home "
              "(GPUSCOUT_HOME=$(mktemp -d) make run)", markup=False, highlight=False)


# --- jobs -------------------------------------------------------------------------


def _yaml_value(value: Any) -> Any:
    """YAML reads unquoted timestamps as datetimes; JSON wants strings."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _yaml_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    return value


def read_job_file(path: Path) -> dict[str, Any]:
    """The job file's mapping; raises ValueError with a message for a user."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read job file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(error, "problem", None) or "syntax error"
        raise ValueError(f"job file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"job file {path} must be a mapping of job fields "
                         "(name, command, resources, ...)")
    result: dict[str, Any] = _yaml_value(data)
    return result


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` options (``KEY`` alone: the value from this shell's
    environment, as SkyPilot's ``--env``/``--secret`` do)."""
    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                fail(f"{option} {key}: no value given and {key} is not set in this shell")
            value = os.environ[key]
        if not key:
            fail(f"{option} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def load_job_file(file: Path, *, envs: dict[str, str] | None = None,
                  secrets: dict[str, str] | None = None,
                  placeholders: bool = False) -> tuple[dict[str, Any], Path]:
    """A job file's body (a GPU Scout job file, or a SkyPilot task file
    mapped onto one, its notes printed) and the folder its paths are
    relative to. ``envs``/``secrets`` given on the command line fill a
    SkyPilot file's variables left without a value (``HF_TOKEN: null``, as
    ``sky launch --secret HF_TOKEN`` expects); with ``placeholders``, any
    left are empty (to plan a job). Exits with one line on error."""
    from gpuscout.skypilot import TaskFileError, from_skypilot, looks_like_skypilot

    try:
        body = read_job_file(file)
        if looks_like_skypilot(body):
            for key, given in (("envs", envs or {}), ("secrets", secrets or {})):
                values = body.get(key)
                if isinstance(values, dict):
                    body[key] = {k: given.get(k, "" if placeholders else None)
                                 if v is None else v for k, v in values.items()}
            mapping = from_skypilot(body, default_name=file.stem)
            body = mapping.body
            for note in mapping.notes:
                err.print(f"note: {note}", style="dim", markup=False, highlight=False)
    except TaskFileError as error:
        fail(f"{file}: {error}")
    except ValueError as error:
        fail(str(error))
    return body, file.parent


def validate_job(body: dict[str, Any]) -> JobSpec:
    """``body`` as a job spec, validated by the API's own schema
    (``JobCreate``); exits with one line naming each bad field."""
    from pydantic import ValidationError

    from gpuscout.domain.jobinput import JobCreate, describe

    try:
        return JobCreate.model_validate(body).to_spec()
    except ValidationError as error:
        fail(f"invalid job: {describe(error)}")


def workdir_folder(body: dict[str, Any], base: Path, given: Path | None) -> Path | None:
    """The project folder to pack: ``--workdir``, else the job file's
    ``workdir`` (relative to the job file); None when there is none or it
    is already a stored reference. Exits with one line if it is no folder."""
    folder = given
    value = body.get("workdir")
    if folder is None and isinstance(value, str) and not value.startswith("sha256:"):
        folder = base / Path(value).expanduser()
    if folder is None:
        return None
    if not folder.is_dir():
        fail(f"workdir {folder} does not exist or is not a folder")
    return folder.resolve()


def _ship_workdir(api: ApiClient, folder: Path) -> str:
    """Pack ``folder`` (leaving out .git and what .gitignore names), upload
    it unless the control plane has it, and return its reference."""
    from gpuscout.workdir import WorkdirError, pack

    try:
        packed = pack(folder)
    except WorkdirError as error:
        fail(str(error))
    try:
        sent = api.upload_workdir(packed.path, packed.ref)
    finally:
        packed.path.unlink(missing_ok=True)
    what = "uploaded" if sent else "already stored"
    err.print(f"workdir {folder}: {packed.files} files, {packed.size / 1e6:.1f} MB packed, "
              f"{what}", style="dim", markup=False, highlight=False)
    return packed.ref


@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(
        help="YAML job file (its keys are the fields of POST /api/v1/jobs), or a SkyPilot "
             "task file (run, setup, workdir, envs, resources, ...)",
        show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="job name")] = None,
    command: Annotated[str | None, typer.Option(help="shell command to run")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs needed")] = None,
    gpu_type: Annotated[str | None, typer.Option(help="GPU type, e.g. V100")] = None,
    cpus: Annotated[float | None, typer.Option(help="vCPUs needed")] = None,
    memory_gb: Annotated[float | None, typer.Option(help="memory needed, GB")] = None,
    expected_hours: Annotated[float | None, typer.Option(help="expected duration, hours")] = None,
    budget: Annotated[float | None, typer.Option(help="budget, USD")] = None,
    model: Annotated[str | None, typer.Option(help="model name (informational)")] = None,
    dataset_size_gb: Annotated[float | None, typer.Option(help="dataset size, GB")] = None,
    workload_type: Annotated[str | None, typer.Option(
        help="training | fine-tuning | inference")] = None,
    workdir: Annotated[Path | None, typer.Option(
        help="project folder shipped to every instance (default: the job file's workdir, "
             "relative to the job file)", show_default=False)] = None,
    setup: Annotated[str | None, typer.Option(
        help="command run once per instance before the job's command")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="KEY=VALUE environment variable (repeatable; KEY alone: from this "
                      "shell)", show_default=False)] = None,
    secret: Annotated[list[str] | None, typer.Option(
        "--secret", help="KEY=VALUE secret variable, never shown back (repeatable; KEY "
                         "alone: from this shell)", show_default=False)] = None,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """Submit a job from a YAML file and/or flags (flags win); prints its id."""
    envs, secrets = _pairs(env, "--env"), _pairs(secret, "--secret")
    body, base = load_job_file(file, envs=envs, secrets=secrets) if file else ({}, Path.cwd())
    flags = {"name": name, "command": command, "expected_duration_hours": expected_hours,
             "budget_usd": budget, "model": model, "dataset_size_gb": dataset_size_gb,
             "workload_type": workload_type, "setup": setup}
    body.update({k: v for k, v in flags.items() if v is not None})
    for key, given in (("envs", envs), ("secrets", secrets)):
        if given:
            current = body.get(key)
            body[key] = {**(current if isinstance(current, dict) else {}), **given}
    folder = workdir_folder(body, base, workdir)
    resources = {k: v for k, v in {"gpus": gpus, "gpu_type": gpu_type, "cpus": cpus,
                                   "memory_gb": memory_gb}.items() if v is not None}
    if resources:
        current = body.get("resources")
        body["resources"] = {**(current if isinstance(current, dict) else {}), **resources}
    if file is None and not body:
        fail("give a YAML job file or at least --name and --command")
    # Checked here as the API will check it, so that a bad job is named
    # before anything is packed or sent (and .nan never reaches the JSON encoder).
    validate_job({k: v for k, v in body.items() if k != "workdir"} if folder else body)
    with _client(ctx, url, token) as api:
        try:
            if folder is not None:
                body["workdir"] = _ship_workdir(api, folder)
            job = api.submit(body)
        except ApiError as error:
            fail(f"invalid job: {error.message}" if error.status_code == 422
                 else error.message)
    out.print(job["id"], markup=False, highlight=False)


@app.command()
def logs(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="keep printing new lines until the job ends (then exit 1 "
                               "unless it completed)")] = False,
    tail: Annotated[int | None, typer.Option(
        "--tail", "-n", min=0, help="only the last N lines", show_default=False)] = None,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """The job's setup and command output, one log across its moves."""
    with friendly_errors(), _client(ctx, url, token) as api:
        if not follow:
            sys.stdout.write(api.logs(job, tail))
            return
        try:
            for line in api.follow_logs(job, tail):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
        # The stream ends with the job: say how, and exit 1 unless it completed.
        data = api.job(job)
    if data["status"] != "completed":
        reason = (data.get("error") or "").splitlines()[-1:] or [""]
        fail(f"job {job} {data['status']}" + (f": {reason[0]}" if reason[0] else ""))


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="only jobs in this status")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON, for scripts")] = False,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """List jobs: id, name, status, step/total, cost, savings, offer."""
    with friendly_errors(), _client(ctx, url, token) as api:
        data = api.jobs(status)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out.print(render.jobs_table(data))


@app.command()
def show(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="job id")],
    events: Annotated[int, typer.Option(help="how many recent events to show")] = 15,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """A job's details, its migrations and its recent events."""
    with friendly_errors(), _client(ctx, url, token) as api:
        data = api.job(job)
        out.print(render.show_job(data, api.migrations(job), api.events(job, events),
                                  api.decisions(job)))


@app.command()
def cancel(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="job id")],
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """Cancel a job; its instances are terminated."""
    with friendly_errors(), _client(ctx, url, token) as api:
        data = api.cancel(job)
    out.print(f"job {data['id']} is {data['status']}", markup=False, highlight=False)


def _interactive() -> bool:
    """Whether a person can answer a prompt (tests replace this)."""
    return sys.stdin.isatty()


def _move_figures(api: ApiClient, job_id: str, target_id: str) -> tuple[str, bool] | None:
    """What a move to ``target_id`` costs or saves per remaining work hour,
    in one line, and whether it is dearer; None when the offers are not
    known here (the API then answers with the reason)."""
    job = api.job(job_id)
    offers = {o["id"]: o for o in api.offers()}
    current, target = offers.get(job.get("offer_id") or ""), offers.get(target_id)
    if current is None or target is None:
        return None
    resources = (job.get("spec") or {}).get("resources") or {}
    by_hour = not resources.get("gpus") and not resources.get("gpu_type")

    def per_work_hour(o: dict[str, Any]) -> float:
        # A job that asks for no GPU is priced by the hour (the policy's view).
        return float(o["price_per_hour"] if by_hour else o["cost_per_work_hour"])

    cur, tgt = per_work_hour(current), per_work_hour(target)
    diff = cur - tgt
    change = render.saving_phrase(diff / cur if cur > 0 else 0.0)
    verdict = (f"saves {render.money(diff)}" if diff >= 0
               else f"costs {render.money(-diff)} more")
    line = (f"{current['id']} {render.money(current['price_per_hour'])}/h -> {target['id']} "
            f"{render.money(target['price_per_hour'])}/h: {verdict} per remaining work hour "
            f"({change}")
    decisions = api.decisions(job_id)
    work = decisions[0].get("remaining_work_hours") if decisions else None
    if work:
        line += f"; about {render.money(abs(diff) * work)} over {work:.2f} work hours left"
    return line + ")", diff < 0


@app.command()
def migrate(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="job id")],
    to: Annotated[str | None, typer.Option(
        "--to", "--offer", help="target offer id (shows what it saves or costs per work "
        "hour, and asks); without it, the offer that saves most, if one does")] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="move to --to without asking, even if it is dearer")] = False,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """Move a running job now, live (make-before-break)."""
    with friendly_errors(), _client(ctx, url, token) as api:
        confirmed = False
        if to is not None:
            status = api.job(job)["status"]  # a job that cannot move says so first
            if status != "running":
                fail(f"job {job} is {status}; only a running job can move")
            if not yes and not _interactive():
                fail(f"not moving {job} to {to} without confirmation: no terminal to ask on "
                     "(pass --yes to confirm)")
            figures = _move_figures(api, job, to)
            if figures is not None:
                out.print(figures[0], markup=False, highlight=False, soft_wrap=True)
            if not yes:
                dearer = figures is not None and figures[1]
                if not typer.confirm("Move to this dearer offer?" if dearer else "Move?",
                                     default=False):
                    fail("not moved")
            confirmed = True
        m = api.migrate(job, to, confirm_dearer=confirmed)
    out.print(f"migration {m['id']} started: {m['from_offer_id']} -> {m['to_offer_id']} "
              f"(follow it with `gpuscout show {job}`)", markup=False, highlight=False)


@app.command()
def instances(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option("--job", help="only this job's")] = None,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """List instances, live and past."""
    with friendly_errors(), _client(ctx, url, token) as api:
        out.print(render.instances_table(api.instances(job)))


# --- market -----------------------------------------------------------------------


@market_app.callback(invoke_without_command=True)
def market(
    ctx: typer.Context,
    available_only: Annotated[bool, typer.Option(
        "--available-only", help="only offers with capacity now")] = False,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """List the offers (`market set` changes one, on a manual market)."""
    if ctx.invoked_subcommand is not None:
        return
    with friendly_errors(), _client(ctx, url, token) as api:
        out.print(render.offers_table(api.offers(available=True if available_only else None)))


@market_app.command("set")
def market_set(
    ctx: typer.Context,
    offer_id: Annotated[str, typer.Argument(help="offer id, as `gpuscout market` lists it")],
    price: Annotated[float | None, typer.Option(help="new price per hour, USD")] = None,
    available: Annotated[bool | None, typer.Option(
        "--available/--unavailable", help="whether the offer has capacity",
        show_default=False)] = None,
    url: UrlOption = None, token: TokenOption = None,
) -> None:
    """Set an offer's price and/or availability (manual market only)."""
    if price is None and available is None:
        fail("give --price and/or --available/--unavailable")
    if price is not None and not math.isfinite(price):  # JSON cannot carry it
        fail("--price: must be a finite number")
    with friendly_errors(), _client(ctx, url, token) as api:
        o = api.update_offer(offer_id, price_per_hour=price, available=available)
    state = "available" if o["available"] else "unavailable"
    out.print(f"{o['id']}: ${o['price_per_hour']:.4f}/h, {state}", markup=False,
              highlight=False)


# --- plan -------------------------------------------------------------------------


def why_excluded(offer: Offer, resources: Resources) -> str | None:
    """Why ``offer`` cannot take a job needing ``resources`` (None: it can),
    as the policy's one eligibility filter says (``why_ineligible``): the
    first requirement it does not meet, else no capacity now. A plan is
    for a new job, which avoids no zone."""
    from gpuscout.policy import why_ineligible

    return why_ineligible(offer, resources)


def expected_cost(offer: Offer, hours: float) -> float:
    """What ``hours`` of work at relative speed 1.0 cost on ``offer``."""
    return hours / offer.relative_speed * offer.price_per_hour


def plan_table(spec: JobSpec, offers: list[Offer], chosen: Offer | None) -> Table:
    """Every offer as the job sees it (``offers_for``: a job that asks for no
    GPU is priced by the hour), cheapest per work hour first, with the
    expected cost of the whole job on it or why it is excluded."""
    from rich.table import Table
    from rich.text import Text

    from gpuscout.policy.placement import offers_for, pricing

    table = render._table(f"Offers considered for {spec.name} ({len(offers)}), "
                          f"priced by: {pricing(spec.resources)}")
    for column, justify in (("OFFER", "left"), ("GPUS", "left"), ("$/HOUR", "right"),
                            ("SPEED", "right"), ("$/WORK-H", "right"),
                            ("EXPECTED", "right"), ("", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "",  # type: ignore[arg-type]
                         overflow="fold")
    ranked = offers_for(spec.resources, offers).sorted_by_cost()
    for o in ranked:
        excluded = why_excluded(o, spec.resources)
        if chosen is not None and o.id == chosen.id:
            note = Text("chosen", style="bold green")
        elif excluded:
            note = Text(f"excluded: {excluded}", style="dim")
        else:
            note = Text("")
        gpus = f"{o.gpus} x {o.gpu_type}" if o.gpus else "-"
        table.add_row(o.id, gpus, f"{o.price_per_hour:.4f}", f"{o.relative_speed:g}",
                      f"{o.cost_per_work_hour:.4f}",
                      render.money(expected_cost(o, spec.expected_duration_hours)), note,
                      style="dim" if excluded else None)
    assert isinstance(table, Table)
    return table


def _plan_offers(provider: str) -> list[Offer]:
    if provider == "local":
        from gpuscout.market.catalog import default_local_catalog

        return default_local_catalog()
    from gpuscout.config import Settings
    from gpuscout.providers.aws import AwsProvider
    from gpuscout.providers.base import ProviderError

    try:
        return AwsProvider.from_settings(Settings()).offers()
    except ProviderError as error:
        fail(f"cannot read AWS offers: {error}")
    except Exception as error:  # credentials, region, endpoint: botocore says which
        fail(f"cannot read AWS offers: {type(error).__name__}: {error}")


@app.command()
def plan(
    file: Annotated[Path, typer.Argument(help="YAML job file, as for `submit`")],
    provider: Annotated[str, typer.Option(
        help="whose offers: local (the built-in catalog) | aws (live, from EC2 with "
             "GPUSCOUT_AWS_* settings and AWS credentials)")] = "local",
) -> None:
    """Show where a job would run and what it would cost, without launching.

    Every offer, cheapest per unit of work first, with why an offer is
    excluded; then the placement the control plane's policy would choose on
    these offers and the expected cost: expected_duration_hours / relative
    speed x price per hour. The offers are the provider's catalog (local) or
    EC2's live ones (aws), not a running control plane's market: prices set
    with `gpuscout market set` are not seen here.
    """
    from datetime import UTC

    from gpuscout.domain import Job, JobStatus
    from gpuscout.policy import fits_catalog, place_job, pricing

    if provider not in ("local", "aws"):
        fail(f"--provider must be local or aws, not {provider!r}")
    body, base = load_job_file(file, placeholders=True)
    if workdir_folder(body, base, None) is not None:
        body.pop("workdir")  # packed and uploaded at submit; nothing to plan
    body.pop("secrets", None)  # (values may be left for --secret at submit)
    spec = validate_job(body)
    offers = _plan_offers(provider)
    now = datetime.now(UTC)
    job = Job(id="plan", spec=spec, status=JobStatus.SCOUTING, created_at=now)
    decision = place_job(job, offers, now)
    out.print(plan_table(spec, offers, decision.offer))
    out.print(f"[bold]Priced by:[/] {pricing(spec.resources)}", highlight=False)
    if decision.offer is None:
        never = fits_catalog(spec.resources, offers)
        out.print(f"[bold yellow]No placement now:[/] {decision.reason}"
                  + (f"; {never}" if never else ""), highlight=False)
        raise typer.Exit(1 if not any(why_excluded(o, spec.resources) is None
                                      for o in offers) else 0)
    chosen = decision.offer
    cost = expected_cost(chosen, spec.expected_duration_hours)
    out.print(f"[bold]Choice:[/] {chosen.id}  ({decision.reason})", highlight=False)
    hours = spec.expected_duration_hours / chosen.relative_speed
    line = (f"[bold]Expected cost:[/] {render.money(cost)}  = "
            f"{spec.expected_duration_hours:g} h of work / speed {chosen.relative_speed:g} "
            f"= {hours:.2f} h at ${chosen.price_per_hour:.4f}/h")
    if spec.budget_usd is not None:
        verdict = "within" if cost <= spec.budget_usd else "[bold red]over[/]"
        line += f"  ({verdict} the budget of {render.money(spec.budget_usd)})"
    out.print(line, highlight=False)


from gpuscout.cli.sim import simulate as _simulate  # noqa: E402

app.command("simulate")(_simulate)

if __name__ == "__main__":  # python -m gpuscout.cli.main
    app(prog_name="gpuscout")
