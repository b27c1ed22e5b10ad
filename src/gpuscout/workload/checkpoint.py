"""The checkpoint format: immutable, versioned, verified before it is used.

Layout under a job's prefix (``jobs/<job id>/checkpoints``)::

    {prefix}/{step:012d}-{version}/<file>...
    {prefix}/{step:012d}-{version}/MANIFEST.json      <- written last

    MANIFEST.json = {"format": 1, "step": N, "created_at": "<ISO 8601 UTC>",
                     "files": {"<name>": {"sha256": "<hex>", "size": <bytes>}}}

``version`` is new for every save (a time-ordered, random id), so nothing is
ever overwritten: saving one step twice gives two versions, and a reader
never sees a checkpoint change under it. The manifest is written after
every file, so a checkpoint without one is partial (a save in progress, or
one that crashed) and does not count.

A checkpoint *counts* only when its manifest exists, parses, names this step,
and every file it lists exists with that size and sha256. Newest means the
highest step; among versions of one step, the last saved. ``latest()`` and
``load(None)`` skip what does not count and fall back to the previous good
checkpoint: a corrupt or partial checkpoint is never restored.

Cost: one ``list`` of the prefix, then manifests newest first (one small
GET each), and files are read and hashed only for the first checkpoint whose
manifest is good. ``load`` hashes exactly the bytes it returns, so restoring
reads each file once: call ``load(None)`` rather than ``latest()`` then
``load``. ``list()`` checks manifests and presence only, never hashes: it is
the cheap look (``list()[-1]``) for dashboards and reports. Nothing verified
is cached: storage can rot after a check, and every answer reflects it.

Large checkpoints (multi-GB weights) never need to sit in memory:
``save_paths`` streams files from disk into the store and ``load_to_dir``
streams them back into a folder, both hashing while they stream
(``ObjectStore.put_file`` / ``get_file``). The format and the rules are the
same: the manifest goes last, and ``load_to_dir`` verifies every file in a
staging folder before moving any into place, so a corrupt or partial
checkpoint never lands in the folder and the previous good one does.
Checking a checkpoint without restoring it (``latest``, ``prune``) streams
files above ``IN_MEMORY_LIMIT`` through a temporary file.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from gpuscout.store import FileDigest, ObjectNotFound, ObjectStore, check_key, check_prefix
from gpuscout.store.fs import TMP_PREFIX

FORMAT = 1
MANIFEST = "MANIFEST.json"
STEP_DIGITS = 12
MAX_STEP = 10**STEP_DIGITS - 1
_NAME = re.compile(r"^(\d{12})-([0-9a-z]{1,32})$")
# Files up to this size are checked in memory; larger ones stream to disk.
IN_MEMORY_LIMIT = 64 * 1024 * 1024
_T = TypeVar("_T")


class CheckpointError(Exception):
    """Base of the checkpoint errors a caller branches on."""


class NoCheckpoint(CheckpointError, LookupError):
    """There is no checkpoint (of the step asked for) under the prefix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint exists but does not verify; ``key`` and ``reason`` say
    which one and what is wrong with it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt checkpoint {key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One checkpoint that counts. ``key`` is its folder in the store
    (``{prefix}/{step:012d}-{version}``, no trailing '/'); ``files`` maps
    each file name to its size in bytes."""

    step: int
    key: str
    version: str
    created_at: datetime
    files: Mapping[str, int] = field(hash=False)

    @property
    def manifest_key(self) -> str:
        return f"{self.key}/{MANIFEST}"

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's files."""
        return sum(self.files.values())


@dataclass(frozen=True, slots=True)
class _Entry:
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class _Manifest:
    info: CheckpointInfo
    entries: Mapping[str, _Entry]


_version_lock = threading.Lock()
_last_version_ms = 0


def new_version() -> str:
    """A short id, unique per save and ordered by time within one step:
    milliseconds since the epoch (11 hex digits) and 24 random bits. Within
    one process the milliseconds strictly increase, so two saves of a step
    in the same millisecond still order as they were made (the random bits
    alone ordered them by chance)."""
    global _last_version_ms
    with _version_lock:
        ms = max(time.time_ns() // 1_000_000, _last_version_ms + 1)
        _last_version_ms = ms
    return f"{ms:011x}{secrets.token_hex(3)}"


def checkpoint_key(prefix: str, step: int, version: str) -> str:
    return f"{prefix}/{step:0{STEP_DIGITS}d}-{version}"


class CheckpointStore:
    """Save and restore a job's checkpoints under ``prefix`` in ``store``.

    Several processes may use one prefix at once (the old and the new
    instance of a migration): saves never collide, and readers only ever see
    complete checkpoints.
    """

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        prefix = prefix.strip("/")
        if not prefix:
            raise ValueError("checkpoint prefix must not be empty")
        check_prefix(prefix)
        self.store = store
        self.prefix = prefix
        # Checkpoints a load or restore skipped because they did not verify
        # (CorruptCheckpoint: a file missing, truncated or altered, no or a
        # bad manifest), newest first, so the caller can say which.
        self.skipped: builtins.list[CorruptCheckpoint] = []

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store!r}, {self.prefix!r})"

    # --- writing ---------------------------------------------------------

    def save(self, step: int, files: Mapping[str, bytes]) -> CheckpointInfo:
        """Write a new checkpoint of ``step`` and return it once it counts.

        The files go first, the manifest last; if this raises part way, what
        was written is a partial checkpoint that nothing will restore.
        """
        _check_step(step)
        blobs: dict[str, bytes] = {}
        entries: dict[str, _Entry] = {}
        for name, data in files.items():
            _check_name(name)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"checkpoint file {name!r} must be bytes, not "
                                f"{type(data).__name__}")
            blobs[name] = bytes(data)
            entries[name] = _Entry(hashlib.sha256(blobs[name]).hexdigest(), len(blobs[name]))
        version = new_version()
        key = checkpoint_key(self.prefix, step, version)
        for name, data in blobs.items():
            self.store.put(f"{key}/{name}", data)
        return self._write_manifest(step, key, version, entries)

    def save_paths(self, step: int,
                   files: Mapping[str, str | os.PathLike[str]]) -> CheckpointInfo:
        """Like ``save``, from files on disk: ``files`` maps each checkpoint
        file name to the path of its content. Each file streams into the
        store (multipart and parallel on S3) and is hashed on the way, so a
        multi-GB file is never held in memory. The manifest records the
        bytes that were stored; a file that changes while it is being saved
        makes the save fail, or the checkpoint fail verification.
        """
        _check_step(step)
        paths: dict[str, Path] = {}
        for name, path in files.items():
            _check_name(name)
            paths[name] = Path(path)
            if not paths[name].is_file():
                raise FileNotFoundError(f"checkpoint file {name!r}: no file at {path}")
        version = new_version()
        key = checkpoint_key(self.prefix, step, version)
        entries: dict[str, _Entry] = {}
        for name, path in paths.items():
            digest = self.store.put_file(f"{key}/{name}", path)
            entries[name] = _Entry(digest.sha256, digest.size)
        return self._write_manifest(step, key, version, entries)

    def _write_manifest(self, step: int, key: str, version: str,
                        entries: Mapping[str, _Entry]) -> CheckpointInfo:
        created_at = datetime.now(UTC)
        manifest = {
            "format": FORMAT,
            "step": step,
            "created_at": created_at.isoformat(),
            "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in sorted(entries.items())},
        }
        self.store.put(f"{key}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        return CheckpointInfo(step, key, version, created_at,
                              MappingProxyType({n: e.size for n, e in entries.items()}))

    # --- reading ---------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Checkpoints whose manifest is good and whose files all exist,
        oldest first. Files are not hashed here: ``load`` and ``latest`` do."""
        found = []
        for key, names in self._scan():
            try:
                found.append(self._read_manifest(key, names).info)
            except CorruptCheckpoint:
                continue
        found.reverse()
        return found

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that counts (files hashed), or None."""
        for key, names in self._scan():
            try:
                return self._verify(key, names)
            except CorruptCheckpoint:
                continue
        return None

    def load(self, step: int | None = None) -> tuple[CheckpointInfo, dict[str, bytes]]:
        """The checkpoint of ``step`` (None: the newest that counts) and its
        files, every byte checked against the manifest.

        ``step=None``: bad checkpoints are skipped; NoCheckpoint if none counts.
        ``step=N``: NoCheckpoint if there is none of that step; if several
        versions exist the newest good one is used, and CorruptCheckpoint
        (about the newest version) is raised when none of them verifies.
        """
        return self._first_good(step, lambda manifest: (manifest.info,
                                                         self._read_files(manifest)))

    def load_to_dir(self, dest: str | os.PathLike[str],
                    step: int | None = None) -> CheckpointInfo:
        """Restore the checkpoint of ``step`` (None: the newest that counts)
        into the folder ``dest``, streaming: file ``a/b`` lands at
        ``dest/a/b``, replacing a file of that name; other files in ``dest``
        are left alone. Picks the checkpoint and raises exactly as ``load``.

        Every file is downloaded into a staging folder inside ``dest`` and
        checked against the manifest (size and sha256, hashed while it
        streams) before any of them is moved into place, so a checkpoint
        that does not verify leaves ``dest`` as it was, and the previous
        good one is restored instead (``step=None``).
        """
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        return self._first_good(step, lambda manifest: self._restore(manifest, folder))

    def _first_good(self, step: int | None, use: Callable[[_Manifest], _T]) -> _T:
        """``use(manifest)`` for the newest checkpoint (of ``step``) for
        which it does not raise CorruptCheckpoint; see ``load``."""
        first_error: CorruptCheckpoint | None = None
        for key, names in self._scan():
            if step is not None and _step_of(key) != step:
                continue
            try:
                return use(self._read_manifest(key, names))
            except CorruptCheckpoint as exc:
                first_error = first_error or exc
                self.skipped.append(exc)
        if step is None:
            raise NoCheckpoint(f"no verified checkpoint under {self.prefix}/"
                               + (f" (newest bad one: {first_error})" if first_error else ""))
        if first_error is not None:
            raise first_error
        raise NoCheckpoint(f"no checkpoint of step {step} under {self.prefix}/")

    def prune(self, keep: int, *, verify: bool = True) -> builtins.list[str]:
        """Delete every checkpoint older than the newest ``keep`` that count,
        good or bad, and return the keys deleted. Newer partial ones are left
        alone (a save may be in progress); with fewer than ``keep`` good
        checkpoints nothing is deleted, so the newest good one always stays.
        ``verify=False`` counts a checkpoint good on its manifest and the
        presence of its files, without reading them (the cheap check a
        control plane can afford after every save of a multi-GB state)."""
        if keep < 1:
            raise ValueError(f"prune keeps at least one checkpoint, got keep={keep}")
        scanned = self._scan()
        kept = 0
        for index, (key, names) in enumerate(scanned):
            try:
                if verify:
                    self._verify(key, names)
                else:
                    self._read_manifest(key, names)
            except CorruptCheckpoint:
                continue
            kept += 1
            if kept == keep:
                doomed = scanned[index + 1:]
                break
        else:
            return []
        return self._delete(doomed)

    def delete_all(self) -> builtins.list[str]:
        """Delete every checkpoint (a finished job that keeps none)."""
        return self._delete(self._scan())

    def discard_after(self, step: int) -> builtins.list[str]:
        """Delete every checkpoint, good or partial, of a step after ``step``
        and return their keys. A rolled-back migration uses it: the old
        instance goes on from ``step``, so anything newer was written by the
        replacement and must never be restored."""
        return self._delete([(key, names) for key, names in self._scan()
                             if _step_of(key) > step])

    def take_skipped(self) -> builtins.list[CorruptCheckpoint]:
        """The checkpoints skipped since the last call (``skipped``), which
        is then emptied: each restore reports only what it skipped."""
        taken, self.skipped = self.skipped, []
        return taken

    def discard(self, info: CheckpointInfo) -> None:
        """Delete the checkpoint ``info`` (one that must not count after all:
        a save a workload made after it paused on an earlier one)."""
        names = set(info.files) | {MANIFEST}
        self._delete([(info.key, names)])

    def _delete(self, doomed: builtins.list[tuple[str, set[str]]]) -> builtins.list[str]:
        deleted = []
        for key, names in doomed:
            # The manifest goes first: from then on the checkpoint no longer
            # counts, whatever happens to the rest of the deletion.
            if MANIFEST in names:
                self.store.delete(f"{key}/{MANIFEST}")
            for name in names:
                if name != MANIFEST:
                    self.store.delete(f"{key}/{name}")
            deleted.append(key)
        return deleted

    # --- internals -------------------------------------------------------

    def _scan(self) -> builtins.list[tuple[str, set[str]]]:
        """Checkpoint folders under the prefix with their file names,
        newest first. Keys that do not follow the layout are ignored."""
        base = self.prefix + "/"
        folders: dict[str, set[str]] = {}
        for full in self.store.list(base):
            folder, sep, name = full[len(base):].partition("/")
            if sep and name and _NAME.match(folder):
                folders.setdefault(base + folder, set()).add(name)
        return sorted(folders.items(), key=lambda item: _order(item[0]), reverse=True)

    def _read_manifest(self, key: str, names: set[str]) -> _Manifest:
        """Parse and check the manifest, and that every file it lists is
        there (from the listing: no extra request). Sizes and hashes are
        checked when the files are read."""
        if MANIFEST not in names:
            raise CorruptCheckpoint(key, f"no {MANIFEST} (partial or in progress)")
        try:
            raw = self.store.get(f"{key}/{MANIFEST}")
        except ObjectNotFound:
            raise CorruptCheckpoint(key, f"{MANIFEST} disappeared") from None
        manifest = _parse_manifest(key, raw)
        missing = sorted(set(manifest.entries) - names)
        if missing:
            raise CorruptCheckpoint(key, f"missing file(s): {', '.join(missing)}")
        return manifest

    def _read_files(self, manifest: _Manifest) -> dict[str, bytes]:
        key = manifest.info.key
        files: dict[str, bytes] = {}
        for name, entry in manifest.entries.items():
            try:
                data = self.store.get(f"{key}/{name}")
            except ObjectNotFound:
                raise CorruptCheckpoint(key, f"missing file: {name}") from None
            _check_digest(key, name, entry,
                          FileDigest(len(data), hashlib.sha256(data).hexdigest()))
            files[name] = data
        return files

    def _fetch(self, key: str, name: str, entry: _Entry, path: Path) -> None:
        """Stream one file of a checkpoint to ``path`` and check it."""
        try:
            digest = self.store.get_file(f"{key}/{name}", path)
        except ObjectNotFound:
            raise CorruptCheckpoint(key, f"missing file: {name}") from None
        _check_digest(key, name, entry, digest)

    def _restore(self, manifest: _Manifest, dest: Path) -> CheckpointInfo:
        key = manifest.info.key
        staging = dest / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            for name, entry in manifest.entries.items():
                self._fetch(key, name, entry, staging.joinpath(*name.split("/")))
            for name in manifest.entries:
                target = dest.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging.joinpath(*name.split("/")), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest.info

    def _verify(self, key: str, names: set[str]) -> CheckpointInfo:
        """Check every file's size and sha256, holding at most
        IN_MEMORY_LIMIT bytes of one in memory: larger files stream through
        a temporary file, deleted at once."""
        manifest = self._read_manifest(key, names)
        small = {n: e for n, e in manifest.entries.items() if e.size <= IN_MEMORY_LIMIT}
        for name, entry in small.items():
            self._read_files(_Manifest(manifest.info, {name: entry}))  # one at a time
        large = {n: e for n, e in manifest.entries.items() if n not in small}
        if large:
            with tempfile.TemporaryDirectory(prefix="gpuscout-verify-") as scratch:
                for name, entry in large.items():
                    self._fetch(key, name, entry, Path(scratch) / "file")
                    (Path(scratch) / "file").unlink()
        return manifest.info


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"checkpoint step must be an int in [0, {MAX_STEP}], got {step!r}")


def _check_name(name: str) -> None:
    check_key(name)
    if name == MANIFEST:
        raise ValueError(f"checkpoint file name {MANIFEST!r} is reserved")


def _check_digest(key: str, name: str, entry: _Entry, got: FileDigest) -> None:
    if got.size != entry.size:
        raise CorruptCheckpoint(
            key, f"{name}: size {got.size} != {entry.size} in the manifest")
    if got.sha256 != entry.sha256:
        raise CorruptCheckpoint(
            key, f"{name}: sha256 {got.sha256} != {entry.sha256} in the manifest")


def _step_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1][:STEP_DIGITS])


def _order(key: str) -> tuple[int, str]:
    step, _, version = key.rsplit("/", 1)[1].partition("-")
    # Versions are time-ordered hex of one width; a shorter (foreign) one
    # sorts first.
    return int(step), version.rjust(32, "0")


def _parse_manifest(key: str, raw: bytes) -> _Manifest:
    try:
        doc: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(key, f"{MANIFEST} does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptCheckpoint(key, f"{MANIFEST} is not a JSON object")
    if doc.get("format") != FORMAT:
        raise CorruptCheckpoint(key, f"{MANIFEST} format {doc.get('format')!r} != {FORMAT}")
    step = _step_of(key)
    if doc.get("step") != step or isinstance(doc.get("step"), bool):
        raise CorruptCheckpoint(
            key, f"{MANIFEST} says step {doc.get('step')!r}, the key says {step}")
    try:
        created_at = datetime.fromisoformat(doc["created_at"])
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpoint(key, f"{MANIFEST} has no valid created_at") from None
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    files = doc.get("files")
    if not isinstance(files, dict):
        raise CorruptCheckpoint(key, f"{MANIFEST} has no files object")
    entries: dict[str, _Entry] = {}
    for name, entry in files.items():
        if not _valid_file_entry(name, entry):
            raise CorruptCheckpoint(key, f"{MANIFEST} has a bad entry for {name!r}")
        entries[name] = _Entry(entry["sha256"], entry["size"])
    version = key.rsplit("/", 1)[1].partition("-")[2]
    info = CheckpointInfo(step, key, version, created_at,
                          MappingProxyType({n: e.size for n, e in entries.items()}))
    return _Manifest(info, MappingProxyType(entries))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _valid_file_entry(name: str, entry: Any) -> bool:
    if name == MANIFEST:
        return False
    try:
        check_key(name)
    except ValueError:
        return False
    if not isinstance(entry, dict):
        return False
    size, digest = entry.get("size"), entry.get("sha256")
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and isinstance(digest, str) and bool(_SHA256.match(digest)))

