"""Fixtures for the API, CLI and dashboard tests: a real Service (real
database, real store, real control plane) over the fake provider and
in-memory agents, so jobs run without processes.

``database_url`` is parametrized over SQLite (a file in tmp_path) and the
real PostgreSQL at 127.0.0.1:5432, where one fresh database is created per
test session and dropped at its end; each test starts from empty tables.
A PostgreSQL that cannot be reached fails the tests rather than skipping them.

Registered for every test by ``tests/conftest.py`` (``pytest_plugins``);
the unit tier's own ``agents``, ``provider`` and ``service`` win there.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gpuscout.agent.fake import FakeAgents, fake_address
from gpuscout.api import create_app
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.db.tables import Base
from gpuscout.domain import JobStatus
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service

with warnings.catch_warnings():
    # Starlette asks for the httpx2 package in place of httpx; both work.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POSTGRES_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"

# The offers the fake catalog's cheapest GPU job lands on, and moves to.
P3_SPOT_A = "local:us-east-1a:p3.2xlarge:spot"
G4_SPOT_B = "local:us-east-1b:g4dn.xlarge:spot"


address_for = fake_address


class GatedAgents(FakeAgents):
    """FakeAgents whose restore waits for ``release`` to be set, so a test
    can hold a migration in flight (the job stays MIGRATING meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.release.set()

    def restore(self, address: str, step: int | None) -> None:
        self.release.wait(10)
        super().restore(address, step)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped after it."""
    name = f"gpuscout_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _empty_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            existing = {r[0] for r in conn.execute(text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
            names = [t.name for t in Base.metadata.sorted_tables if t.name in existing]
            if names:
                conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gpuscout.db'}"
    url: str = request.getfixturevalue("pg_database")
    _empty_tables(url)
    return url


@pytest.fixture
def agents() -> GatedAgents:
    return GatedAgents()


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider(address_for=address_for)


def make_service(home: Path, database_url: str, provider: FakeProvider, agents: FakeAgents,
                 **settings: object) -> Service:
    """A Service with the market seeded, its loops not started."""
    config = Settings(home=home, database_url=database_url, api_token=TOKEN,
                      **settings)  # type: ignore[arg-type]
    service = build_service(config, provider=provider, agents=agents)
    service.ctx.timeouts = Timeouts(health_s=2, checkpoint_s=2, resume_s=2, drain_s=1,
                                    lost_s=0.0)
    service.ctx.poll_interval_s = 0.005
    service.plane.feed.start(service.repo, service.ctx.clock.now())
    return service


def close_service(service: Service) -> None:
    service.plane.stop()
    service.repo.engine.dispose()


@pytest.fixture
def service(tmp_path: Path, database_url: str, provider: FakeProvider,
            agents: GatedAgents) -> Iterator[Service]:
    svc = make_service(tmp_path / "home", database_url, provider, agents)
    yield svc
    agents.release.set()
    close_service(svc)


@pytest.fixture
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as test_client:
        yield test_client


def run_until(service: Service, job_id: str, status: JobStatus, passes: int = 30) -> None:
    """Drive the reconcile loop by hand until the job reaches ``status``."""
    for _ in range(passes):
        if service.repo.get_job(job_id).status == status:
            return
        service.plane.reconcile_once()
    assert service.repo.get_job(job_id).status == status


def make_g4_spot_unavailable(service: Service) -> None:
    """So that a GPU job starts on p3.2xlarge spot in us-east-1a and has
    somewhere cheaper to move once g4dn spot returns."""
    for offer in service.repo.list_offers():
        if offer.instance_type == "g4dn.xlarge" and offer.capacity.value == "spot":
            service.plane.update_offer(offer.id, available=False)
