"""Code travels through the object store: the running gpuscout as a wheel.

An instance whose image lacks gpuscout installs the control plane's own code,
so agent and control plane always run the same version, with nothing to
publish first. The wheel is built once per process from the installed
package (``wheel_of_running_package``), uploaded to the job store under a
content-addressed key (``code/gpuscout/<sha256>/<wheel filename>``) only if
that key is absent, and handed to the instance as a short-lived presigned
GET URL that ends in the wheel's file name (pip reads the name from the
URL's path) with ``#sha256=<hex>``, so pip refuses any other bytes. The URL
carries a signature, not a secret: it opens one object for a while.

Why written here rather than with ``pip wheel`` or ``python -m build``:
those need the source tree and a build backend (fetched from an index in
an isolated build), while a control plane usually runs from an installed
package with no source tree at all. A wheel of pure Python is a zip with
the package's files and a ``.dist-info`` (PEP 427); ``METADATA`` and
``entry_points.txt`` are copied from the installed distribution, so pip
installs the same dependencies and the ``gpuscout`` command.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import io
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gpuscout

DIST_NAME = "gpuscout"
CODE_PREFIX = "code/gpuscout"
DEFAULT_URL_TTL_S = 3600.0
WHEEL_TAG = "py3-none-any"
# Every entry gets the same date and mode, so the same files make the same
# bytes, hence the same key (zip's earliest date).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True, slots=True)
class Wheel:
    filename: str  # gpuscout-<version>-py3-none-any.whl
    data: bytes
    sha256: str  # hex, of ``data``

    @property
    def key(self) -> str:
        """Where it lives in the store: the content decides the key."""
        return f"{CODE_PREFIX}/{self.sha256}/{self.filename}"


class PresigningStore(Protocol):
    """What shipping needs from a store (S3Store has it)."""

    url: str

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes) -> None: ...

    def presigned_get_url(self, key: str, expires_s: float) -> str: ...


def build_wheel(package_dir: Path, *, name: str, version: str, metadata: str,
                entry_points: str | None = None) -> Wheel:
    """A pure-Python wheel of the files under ``package_dir`` (compiled
    bytecode left out), installed as the top-level package of the folder's
    name, with this ``METADATA`` (and ``entry_points.txt``). Deterministic:
    the same files and metadata give the same bytes."""
    dist_info = f"{name}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in sorted(_package_files(package_dir)):
        arcname = f"{package_dir.name}/{path.relative_to(package_dir).as_posix()}"
        entries.append((arcname, path.read_bytes()))
    entries.append((f"{dist_info}/METADATA", metadata.encode()))
    if entry_points:
        entries.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    wheel_file = (f"Wheel-Version: 1.0\nGenerator: gpuscout.providers.code_bundle\n"
                  f"Root-Is-Purelib: true\nTag: {WHEEL_TAG}\n")
    entries.append((f"{dist_info}/WHEEL", wheel_file.encode()))
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{arc},sha256={_record_hash(data)},{len(data)}\n" for arc, data in entries)
    entries.append((record_name, (record + f"{record_name},,\n").encode()))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in entries:
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    data = buffer.getvalue()
    return Wheel(filename=f"{_normalize(name)}-{version}-{WHEEL_TAG}.whl", data=data,
                 sha256=hashlib.sha256(data).hexdigest())


@functools.cache
def wheel_of_running_package() -> Wheel:
    """The wheel of the gpuscout this process imported (built once)."""
    package_dir = Path(gpuscout.__file__).resolve().parent
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = getattr(gpuscout, "__version__", "0.0.0")
        metadata = f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {version}\n"
        return build_wheel(package_dir, name=DIST_NAME, version=version, metadata=metadata)
    return build_wheel(package_dir, name=DIST_NAME, version=dist.version,
                       metadata=dist.read_text("METADATA") or "",
                       entry_points=dist.read_text("entry_points.txt"))


class CodeShipper:
    """Puts a wheel in one store (once) and hands out presigned URLs to it.

    Thread-safe; the upload happens on the first ``package_spec`` call and
    never again for this shipper: a key that already exists holds these
    very bytes (the key is their hash) and is not uploaded again.
    """

    def __init__(self, store: PresigningStore, wheel: Wheel, *,
                 url_ttl_s: float = DEFAULT_URL_TTL_S) -> None:
        self.store = store
        self.wheel = wheel
        self.url_ttl_s = url_ttl_s
        self._lock = threading.Lock()
        self._stored = False

    def ensure_stored(self) -> bool:
        """Upload the wheel unless the store has it; True when this call uploaded."""
        with self._lock:
            if self._stored:
                return False
            uploaded = False
            if not self.store.exists(self.wheel.key):
                self.store.put(self.wheel.key, self.wheel.data)
                uploaded = True
            self._stored = True
            return uploaded

    def package_spec(self) -> str:
        """What bootstrap.sh gives pip: a fresh presigned URL of the wheel,
        pinned to its sha256."""
        self.ensure_stored()
        url = self.store.presigned_get_url(self.wheel.key, self.url_ttl_s)
        return f"{url}#sha256={self.wheel.sha256}"


def _package_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel) or not path.is_file():
            continue
        if path.suffix in _SKIP_SUFFIXES:
            continue
        out.append(path)
    return out


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _normalize(name: str) -> str:
    """The wheel file name's form of a project name (PEP 427: '-' -> '_')."""
    return name.replace("-", "_").replace(".", "_")


__all__ = [
    "CODE_PREFIX", "DEFAULT_URL_TTL_S", "CodeShipper", "PresigningStore", "Wheel",
    "build_wheel", "wheel_of_running_package",
]
