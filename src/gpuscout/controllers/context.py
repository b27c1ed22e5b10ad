"""What every controller is handed: collaborators and shared helpers.

Controllers read snapshots from the repository, call the pure policy, and
carry out what it returns through these collaborators. Nothing here decides.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gpuscout.clock import Clock
from gpuscout.controllers.agent_client import AgentError, Agents
from gpuscout.db import NotFound, Repository, new_id
from gpuscout.domain import Instance, InstanceStatus, Job, Offer
from gpuscout.market.history import CapacityHistory
from gpuscout.metrics import Metrics
from gpuscout.policy import ZONE_BACKOFF_S
from gpuscout.providers.base import LaunchRequest, Provider, ProviderError, ProviderInstance
from gpuscout.routing.router import Router
from gpuscout.secretbox import SecretBox, SecretBoxError
from gpuscout.store.base import ObjectStore

log = logging.getLogger("gpuscout.controllers")

# What the control plane learns is kept in the database (``plane_memory``)
# and read back at start (``Context.load_memory``), by these kinds:
_AVOID_ZONE = "avoid_zone"  # a zone whose spot capacity was just reclaimed, until
_OFFER_BACKOFF = "offer_backoff"  # an offer that just failed to launch, until
_NOTICE = "notice_"  # + what was done once for an instance's interruption notice
_OFFER_SCOPE = "offer_scope"  # a job confined to one provider's offers (value)
_RESERVED = "reserved_provider"  # offers only the jobs confined to them may use
# An answered notice is remembered this long: its instance is reclaimed
# within minutes (two on AWS), and instance ids are never reused.
NOTICE_MEMORY_S = 86400.0


class Conflict(RuntimeError):
    """The request is valid but the job's state does not allow it now."""


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def skypilot_env(job: Job, offer: Offer) -> dict[str, str]:
    """The variables SkyPilot gives a task's setup and run, so that a task
    file's commands (``torchrun --nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE``)
    work unchanged; GPU Scout runs one node, whose address is its own.
    (SkyPilot docs, "Environment variables": SKYPILOT_NODE_RANK,
    SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE,
    SKYPILOT_TASK_ID.) A job's own envs override them."""
    return {
        "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_GPUS_PER_NODE": str(offer.gpus), "SKYPILOT_TASK_ID": job.id,
    }


@dataclass(frozen=True, slots=True)
class Timeouts:
    health_s: float = 120.0  # a new instance's agent must answer within this
    checkpoint_s: float = 120.0
    resume_s: float = 60.0  # restore to first step on the replacement
    drain_s: float = 30.0  # requests in flight to an old instance
    lost_s: float = 20.0  # an unreachable running agent counts as lost after
    # A replacement's setup (after its boot) before a move gives up on it;
    # a first placement's setup has no limit (the user sees it in the log).
    setup_s: float = 1800.0


@dataclass
class Context:
    repo: Repository
    provider: Provider
    agents: Agents
    router: Router
    store: ObjectStore
    clock: Clock
    metrics: Metrics
    store_url: str
    control_url: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    poll_interval_s: float = 0.05
    # Offers that just failed to launch are skipped for a while.
    offer_backoff_s: float = 300.0
    # Spot in a zone that just reclaimed an instance is avoided for a while:
    # capacity taken back there is unlikely to last.
    zone_backoff_s: float = ZONE_BACKOFF_S
    capacity_history: CapacityHistory = field(default_factory=CapacityHistory)
    secretbox: SecretBox | None = None  # opens the jobs' sealed secrets
    _history_lock: threading.Lock = field(default_factory=threading.Lock)
    # What the control plane learnt (kept in the database too: load_memory).
    _memory_lock: threading.Lock = field(default_factory=threading.Lock)
    _unavailable_until: dict[str, datetime] = field(default_factory=dict)
    _zone_avoided_until: dict[str, datetime] = field(default_factory=dict)
    _notices: set[tuple[str, str]] = field(default_factory=set)
    _scopes: dict[str, str] = field(default_factory=dict)  # job id -> provider
    _reserved: set[str] = field(default_factory=set)
    billing_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- events --------------------------------------------------------------

    def event(self, job_id: str | None, kind: str, message: str, **data: Any) -> None:
        log.info("%s %s: %s", job_id or "-", kind, message)
        self.repo.add_event(job_id, kind, message, self.clock.now(), data or None)

    # --- offers ----------------------------------------------------------------

    def offers(self) -> list[Offer]:
        """The market now: offers that just failed to launch, or have no
        price above zero, count as unavailable, and each carries the capacity losses per day this
        control plane has seen on it (``CapacityHistory``)."""
        now = self.clock.now()
        with self._memory_lock:
            blocked = {k for k, until in self._unavailable_until.items() if until > now}
        # A price of zero or less is no price (moto's spot history answers
        # 0.0; a feed's gap): such an offer cannot be had, whatever it says.
        offers = [o.with_(available=False)
                  if o.id in blocked or (o.available and o.price_per_hour <= 0) else o
                  for o in self.repo.list_offers()]
        with self._history_lock:
            return self.capacity_history.observe(now.timestamp(), offers)

    def capacity_lost(self, offer_id: str) -> None:
        """A spot interruption on ``offer_id`` (the feed may not show it)."""
        with self._history_lock:
            self.capacity_history.record_loss(offer_id, self.clock.now().timestamp())

    def mark_unavailable(self, offer_id: str) -> None:
        now = self.clock.now()
        until = now + timedelta(seconds=self.offer_backoff_s)
        with self._memory_lock:
            self._unavailable_until[offer_id] = until
        self.repo.remember(_OFFER_BACKOFF, offer_id, now, until=until)

    def avoid_zone(self, zone_key: str) -> None:
        """Leave spot offers in ``zone_key`` ("provider:zone") out of
        placements and moves for ``zone_backoff_s`` (a restart included)."""
        now = self.clock.now()
        until = now + timedelta(seconds=self.zone_backoff_s)
        with self._memory_lock:
            self._zone_avoided_until[zone_key] = until
        self.repo.remember(_AVOID_ZONE, zone_key, now, until=until)

    def avoided_zones(self) -> frozenset[str]:
        now = self.clock.now()
        with self._memory_lock:
            return frozenset(k for k, until in self._zone_avoided_until.items() if until > now)

    def first_notice(self, instance_id: str, what: str) -> bool:
        """True once per ``what`` ("recorded", "answered") per interruption
        notice on ``instance_id``, across restarts of the control plane: a
        notice is recorded and answered once, however many passes see it."""
        kind = _NOTICE + what
        with self._memory_lock:
            if (kind, instance_id) in self._notices:
                return False
        now = self.clock.now()
        # Written first: if the write fails, the next pass tries again.
        self.repo.remember(kind, instance_id, now,
                           until=now + timedelta(seconds=NOTICE_MEMORY_S))
        with self._memory_lock:
            if (kind, instance_id) in self._notices:
                return False
            self._notices.add((kind, instance_id))
            return True

    def load_memory(self) -> None:
        """Read back what this control plane learnt before a restart and
        still holds: the zones and offers avoided until a time, the notices
        already recorded and answered, the offers jobs are confined to.
        What has expired is deleted."""
        now = self.clock.now()
        self.repo.forget_expired(now)
        with self._memory_lock:
            for m in self.repo.recall(now):
                if m.kind == _AVOID_ZONE and m.until is not None:
                    self._zone_avoided_until[m.name] = m.until
                elif m.kind == _OFFER_BACKOFF and m.until is not None:
                    self._unavailable_until[m.name] = m.until
                elif m.kind.startswith(_NOTICE):
                    self._notices.add((m.kind, m.name))
                elif m.kind == _OFFER_SCOPE and m.value:
                    self._scopes[m.name] = m.value
                elif m.kind == _RESERVED:
                    self._reserved.add(m.name)

    # --- offer scopes ------------------------------------------------------------

    def reserve(self, provider: str) -> None:
        """Keep ``provider``'s offers from every job not confined to them
        (``confine``), from now on and after restarts."""
        self.repo.remember(_RESERVED, provider, self.clock.now())
        with self._memory_lock:
            self._reserved.add(provider)

    def confine(self, job_id: str, provider: str) -> None:
        """Let ``job_id`` use ``provider``'s offers only, and reserve them
        for the jobs confined to them (the demo's job and its scripted
        market: the script moves no other job, the job no other market)."""
        self.reserve(provider)
        self.repo.remember(_OFFER_SCOPE, job_id, self.clock.now(), value=provider)
        with self._memory_lock:
            self._scopes[job_id] = provider

    def confined_jobs(self, provider: str) -> list[str]:
        """The jobs confined to ``provider``'s offers."""
        with self._memory_lock:
            return sorted(j for j, p in self._scopes.items() if p == provider)

    def is_reserved(self, offer: Offer) -> bool:
        with self._memory_lock:
            return offer.provider in self._reserved

    def scope_offers(self, job_id: str, offers: Iterable[Offer]) -> list[Offer]:
        """The offers ``job_id`` may use, in the order given: a confined
        job's provider's alone; for any other job all but the reserved."""
        with self._memory_lock:
            own = self._scopes.get(job_id)
            reserved = frozenset(self._reserved)
        if own is not None:
            return [o for o in offers if o.provider == own]
        return [o for o in offers if o.provider not in reserved]

    # --- instances -------------------------------------------------------------

    def launch(self, job: Job, offer: Offer, *, standby: bool,
               instance_id: str | None = None) -> tuple[Instance, ProviderInstance]:
        """Record a new instance, then ask the provider for it.

        The row is written first so that a crash between the two leaves a
        record the reaper and the restart repair can act on. ``instance_id``:
        an id chosen (and recorded elsewhere, on a migration) beforehand.
        """
        instance = Instance(
            id=instance_id or new_id("i"), job_id=job.id, offer_id=offer.id,
            provider=self.provider.name, status=InstanceStatus.PROVISIONING,
        )
        token = secrets.token_urlsafe(24)
        self.repo.add_instance(instance, offer.price_per_hour, self.clock.now(), token)
        spec = job.spec
        request = LaunchRequest(
            instance_id=instance.id, job_id=job.id, offer=offer, command=spec.command,
            store_url=self.store_url, control_url=self.control_url, standby=standby,
            agent_token=token, workdir_ref=spec.workdir, setup=spec.setup,
            secret_names=spec.secret_names, env={**skypilot_env(job, offer), **spec.envs},
        )
        try:
            launched = self.provider.launch(request)
        except Exception as err:
            self.repo.update_instance(instance.id, status=InstanceStatus.FAILED,
                                      terminated_at=self.clock.now())
            raise err
        self.repo.update_instance(instance.id, address=launched.address,
                                  provider_ref=launched.provider_ref)
        if launched.address:
            self.agents.set_token(launched.address, token)
        self.metrics.instances_launched.inc()
        return self.repo.get_instance(instance.id), launched

    def deliver_secrets(self, job_id: str, address: str) -> None:
        """Hand the job's secret values to the agent at ``address``, which
        waits for them before it prepares the job (they never travel in
        user-data). A failure is logged: the agent keeps waiting, and the
        caller offers them again on its next look at the agent's health."""
        try:
            sealed = self.repo.job_row_fields(job_id, "secrets_sealed")["secrets_sealed"]
            if self.secretbox is None:
                raise SecretBoxError("this control plane has no key to open job secrets")
            self.agents.send_secrets(address, self.secretbox.open(sealed))
        except (AgentError, SecretBoxError) as err:
            log.warning("job %s: secrets not delivered to %s yet: %s", job_id, address, err)

    def route(self, job_id: str, instance: Instance) -> None:
        """Point the job's endpoint at ``instance``: the proxy's route first,
        then whatever the provider moves with it (an Elastic IP on AWS).

        The provider's part is best effort: the proxy already serves the job,
        so a failure is logged and recorded as an event, not raised. When it
        changes the instance's address (an Elastic IP replaces a public IP),
        the new address is persisted, then routed to.
        """
        self.router.switch(job_id, instance.address)
        try:
            moved = self.provider.on_route(job_id, instance.id)
        except ProviderError as err:
            self.event(job_id, "route_failed",
                       f"{self.provider.name} could not move the job's address to "
                       f"{instance.id}: {err}", instance_id=instance.id)
            return
        if moved and moved != instance.address:
            token = self.repo.agent_tokens().get(instance.address or "")
            self.repo.update_instance(instance.id, address=moved)
            if token:
                self.agents.set_token(moved, token)
            self.router.switch(job_id, moved)
            self.event(job_id, "address_moved",
                       f"{instance.id} is now reached at {moved}", instance_id=instance.id,
                       address=moved)

    def terminate(self, instance_id: str, *, failed: bool = False) -> None:
        """Terminate an instance (idempotent): bill it, persist, then act."""
        try:
            instance = self.repo.get_instance(instance_id)
        except NotFound:
            return
        if instance.status.is_terminal():
            return
        self.bill_instance(instance_id)
        self.repo.update_instance(instance_id, status=InstanceStatus.TERMINATING)
        self.provider.terminate(instance_id)
        self.repo.update_instance(
            instance_id,
            status=InstanceStatus.FAILED if failed else InstanceStatus.TERMINATED,
            terminated_at=self.clock.now(),
        )

    # --- billing ---------------------------------------------------------------

    def bill_instance(self, instance_id: str) -> None:
        with self.billing_lock:
            self.repo.bill_instance(instance_id, self.clock.now())
