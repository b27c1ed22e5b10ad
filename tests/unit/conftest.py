"""The unit tier's control plane: a real Service (SQLite in tmp_path, a file
store, the real loops driven by hand) over the fake provider and in-memory
agents, with short timeouts; no server, no process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuscout.agent.fake import FakeAgents, fake_address
from gpuscout.config import Settings
from gpuscout.controllers.context import Timeouts
from gpuscout.providers.fake import FakeProvider
from gpuscout.service import Service, build_service


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents()


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider(address_for=fake_address)


@pytest.fixture
def service(tmp_path: Path, provider: FakeProvider, agents: FakeAgents) -> Iterator[Service]:
    settings = Settings(home=tmp_path, scout_interval_s=120, api_token="t")
    svc = build_service(settings, provider=provider, agents=agents)
    svc.ctx.timeouts = Timeouts(health_s=0.5, checkpoint_s=1, resume_s=0.5, drain_s=0.5,
                                lost_s=0.0)
    svc.ctx.poll_interval_s = 0.005
    svc.plane.feed.start(svc.repo, svc.ctx.clock.now())
    yield svc
    svc.plane.stop()
