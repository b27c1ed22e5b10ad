"""The route table behind each job's stable endpoint.

``switch`` replaces a job's target in one assignment under a lock, so every
request sees either the old instance or the new one. Requests hold a lease on
the address they were sent to; ``drain`` waits until the old address has no
request in flight, so the migration executor terminates the old instance
only after what it was serving has completed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class NoRoute(LookupError):
    """The job exists but has no instance to serve it right now."""


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, str] = {}
        self._inflight: Counter[str] = Counter()
        self._cond = threading.Condition()

    def switch(self, job_id: str, address: str | None) -> None:
        with self._cond:
            if address is None:
                self._routes.pop(job_id, None)
            else:
                self._routes[job_id] = address

    def resolve(self, job_id: str) -> str:
        with self._cond:
            address = self._routes.get(job_id)
        if address is None:
            raise NoRoute(job_id)
        return address

    def routes(self) -> dict[str, str]:
        with self._cond:
            return dict(self._routes)

    @contextmanager
    def lease(self, job_id: str) -> Iterator[str]:
        """Resolve and hold the address for the length of one request."""
        with self._cond:
            address = self._routes.get(job_id)
            if address is None:
                raise NoRoute(job_id)
            self._inflight[address] += 1
        try:
            yield address
        finally:
            with self._cond:
                self._inflight[address] -= 1
                if self._inflight[address] <= 0:
                    del self._inflight[address]
                self._cond.notify_all()

    def inflight(self, address: str) -> int:
        with self._cond:
            return self._inflight.get(address, 0)

    def drain(self, address: str, timeout_s: float) -> bool:
        """Wait until no request is in flight to ``address``; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._inflight.get(address, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
