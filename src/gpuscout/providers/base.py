"""The one interface to a cloud: list offers, launch, get, list, terminate.

Contract (after Karpenter's CloudProvider):
- ``launch`` starts an instance for a job on one offer and returns at once
  with the instance in PROVISIONING; the caller waits for the agent's health.
  It raises ``CapacityError`` when the offer cannot be had right now.
- ``get`` raises ``InstanceNotFound`` when the provider has no such instance
  (never started, or terminated long ago).
- ``list`` returns the instances this provider runs for this cluster,
  including ones the control plane has no record of (the reaper's input).
- ``terminate`` is idempotent: "not found" and "already terminated" are done.
  It returns once the instance is gone (no process, no billing).
- ``on_route`` is told each time a job's route points at an instance (first
  placement, a completed move, a restarted control plane rebuilding its
  routes). Most providers do nothing; one whose own address follows the job
  (an Elastic IP on AWS) moves it there. It is idempotent, and a failure
  (ProviderError) leaves the job's proxy route in place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from gpuscout.domain import Offer


class ProviderError(Exception):
    """Base of the errors a caller can branch on."""


class InstanceNotFound(ProviderError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id} not found")
        self.instance_id = instance_id


class CapacityError(ProviderError):
    """The offer cannot be launched now (no capacity, price too low, quota)."""

    def __init__(self, offer_id: str, reason: str) -> None:
        super().__init__(f"no capacity for {offer_id}: {reason}")
        self.offer_id = offer_id
        self.reason = reason


class QuotaError(CapacityError):
    """The account's limit (vCPUs, spot requests, instances) is reached:
    not a shortage of the offer's capacity, and no other offer under the
    same limit will launch either until the limit is raised."""

    def __init__(self, offer_id: str, reason: str) -> None:
        ProviderError.__init__(
            self, f"account quota reached launching {offer_id}: {reason} (an account limit, "
                  "not a capacity shortage: ask the provider to raise it)")
        self.offer_id = offer_id
        self.reason = reason


class LaunchError(ProviderError):
    """The launch was refused for a reason other than capacity."""


def is_not_found(err: BaseException) -> bool:
    return isinstance(err, InstanceNotFound)


class ProviderState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """Everything an instance needs to boot the agent and run its job."""

    instance_id: str  # GPU Scout's id, also the ownership tag
    job_id: str
    offer: Offer
    command: str
    store_url: str
    control_url: str | None = None  # where the agent may report (optional)
    agent_token: str = ""  # the instance's own token for its agent API
    standby: bool = False  # a replacement: wait for /agent/restore before restoring
    # The working folder on the instance (default: ``work`` in the instance's
    # folder); the packed project folder ``workdir_ref`` is unpacked there.
    workdir: str | None = None
    workdir_ref: str | None = None  # "sha256:<hex>" in the store (gpuscout.workdir)
    setup: str | None = None  # run in the working folder before the command
    # The job's secrets by name; their values reach the agent after boot
    # (POST /agent/secrets), never through user-data.
    secret_names: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # the job's envs


@dataclass(frozen=True, slots=True)
class ProviderInstance:
    instance_id: str
    job_id: str
    offer_id: str
    state: ProviderState
    address: str | None  # "host:port" of the agent once known
    provider_ref: str  # pid, EC2 instance id, ...
    interruption_notice: bool = False  # a spot reclaim notice was given


@runtime_checkable
class Provider(Protocol):
    name: str

    def offers(self) -> list[Offer]:
        """The offers this provider can launch (its catalog)."""
        ...

    def launch(self, request: LaunchRequest) -> ProviderInstance: ...

    def get(self, instance_id: str) -> ProviderInstance: ...

    def list(self) -> list[ProviderInstance]: ...

    def terminate(self, instance_id: str) -> None: ...

    def on_route(self, job_id: str, instance_id: str) -> str | None:
        """The job's route now points at this running instance. Return the
        instance's new agent address if this call changed it, else None."""
        ...


@runtime_checkable
class InterruptibleProvider(Protocol):
    """A provider that can deliver a spot interruption notice on demand
    (the local and fake providers: demos and tests; on AWS the cloud sends
    them). Its ``get`` then reports ``interruption_notice=True``.

    (``name`` makes ``isinstance`` look at the instance each time rather
    than cache a verdict per class, as it does for a protocol of methods
    alone: a test takes the ability away from the fake.)"""

    name: str

    def notify_interruption(self, instance_id: str) -> None:
        """Give the instance a notice; InstanceNotFound if it is unknown."""
        ...
