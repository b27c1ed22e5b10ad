"""Code sync: a job's project folder, packed once at submit time and unpacked
as the job's working folder on every instance it runs on (SkyPilot calls it
``workdir``).

    packed = pack(Path("~/proj").expanduser())    # a deterministic .tar.gz
    ref = upload(store, packed)                   # "sha256:<hex>", stored once
    ...                                           # on each instance:
    fetch_and_unpack(store, ref, Path("/work/job"))

What goes in: every regular file and symlink under the folder, except
``.git`` and what the folder's ``.gitignore`` files leave out (the root one
and nested ones, with git's rules: later patterns win, a deeper file wins
over a shallower one, ``!`` re-includes, nothing comes back from inside an
ignored folder). A ``.gpuscoutignore`` at the root, same syntax, is read
after the root ``.gitignore`` as if appended to it, so it can add rules or
re-include (``!data/small.csv``) what git ignores. ``.git/info/exclude`` and
the user's global git excludes are not read. Empty folders are not kept;
sockets, FIFOs and device files are skipped.

Symlinks: one whose target (fully resolved) is inside the folder is kept as
a relative symlink; one that resolves outside the folder is an error naming
it (``WorkdirError``), never skipped silently, since the job would otherwise
fail later on the instance in a more confusing way. The user lists it in
``.gitignore`` / ``.gpuscoutignore`` or removes it. A link to something that
is ignored (or missing) inside the folder arrives dangling.

The archive is deterministic: the same file names, contents, executable
bits and links give the same bytes, whatever the mtimes, owners or the order
the filesystem lists them in, so the store keeps one copy per content
(``code/workdirs/<sha256>.tar.gz``) and a resubmit uploads nothing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import heapq
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pathspec

from gpuscout.store.base import ObjectNotFound, ObjectStore

__all__ = [
    "MAX_WORKDIR_BYTES", "MAX_WORKDIR_FILES", "WORKDIR_PREFIX", "ObjectNotFound",
    "PackedWorkdir", "WorkdirError", "fetch_and_unpack", "key_of", "pack", "parse_ref",
    "upload",
]

MAX_WORKDIR_BYTES = 100 * 1024 * 1024
"""Limit on the packed (gzipped) archive, in bytes: 100 MiB. The archive
travels to every instance at every placement and every live move, so its
size is paid again and again in start-up time; code is far smaller than
this, and datasets, weights and checkpoints belong in object storage, read
by the job itself."""

MAX_WORKDIR_FILES = 20_000
"""Limit on the number of files (regular files and symlinks) packed: more
almost always means a virtualenv, ``node_modules`` or a dataset that
``.gitignore`` / ``.gpuscoutignore`` should leave out."""

WORKDIR_PREFIX = "code/workdirs"
"""Store prefix of the archives: ``code/workdirs/<sha256 hex>.tar.gz``."""

IGNORE_FILE = ".gpuscoutignore"
"""Extra ignore rules at the root of the folder, gitignore syntax."""

_REF_RE = re.compile(r"sha256:([0-9a-f]{64})")
_READ_CHUNK = 1024 * 1024
_GZIP_LEVEL = 6
_SHOW_LARGEST = 3


class WorkdirError(ValueError):
    """A folder that cannot be packed, or an archive that cannot be unpacked;
    the message is one line for the user, naming the folder and the problem."""


@dataclass(frozen=True)
class PackedWorkdir:
    """A packed folder: ``path`` is a temporary ``.tar.gz`` file the caller
    owns (delete it after ``upload``), ``sha256`` the hex digest of its bytes,
    ``size`` its length in bytes, ``files`` how many files and symlinks it
    holds."""

    path: Path
    sha256: str
    size: int
    files: int

    @property
    def ref(self) -> str:
        """``"sha256:<hex>"``: what a job spec records and ``fetch_and_unpack`` takes."""
        return f"sha256:{self.sha256}"

    @property
    def key(self) -> str:
        """The store key: ``code/workdirs/<hex>.tar.gz``."""
        return f"{WORKDIR_PREFIX}/{self.sha256}.tar.gz"


# --- packing -------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    rel: str  # '/'-separated path below the folder
    size: int  # bytes (0 for a symlink)
    executable: bool
    linkname: str | None  # the symlink's target text, or None for a regular file


@dataclass(frozen=True)
class _Rules:
    base: str  # '/'-separated folder the rules are relative to ("" for the root)
    spec: pathspec.GitIgnoreSpec


class _TooLarge(Exception):
    pass


class _Sink:
    """The archive's bytes on their way to the file: hashed, counted, and
    cut off with ``_TooLarge`` once they pass the limit (later writes, from
    closing the gzip stream while that exception unwinds, are dropped)."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out = out
        self.limit = limit
        self.size = 0
        self.hash = hashlib.sha256()
        self.over = False

    def write(self, data: bytes) -> int:
        if self.over:
            return len(data)
        self.size += len(data)
        if self.size > self.limit:
            self.over = True
            raise _TooLarge
        self.hash.update(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if not self.over:
            self.out.flush()


def pack(folder: Path, *, max_bytes: int = MAX_WORKDIR_BYTES,
         max_files: int = MAX_WORKDIR_FILES, out_dir: Path | None = None) -> PackedWorkdir:
    """Pack ``folder`` into a deterministic ``.tar.gz`` written to a new
    temporary file in ``out_dir`` (default: the system temp folder).

    Entries are sorted, with mtime 0, uid/gid 0, no owner names, mode 0o755
    for a file its owner may execute and 0o644 for any other, 0o777 for a
    symlink; gzip with mtime 0 and no file name. File contents stream in
    (bounded memory). See the module docstring for what is left out and
    how symlinks are handled.

    Raises WorkdirError when ``folder`` does not exist or is not a folder,
    holds more than ``max_files`` files and symlinks, packs to more than
    ``max_bytes`` bytes (packing stops there; the message gives the size
    before compression and the largest folders and files), holds a symlink
    resolving outside it, or has a file or folder that cannot be read (or a
    file that changed while it was read).
    """
    folder = Path(folder)
    if not folder.exists():
        raise WorkdirError(f"workdir {folder} does not exist")
    if not folder.is_dir():
        raise WorkdirError(f"workdir {folder} is not a folder")
    entries = _scan(folder, max_files)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir())
    out.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="gpuscout-workdir-", suffix=".tar.gz", dir=out)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = _Sink(raw, max_bytes)
            try:
                _write_archive(folder, entries, sink)
            except _TooLarge:
                raise WorkdirError(_too_large_message(folder, entries, max_bytes)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return PackedWorkdir(path=path, sha256=sink.hash.hexdigest(), size=sink.size,
                         files=len(entries))


def _scan(folder: Path, max_files: int) -> list[_Entry]:
    """The entries to pack, in archive order (depth first, names sorted)."""
    root_real = os.path.realpath(folder)
    entries: list[_Entry] = []
    root_lines = _read_ignore_file(folder, folder / ".gitignore")
    root_lines += _read_ignore_file(folder, folder / IGNORE_FILE)
    rules = [_Rules("", pathspec.GitIgnoreSpec.from_lines(root_lines))] if root_lines else []
    _scan_dir(folder, root_real, "", rules, entries, max_files)
    return entries


def _scan_dir(folder: Path, root_real: str, rel_dir: str, rules: list[_Rules],
              entries: list[_Entry], max_files: int) -> None:
    here = folder / rel_dir if rel_dir else folder
    try:
        with os.scandir(here) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise WorkdirError(
            f"workdir {folder}: cannot read folder {rel_dir or '.'}: {exc.strerror or exc}"
        ) from None
    for child in children:
        rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
        if child.name == ".git":
            continue
        try:
            st = child.stat(follow_symlinks=False)
        except OSError as exc:
            raise WorkdirError(
                f"workdir {folder}: cannot read {rel}: {exc.strerror or exc}"
            ) from None
        is_dir = stat.S_ISDIR(st.st_mode)
        if _ignored(rules, rel, is_dir):
            continue
        if is_dir:
            sub_rules = rules
            lines = _read_ignore_file(folder, Path(child.path) / ".gitignore")
            if lines:
                sub_rules = [*rules, _Rules(rel, pathspec.GitIgnoreSpec.from_lines(lines))]
            _scan_dir(folder, root_real, rel, sub_rules, entries, max_files)
            continue
        if stat.S_ISLNK(st.st_mode):
            entry = _Entry(rel, 0, False, _link_target(folder, root_real, rel_dir, rel,
                                                       child.path))
        elif stat.S_ISREG(st.st_mode):
            entry = _Entry(rel, st.st_size, bool(st.st_mode & stat.S_IXUSR), None)
        else:
            continue  # a socket, FIFO or device: nothing to carry
        entries.append(entry)
        if len(entries) > max_files:
            raise WorkdirError(_too_many_message(folder, entries, max_files))


def _read_ignore_file(folder: Path, path: Path) -> list[str]:
    """The lines of an ignore file; none when it is missing or not a regular
    file (git does not follow a symlinked .gitignore either)."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return []
        return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        rel = path.relative_to(folder).as_posix()
        raise WorkdirError(
            f"workdir {folder}: cannot read {rel}: {exc.strerror or exc}"
        ) from None


def _ignored(rules: list[_Rules], rel: str, is_dir: bool) -> bool:
    """Whether git would ignore ``rel``: the last matching pattern of the
    deepest ignore file with a match decides."""
    decision: bool | None = None
    for rule in rules:
        sub = rel[len(rule.base) + 1:] if rule.base else rel
        result = rule.spec.check_file(sub + "/" if is_dir else sub)
        if result.include is not None:
            decision = result.include
    return bool(decision)


def _link_target(folder: Path, root_real: str, rel_dir: str, rel: str, path: str) -> str:
    """The target text to store for the symlink at ``path``: its own text
    when that is already relative and stays inside, else the relative path
    to what it resolves to. WorkdirError when it resolves outside the folder."""
    try:
        text = os.readlink(path)
    except OSError as exc:
        raise WorkdirError(
            f"workdir {folder}: cannot read symlink {rel}: {exc.strerror or exc}"
        ) from None
    resolved = os.path.realpath(path)
    if resolved != root_real and not resolved.startswith(root_real.rstrip(os.sep) + os.sep):
        raise WorkdirError(
            f"workdir {folder}: symlink {rel} points outside the folder (-> {text}); "
            f"remove it or list it in .gitignore or {IGNORE_FILE}"
        )
    if _safe_link(rel_dir, text):
        return text
    parent_real = os.path.join(root_real, *rel_dir.split("/")) if rel_dir else root_real
    return Path(os.path.relpath(resolved, parent_real)).as_posix()


def _safe_link(rel_dir: str, text: str) -> bool:
    """Whether the symlink text, in folder ``rel_dir`` of the tree, cannot
    lead out of the tree however its parts resolve: relative, some leading
    '..' (no more than ``rel_dir`` is deep), then names only."""
    if not text or text.startswith("/"):
        return False
    if text == ".":
        return True
    parts = text.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    depth = len(rel_dir.split("/")) if rel_dir else 0
    rest = parts[ups:]
    return ups <= depth and all(p not in ("", ".", "..") for p in rest)


def _write_archive(folder: Path, entries: list[_Entry], sink: _Sink) -> None:
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=sink,  # type: ignore[arg-type]
                       compresslevel=_GZIP_LEVEL, mtime=0)
    with gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.linkname is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.linkname
                info.mode = 0o777
                tar.addfile(info)
                continue
            info.mode = 0o755 if entry.executable else 0o644
            try:
                fd = os.open(folder / entry.rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise WorkdirError(
                    f"workdir {folder}: cannot read {entry.rel}: {exc.strerror or exc}"
                ) from None
            with os.fdopen(fd, "rb", buffering=_READ_CHUNK) as source:
                info.size = os.fstat(fd).st_size
                try:
                    tar.addfile(info, source)
                except OSError as exc:
                    raise WorkdirError(
                        f"workdir {folder}: cannot read {entry.rel} (did it change while "
                        f"it was packed?): {exc.strerror or exc}"
                    ) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _top_level(rel: str) -> str:
    head, sep, _ = rel.partition("/")
    return head + "/" if sep else head


def _too_large_message(folder: Path, entries: list[_Entry], limit: int) -> str:
    total = sum(e.size for e in entries)
    by_top: Counter[str] = Counter()
    for e in entries:
        by_top[_top_level(e.rel)] += e.size
    tops = ", ".join(f"{name} ({_human(size)})"
                     for name, size in by_top.most_common(_SHOW_LARGEST))
    files = ", ".join(f"{e.rel} ({_human(e.size)})"
                      for e in heapq.nlargest(_SHOW_LARGEST, entries, key=lambda e: e.size))
    largest = f"largest: {tops}" + ("" if tops == files else f"; largest files: {files}")
    return (
        f"workdir {folder} is too large: packed, it passes the limit of {_human(limit)} "
        f"({len(entries):,} files, {_human(total)} before compression); {largest}; "
        f"list what the job does not need in .gitignore or "
        f"{IGNORE_FILE}, and keep datasets and weights in object storage"
    )


def _too_many_message(folder: Path, entries: list[_Entry], limit: int) -> str:
    counts = Counter(_top_level(e.rel) for e in entries)
    most = ", ".join(f"{name} ({n:,})" for name, n in counts.most_common(_SHOW_LARGEST))
    return (
        f"workdir {folder} has more than {limit:,} files (the limit); the most, counted "
        f"before stopping, are in: {most}; list what the job does not need in .gitignore "
        f"or {IGNORE_FILE}"
    )


# --- the store -----------------------------------------------------------------


def upload(store: ObjectStore, packed: PackedWorkdir) -> str:
    """Store ``packed`` under ``packed.key`` unless that key exists already
    (content-addressed: each content is uploaded once), and return
    ``packed.ref``. Raises WorkdirError when the file no longer has the
    digest it was packed with (the object just written is then deleted),
    and whatever the store raises."""
    if not store.exists(packed.key):
        digest = store.put_file(packed.key, packed.path)
        if digest.sha256 != packed.sha256 or digest.size != packed.size:
            store.delete(packed.key)
            raise WorkdirError(
                f"workdir archive {packed.path} changed after it was packed (sha256 "
                f"{digest.sha256}, {digest.size} bytes; packed as {packed.sha256}, "
                f"{packed.size} bytes): pack the folder again"
            )
    return packed.ref


def parse_ref(ref: str) -> str:
    """The hex sha256 of a workdir ref ``"sha256:<64 lowercase hex digits>"``;
    ValueError naming the problem for anything else."""
    if not isinstance(ref, str):
        raise ValueError(f"workdir ref must be a string 'sha256:<hex>', not {ref!r}")
    match = _REF_RE.fullmatch(ref)
    if match is None:
        if not ref.startswith("sha256:"):
            raise ValueError(f"workdir ref {ref!r} must start with 'sha256:'")
        raise ValueError(
            f"workdir ref {ref!r} must be 'sha256:' and 64 lowercase hex digits"
        )
    return match.group(1)


def key_of(ref: str) -> str:
    """The store key of a workdir ref: ``code/workdirs/<hex>.tar.gz``
    (ValueError as ``parse_ref``)."""
    return f"{WORKDIR_PREFIX}/{parse_ref(ref)}.tar.gz"


def fetch_and_unpack(store: ObjectStore, ref: str, dest: Path, *,
                     max_bytes: int = MAX_WORKDIR_BYTES,
                     max_files: int = MAX_WORKDIR_FILES) -> int:
    """Download the archive ``ref`` names, check it, and unpack it as the
    folder ``dest``; return how many files and symlinks it held.

    ``dest`` must be missing or an empty folder: the archive is unpacked
    into a temporary folder beside it (the archive too is downloaded beside
    it) and renamed into place, so ``dest`` appears whole or not at all.
    Files get the archive's modes (0o644 / 0o755) and the current time as
    mtime (not the archive's 0: tools such as zip and make reject or
    misjudge 1970 dates).

    Raises ValueError for a malformed ref, ObjectNotFound when the store
    has no such archive, and WorkdirError when ``dest`` is in the way, the
    archive's sha256 differs from the ref ("corrupt"), it is over
    ``max_bytes`` bytes or ``max_files`` members, or a member is unsafe: an
    absolute path or one with '..', one below a symlink or a file, a
    duplicate, a hard link, a device or FIFO, or a symlink that could lead
    out of ``dest`` (tarfile's "data" filter also applies, on top).
    """
    hexdigest = parse_ref(ref)
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise WorkdirError(f"workdir destination {dest} already exists and is not an empty "
                           "folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    archive = dest.parent / f".{dest.name}.gpuscout-{tag}.tar.gz"
    partial = dest.parent / f".{dest.name}.gpuscout-{tag}.partial"
    try:
        digest = store.get_file(key_of(ref), archive)
        if digest.sha256 != hexdigest:
            raise WorkdirError(f"workdir archive {ref} is corrupt: its bytes have sha256 "
                               f"{digest.sha256}")
        if digest.size > max_bytes:
            raise WorkdirError(f"workdir archive {ref} is {_human(digest.size)}, over the "
                               f"limit of {_human(max_bytes)}")
        partial.mkdir()
        files = _extract(archive, partial, ref, max_files)
        if dest.is_dir():
            dest.rmdir()  # empty, checked above
        os.rename(partial, dest)
        return files
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            archive.unlink()


def check_archive(archive: Path, *, max_files: int = MAX_WORKDIR_FILES) -> int:
    """The number of files (and symlinks) in a packed workdir whose every
    member would unpack inside its folder (what ``fetch_and_unpack`` checks
    before writing anything). Raises WorkdirError naming the first member
    refused, or saying the archive is not a gzip'd tar."""
    return _walk(archive, "upload", max_files, None)


def _extract(archive: Path, into: Path, ref: str, max_files: int) -> int:
    return _walk(archive, ref, max_files, into)


def _walk(archive: Path, ref: str, max_files: int, into: Path | None) -> int:
    """Check every member (and write it under ``into``, if given).

    Members are written by hand, not by ``TarFile.extract``: only regular
    files (mode 0644 or 0755), folders and checked relative symlinks, owned
    by whoever unpacks, dated now. That is stricter than tarfile's "data"
    filter, and needs no Python newer than 3.11.0 (the filter came in 3.11.4).
    """
    now = time.time()
    files: set[str] = set()
    links: set[str] = set()
    dirs: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                problem = _member_problem(member, files, links, dirs)
                if problem:
                    raise WorkdirError(f"workdir archive {ref} is refused: member "
                                       f"{member.name!r} {problem}")
                if len(files) + len(links) > max_files:
                    raise WorkdirError(f"workdir archive {ref} holds more than {max_files:,} "
                                       "files (the limit)")
                if into is not None:
                    _write_member(tar, member, into, now)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise WorkdirError(f"workdir archive {ref} cannot be unpacked: {exc}") from None
    return len(files) + len(links)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path,
                  now: float) -> None:
    target = into.joinpath(*member.name.split("/"))
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if member.issym():
        os.symlink(member.linkname, target)
        return
    source = tar.extractfile(member)
    assert source is not None  # a regular file (checked)
    mode = 0o755 if member.mode & 0o111 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out, source:
        shutil.copyfileobj(source, out, 1024 * 1024)
    os.chmod(target, mode)  # whatever the umask
    os.utime(target, (now, now))


def _member_problem(member: tarfile.TarInfo, files: set[str], links: set[str],
                    dirs: set[str]) -> str | None:
    """Why ``member`` must not be extracted, or None; records it as seen."""
    name = member.name
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part"
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in links:
            return "is below a symlink"
        if prefix in files:
            return "is below a file"
        dirs.add(prefix)
    if name in files or name in links or (name in dirs and not member.isdir()):
        return "appears twice"
    if member.isdir():
        dirs.add(name)
    elif member.isreg():
        files.add(name)
    elif member.issym():
        if not _safe_link("/".join(parts[:-1]), member.linkname):
            return f"is a symlink that could lead out of the folder (-> {member.linkname})"
        links.add(name)
    else:
        return "is not a file, folder or symlink"
    return None
