from gpuscout.db.engine import make_engine, migrate
from gpuscout.db.repo import (
    ConcurrentChange,
    Event,
    Memory,
    NotFound,
    Repository,
    Sample,
    new_id,
)

__all__ = [
    "ConcurrentChange", "Event", "Memory", "NotFound", "Repository", "Sample", "make_engine",
    "migrate", "new_id",
]


def open_repository(url: str) -> Repository:
    """Engine + migrations + repository, ready to use."""
    engine = make_engine(url)
    migrate(engine)
    return Repository(engine)
