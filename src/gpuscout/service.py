"""Wiring: Settings in, a ready control plane out (nothing started yet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuscout.clock import Clock, SystemClock
from gpuscout.config import Settings
from gpuscout.controllers.agent_client import AgentClient, Agents
from gpuscout.controllers.context import Context, Timeouts
from gpuscout.controllers.plane import ControlPlane, Intervals
from gpuscout.db import Repository, open_repository
from gpuscout.market.catalog import default_local_catalog
from gpuscout.market.feeds import PriceFeed, open_feed
from gpuscout.metrics import Metrics
from gpuscout.policy import MoveCosts, MovePolicy
from gpuscout.providers.base import Provider
from gpuscout.routing.router import Router
from gpuscout.secretbox import SecretBox
from gpuscout.store import open_store


@dataclass
class Service:
    settings: Settings
    repo: Repository
    plane: ControlPlane
    token: str

    @property
    def ctx(self) -> Context:
        return self.plane.ctx


def make_provider(settings: Settings) -> Provider:
    if settings.provider == "local":
        from gpuscout.providers.local import LocalProvider

        return LocalProvider(Path(settings.home) / "local", boot_delay_s=settings.boot_delay_s)
    if settings.provider == "aws":
        from gpuscout.providers.aws import AwsProvider

        return AwsProvider.from_settings(settings)
    raise ValueError(f"provider {settings.provider!r} is not available (use local or aws)")


def move_costs(settings: Settings, provider: Provider) -> MoveCosts:
    """The scout's estimates of a move's overheads, before any move is
    measured: a local instance is a process that boots in boot_delay_s and
    checkpoints to a local folder; a cloud GPU instance boots in minutes."""
    if provider.name == "local":
        boot, checkpoint, restore = settings.boot_delay_s + 2.0, 2.0, 2.0
    else:
        boot, checkpoint, restore = 180.0, 30.0, 60.0
    return MoveCosts(
        boot_s=settings.move_boot_s if settings.move_boot_s is not None else boot,
        checkpoint_s=(settings.move_checkpoint_s if settings.move_checkpoint_s is not None
                      else checkpoint),
        restore_s=settings.move_restore_s if settings.move_restore_s is not None else restore,
        egress_usd_per_gb=settings.egress_usd_per_gb,
    )


def build_service(
    settings: Settings, *, provider: Provider | None = None, agents: Agents | None = None,
    feed: PriceFeed | None = None, clock: Clock | None = None, control_url: str | None = None,
) -> Service:
    """Everything the control plane needs, from settings; any collaborator
    can be handed in instead (tests, the simulator)."""
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    token = settings.ensure_token()
    repo = open_repository(settings.resolved_database_url())
    store_url = settings.resolved_store_url()
    provider = provider or make_provider(settings)
    catalog = provider.offers() or default_local_catalog()
    ctx = Context(
        repo=repo, provider=provider, agents=agents or AgentClient(), router=Router(),
        store=open_store(store_url), clock=clock or SystemClock(), metrics=Metrics(),
        store_url=store_url, control_url=control_url,
        timeouts=Timeouts(health_s=settings.health_timeout_s,
                          checkpoint_s=settings.checkpoint_timeout_s),
        zone_backoff_s=settings.zone_backoff_s,
        secretbox=SecretBox.from_home(Path(settings.home), settings.secrets_key),
    )
    ctx.load_memory()  # what a previous run learnt: zones to avoid, notices answered
    if feed is None and settings.market == "aws":
        from gpuscout.market.aws_prices import AwsPriceFeed

        feed = AwsPriceFeed(provider.offers, refresh_s=settings.aws.offers_ttl_s)
    plane = ControlPlane(
        ctx, feed or open_feed(settings.market, catalog),
        MovePolicy(savings_threshold=settings.savings_threshold,
                   min_dwell_s=settings.min_dwell_s, max_moves=settings.max_moves_per_job,
                   deadline_margin_s=settings.deadline_margin_s,
                   recheck_s=settings.scout_interval_s),
        Intervals(reconcile_s=settings.reconcile_interval_s, scout_s=settings.scout_interval_s,
                  reaper_s=settings.reaper_interval_s),
        costs=move_costs(settings, provider),
    )
    return Service(settings=settings, repo=repo, plane=plane, token=token)
