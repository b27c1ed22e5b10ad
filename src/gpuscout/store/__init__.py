"""Object storage for checkpoints and artifacts: pick a store by URL.

    open_store("file:///var/lib/gpuscout/store")   # FileStore
    open_store("/var/lib/gpuscout/store")          # FileStore (a plain path)
    open_store("s3://bucket/prefix")               # S3Store, endpoint from env
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gpuscout.store.base import FileDigest, ObjectNotFound, ObjectStore
from gpuscout.store.fs import FileStore, check_key, check_prefix

if TYPE_CHECKING:
    from gpuscout.store.s3 import S3Store

__all__ = [
    "FileDigest", "FileStore", "ObjectNotFound", "ObjectStore", "S3Store", "check_key",
    "check_prefix", "open_store",
]


def __getattr__(name: str) -> Any:
    # S3Store on first use: boto3 (the aws extra) loads only with an s3:// store,
    # not with every training script that imports gpuscout.workload.
    if name == "S3Store":
        from gpuscout.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> ObjectStore:
    """The store ``url`` names: ``file://``, a plain path, or ``s3://``.

    Raises ValueError for an empty URL or any other scheme. S3 settings
    beyond the URL (endpoint, credentials, region) come from the
    environment; construct ``S3Store`` directly to pass them in.
    """
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ValueError(f"object store URL must not be empty: {url!r}")
    scheme = urlsplit(text).scheme.lower()
    if scheme == "s3":
        from gpuscout.store.s3 import S3Store

        return S3Store(text)
    if scheme in ("file", ""):
        return FileStore(text)
    raise ValueError(
        f"unsupported object store URL {url!r}: use file:///path, a filesystem path "
        "or s3://bucket/prefix"
    )
