"""An in-memory Provider for tests: instant, deterministic, scriptable.

Shipped in the package (like Karpenter's fake cloud provider and Dramatiq's
stub broker) so that tests of controllers, and users' own tests, can drive
launches, deaths, interruption notices and failures without processes.

Behaviour, the same contract as every Provider (see providers/base.py):
- ``launch`` records the request, then either raises the scripted error or
  returns the instance PENDING; with ``auto_run`` (default) it reads RUNNING
  from the next ``get``/``list`` on, else it stays PENDING until
  ``mark_running``.
- ``terminate`` records the call, is idempotent and ignores unknown ids.
- ``list`` leaves terminated instances out (as EC2's filtered describe does).
- Provider refs are ``fake-1``, ``fake-2``, ... and addresses
  ``127.0.0.1:<base_port + n>``, in launch order, so runs repeat exactly.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from gpuscout.domain import Offer
from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    ProviderError,
    ProviderInstance,
    ProviderState,
)


@dataclass(frozen=True, slots=True)
class _FakeInstance:
    view: ProviderInstance
    request: LaunchRequest
    booted: bool  # RUNNING once seen, unless held PENDING


class FakeProvider:
    """A Provider whose cloud is a dict. Thread-safe.

    Scripting (all public attributes, set them freely between calls):
    - ``next_launch_error``: raised by the next ``launch``, then cleared.
    - ``unavailable_offers``: offer ids whose launches raise CapacityError
      (as do offers with ``available=False`` in the request).
    - ``next_terminate_error``: raised by the next ``terminate``, then
      cleared (the instance keeps running).
    - ``die(id)``: the instance dies on its own (TERMINATED, no terminate call).
    - ``notify_interruption(id)``: a spot interruption notice.
    - ``forget(id)``: the provider no longer knows it (get -> InstanceNotFound),
      as EC2 forgets instances terminated long ago.
    - ``route_addresses``: instance id -> the address ``on_route`` reports
      for it (an address that moved with the route); ``next_route_error``:
      raised by the next ``on_route``, then cleared.
    Records: ``launch_calls`` (every request, failed ones included),
    ``terminate_calls`` (every id asked, unknown ones included),
    ``route_calls`` ((job id, instance id) per ``on_route``).
    """

    name = "fake"

    def __init__(
        self,
        catalog: Iterable[Offer] | None = None,
        *,
        auto_run: bool = True,
        base_port: int = 47000,
        address_for: Callable[[LaunchRequest, int], str] | None = None,
    ) -> None:
        """``catalog``: what offers() returns (default: the local catalog);
        ``address_for(request, n)``: the address of the n-th launch (1-based),
        e.g. to point instances at a test's own agent server."""
        if catalog is None:
            from gpuscout.market.catalog import default_local_catalog

            catalog = default_local_catalog()
        self.catalog: builtins.list[Offer] = builtins.list(catalog)
        self.auto_run = auto_run
        self.base_port = base_port
        self.address_for = address_for
        self.next_launch_error: ProviderError | None = None
        self.next_terminate_error: ProviderError | None = None
        self.unavailable_offers: set[str] = set()
        self.launch_calls: builtins.list[LaunchRequest] = []
        self.terminate_calls: builtins.list[str] = []
        self.route_calls: builtins.list[tuple[str, str]] = []
        self.route_addresses: dict[str, str] = {}
        self.next_route_error: ProviderError | None = None
        self._instances: dict[str, _FakeInstance] = {}
        self._launched = 0
        self._lock = threading.RLock()

    # --- Provider protocol -------------------------------------------------

    def offers(self) -> builtins.list[Offer]:
        with self._lock:
            return builtins.list(self.catalog)

    def launch(self, request: LaunchRequest) -> ProviderInstance:
        with self._lock:
            self.launch_calls.append(request)
            if self.next_launch_error is not None:
                err, self.next_launch_error = self.next_launch_error, None
                raise err
            offer = request.offer
            if offer.id in self.unavailable_offers:
                raise CapacityError(offer.id, "no capacity (scripted)")
            if not offer.available:
                raise CapacityError(offer.id, "offer is not available")
            if request.instance_id in self._instances:
                raise LaunchError(f"instance {request.instance_id} was already launched")
            self._launched += 1
            n = self._launched
            address = (
                self.address_for(request, n)
                if self.address_for is not None
                else f"127.0.0.1:{self.base_port + n}"
            )
            view = ProviderInstance(
                instance_id=request.instance_id,
                job_id=request.job_id,
                offer_id=offer.id,
                state=ProviderState.PENDING,
                address=address,
                provider_ref=f"fake-{n}",
            )
            self._instances[request.instance_id] = _FakeInstance(view, request, booted=False)
            return view

    def get(self, instance_id: str) -> ProviderInstance:
        with self._lock:
            return self._observe(instance_id)

    def list(self) -> builtins.list[ProviderInstance]:
        with self._lock:
            views = [self._observe(i) for i in builtins.list(self._instances)]
            return [v for v in views if v.state != ProviderState.TERMINATED]

    def terminate(self, instance_id: str) -> None:
        with self._lock:
            self.terminate_calls.append(instance_id)
            if self.next_terminate_error is not None:
                err, self.next_terminate_error = self.next_terminate_error, None
                raise err
            if instance_id in self._instances:
                self._set_state(instance_id, ProviderState.TERMINATED)

    def on_route(self, job_id: str, instance_id: str) -> str | None:
        with self._lock:
            self.route_calls.append((job_id, instance_id))
            if self.next_route_error is not None:
                err, self.next_route_error = self.next_route_error, None
                raise err
            moved = self.route_addresses.get(instance_id)
            if moved is not None and instance_id in self._instances:
                inst = self._instances[instance_id]
                self._instances[instance_id] = replace(
                    inst, view=replace(inst.view, address=moved))
            return moved

    # --- scripting -----------------------------------------------------------

    def mark_running(self, instance_id: str) -> None:
        """Boot an instance held PENDING (``auto_run=False``)."""
        with self._lock:
            self._require(instance_id)
            self._set_state(instance_id, ProviderState.RUNNING)

    def die(self, instance_id: str) -> None:
        """The instance stops on its own (crash, spot reclaim)."""
        with self._lock:
            self._require(instance_id)
            self._set_state(instance_id, ProviderState.TERMINATED)

    def notify_interruption(self, instance_id: str) -> None:
        """A spot interruption notice: ``get`` reports interruption_notice."""
        with self._lock:
            inst = self._require(instance_id)
            self._instances[instance_id] = replace(
                inst, view=replace(inst.view, interruption_notice=True)
            )

    def forget(self, instance_id: str) -> None:
        """Drop all trace of the instance (get raises InstanceNotFound)."""
        with self._lock:
            self._instances.pop(instance_id, None)

    def request_of(self, instance_id: str) -> LaunchRequest:
        """The request an instance was launched with."""
        with self._lock:
            return self._require(instance_id).request

    def running_ids(self) -> builtins.list[str]:
        """Ids of instances not terminated, in launch order."""
        return [v.instance_id for v in self.list()]

    # --- internals -----------------------------------------------------------

    def _require(self, instance_id: str) -> _FakeInstance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise InstanceNotFound(instance_id) from None

    def _set_state(self, instance_id: str, state: ProviderState) -> None:
        inst = self._instances[instance_id]
        self._instances[instance_id] = replace(
            inst, view=replace(inst.view, state=state), booted=True
        )

    def _observe(self, instance_id: str) -> ProviderInstance:
        inst = self._require(instance_id)
        if not inst.booted and self.auto_run:
            self._set_state(instance_id, ProviderState.RUNNING)
            inst = self._instances[instance_id]
        return inst.view
