"""Object storage for checkpoints and artifacts, behind one small interface.

Keys are '/'-separated relative paths ("jobs/<id>/checkpoints/..."). ``put``
is atomic: a reader sees the whole object or none of it.

Large objects (multi-GB checkpoints) travel between a local file and the
store with ``put_file`` / ``get_file``, which stream: memory use is bounded
by the store's part size and concurrency, never by the object's size. Both
hash the bytes while they stream and return what they moved as a
``FileDigest``, so a caller can check the object end to end (the checkpoint
manifest does) without reading it again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class ObjectNotFound(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"object not found: {self.key}"


@dataclass(frozen=True, slots=True)
class FileDigest:
    """Size and sha256 (hex) of the bytes one ``put_file`` sent or one
    ``get_file`` wrote, computed while they streamed."""

    size: int
    sha256: str


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """Raise ObjectNotFound when there is no such key."""
        ...

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        """Store the file at ``path`` under ``key``, streaming (atomic like
        ``put``), and return the size and sha256 of the bytes stored."""
        ...

    def get_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        """Write the object to the file ``path``, streaming; the file appears
        whole (renamed into place) or not at all, and its folder is created.
        Return the size and sha256 of the bytes written. Raise
        ObjectNotFound when there is no such key."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """All keys that start with ``prefix``, in lexicographic order."""
        ...

    def delete(self, key: str) -> None:
        """Idempotent."""
        ...
