"""Object storage for checkpoints and artifacts, behind one small interface.

Keys are '/'-separated relative paths ("jobs/<id>/checkpoints/..."). ``put``
is atomic: a reader sees the whole object or none of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


class ObjectNotFound(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"object not found: {self.key}"


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """Raise ObjectNotFound when there is no such key."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """All keys that start with ``prefix``, in lexicographic order."""
        ...

    def delete(self, key: str) -> None:
        """Idempotent."""
        ...
