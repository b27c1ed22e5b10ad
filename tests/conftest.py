"""Shared fixtures, and the test tiers.

Fixtures every tier may use are registered here once (``pytest_plugins``),
not imported into each module:
- ``tests.s3_servers``: ``moto_server``, ``s3rver_server`` (S3 on loopback);
- ``tests.integration.aws_moto``: ``aws_env`` (EC2 and S3 on moto),
  ``instant_retries``;
- ``tests.api_fixtures``: a real Service over the fake provider and agents,
  on SQLite and the real PostgreSQL (``database_url``, ``pg_database``,
  ``service``, ``client``, ``agents``, ``provider``).
``tests/unit/conftest.py`` gives the unit tier its own ``agents``,
``provider`` and ``service`` (fakes, no server), which win there.

Tiers, by folder, each a marker (``pytest -m unit`` runs the fast tier):
- ``unit``: pure code and fakes: no server, no process, no browser;
- ``integration``: a real server or process: moto, s3rver, PostgreSQL,
  uvicorn, the agent, Chromium;
- ``e2e``: the whole control plane over real processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_servers", "tests.integration.aws_moto", "tests.api_fixtures"]

_TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))
