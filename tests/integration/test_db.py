"""The schema is owned by the Alembic migrations; the ORM must match them,
on SQLite and on PostgreSQL."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gpuscout.db import make_engine, migrate, open_repository
from gpuscout.db.tables import Base


def test_migrations_create_exactly_the_tables_the_code_uses(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_what_the_control_plane_learnt_is_kept_until_it_expires(database_url: str) -> None:
    repo = open_repository(database_url)
    migrate(repo.engine)  # idempotent, also over a schema made before
    with repo.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    now = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        repo.remember("avoid_zone", "local:us-east-1a", now, until=now + timedelta(seconds=600))
        repo.remember("avoid_zone", "local:us-east-1b", now, until=now + timedelta(seconds=5))
        repo.remember("offer_scope", "job-1", now, value="demo")
        # Remembered again: replaced, not added.
        repo.remember("avoid_zone", "local:us-east-1b", now, until=now + timedelta(seconds=60))
        later = now + timedelta(seconds=30)
        kept = repo.recall(later)
        assert [(m.kind, m.name, m.value) for m in kept] == [
            ("avoid_zone", "local:us-east-1a", None), ("avoid_zone", "local:us-east-1b", None),
            ("offer_scope", "job-1", "demo")]
        assert kept[0].until == now + timedelta(seconds=600)
        assert [m.name for m in repo.recall(later, "offer_scope")] == ["job-1"]
        much_later = now + timedelta(seconds=61)
        assert [m.name for m in repo.recall(much_later, "avoid_zone")] == ["local:us-east-1a"]
        assert repo.forget_expired(much_later) == 1
        assert repo.forget_expired(much_later) == 0
        assert len(repo.recall(now)) == 2  # the expired row is gone; kept rows stay
    finally:
        repo.engine.dispose()
