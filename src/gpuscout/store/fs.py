"""The local-filesystem object store, and the key rules every store shares.

Keys map to files under the root: ``jobs/j-1/x`` is ``<root>/jobs/j-1/x``.
``put`` writes a temporary file in the destination folder, fsyncs it and
renames it over the key (``os.replace`` is atomic on POSIX), then fsyncs the
folder, so a reader sees the old object or the new one, never a mix, and a
crash at any point leaves the old object readable. What a crash can leave
behind is a temporary file, named with ``TMP_PREFIX``: it is never listed or
returned, and that name is reserved so no key can collide with one.

``put_file`` and ``get_file`` go through the same temporary-file-then-rename
path; the kernel copies (``copy_file_range``) while a thread hashes the same
bytes, so neither holds more than one ``COPY_CHUNK`` in memory.

A filesystem cannot hold both ``a`` and ``a/b``; S3 can. Nothing here needs
both, and putting the second one raises the ``OSError`` the OS gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from gpuscout.store.base import FileDigest, ObjectNotFound

# Temporary files of in-flight (or crashed) puts start with this; keys may not.
TMP_PREFIX = ".gpuscout-tmp-"
# How much put_file / get_file read and write at a time.
COPY_CHUNK = 8 * 1024 * 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ValueError naming it.

    A key is a '/'-separated relative path: not empty, no leading '/', no
    empty, '.' or '..' segment, no backslash or NUL, and no segment starting
    with the reserved ``TMP_PREFIX``. The same rules hold for every store, so
    a key that works on the laptop works on S3 and the reverse.
    """
    if not isinstance(key, str):
        raise ValueError(f"object key must be a string, not {type(key).__name__}: {key!r}")
    problem = _key_problem(key, allow_trailing_slash=False)
    if problem:
        raise ValueError(f"invalid object key {key!r}: {problem}")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it may be listed: '' or the start of a valid key."""
    if not isinstance(prefix, str):
        raise ValueError(f"key prefix must be a string, not {type(prefix).__name__}: {prefix!r}")
    if prefix == "":
        return prefix
    problem = _key_problem(prefix, allow_trailing_slash=True)
    if problem:
        raise ValueError(f"invalid key prefix {prefix!r}: {problem}")
    return prefix


def _key_problem(key: str, *, allow_trailing_slash: bool) -> str | None:
    if key == "":
        return "empty"
    if key.startswith("/"):
        return "absolute (starts with '/')"
    if "\\" in key:
        return "contains a backslash"
    if "\x00" in key:
        return "contains a NUL character"
    segments = key.split("/")
    if allow_trailing_slash and segments[-1] == "":
        segments = segments[:-1]
    for segment in segments:
        if segment == "":
            return "has an empty path segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
        if segment.startswith(TMP_PREFIX):
            return f"segments starting with {TMP_PREFIX!r} are reserved"
    return None


def path_from_file_url(url: str) -> Path:
    """``file:///abs/path`` (or ``file://localhost/abs/path``) as a Path."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ValueError(f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL names a remote host {parts.netloc!r}: {url!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"file:// URL must hold an absolute path: {url!r}")
    return Path(path)


class FileStore:
    """Objects as files under one root folder (created on the first put)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """``root``: a ``file://`` URL or a filesystem path (made absolute)."""
        text = os.fspath(root)
        if urlsplit(text).scheme.lower() == "file":
            path = path_from_file_url(text)
        elif text == "":
            raise ValueError("FileStore root must not be empty")
        else:
            path = Path(text)
        self.root = path.expanduser().resolve()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStore({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        view = memoryview(data)
        with temp_beside(path, durable=True) as out:
            while view:
                written = os.write(out.fileno(), view)
                view = view[written:]

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        target = self._path(key)
        with open(path, "rb") as source, temp_beside(target, durable=True) as out:
            before = os.fstat(source.fileno())
            digest = copy_hashing(source, out)
            after = os.fstat(source.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise OSError(f"{path} changed while it was stored")
            return digest

    def get_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        try:
            source = self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        with source, temp_beside(Path(path)) as out:
            return copy_hashing(source, out)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        """All keys starting with ``prefix``, sorted (a snapshot taken now).

        Only the folder that the prefix's complete segments name is walked,
        so listing one job's checkpoints does not read the whole store.
        """
        check_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys: list[str] = []
        _walk(base, folder + "/" if folder else "", prefix, keys)
        keys.sort()  # code-point order is UTF-8 byte order, which is S3's
        return iter(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a folder is not an object: there is no such key
        # Prune emptied folders so they do not pile up and a later key may
        # take the folder's name; stops at the first non-empty one.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


@contextlib.contextmanager
def temp_beside(path: Path, *, durable: bool = False,
                readable: bool = False) -> Iterator[BinaryIO]:
    """A new temporary file in ``path``'s folder (made if missing), renamed
    over ``path`` when the block ends without error and deleted when it
    raises: whoever opens ``path`` sees the old file or the new one, whole.
    ``durable``: fsync the file before the rename and the folder after it,
    so the new version survives a crash (the store's own objects; a
    download that can be fetched again needs not pay for it). ``readable``:
    open it for reading too (``os.pread`` on its descriptor)."""
    # A concurrent delete may remove an emptied folder between our mkdir
    # and our open; making the folder again and retrying handles it.
    for attempt in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            mode = os.O_RDWR if readable else os.O_WRONLY
            fd = os.open(tmp, mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if attempt == 4:
                raise
            continue
        break
    try:
        with os.fdopen(fd, "rb+" if readable else "wb", buffering=0) as out:
            yield out  # type: ignore[misc]
            if durable:
                os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def copy_hashing(source: BinaryIO, out: BinaryIO) -> FileDigest:
    """Copy all of ``source`` into ``out`` (both at offset 0) and return the
    size and sha256 of the bytes copied.

    The kernel copies (``copy_file_range``: no pass through Python, and a
    reflink where the filesystem has them) while a second thread hashes the
    same bytes from ``source``: the two overlap, so hashing costs about
    nothing on top of the copy. ``source`` must not change meanwhile (a
    store object never does: it is replaced by rename, not rewritten);
    ``put_file`` checks that the caller's file did not.
    """
    src, dst = source.fileno(), out.fileno()
    size = os.fstat(src).st_size
    with ThreadPoolExecutor(1, thread_name_prefix="hash") as pool:
        hashed = pool.submit(_hash_fd, src, size)
        _copy_fd(src, dst, size)
        return FileDigest(size, hashed.result())


def _hash_fd(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(COPY_CHUNK))
    offset = 0
    while offset < size:
        got = os.preadv(fd, [buffer[:min(len(buffer), size - offset)]], offset)
        if not got:
            raise OSError(f"file shrank to {offset} bytes while it was copied")
        digest.update(buffer[:got])
        offset += got
    return digest.hexdigest()


def _copy_fd(src: int, dst: int, size: int) -> None:
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(src, dst, size - offset, offset, offset)
            if not copied:
                raise OSError(f"file shrank to {offset} bytes while it was copied")
            offset += copied
        return
    except OSError as exc:
        # Filesystems (and kernels) without it: copy through a buffer.
        if offset or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                       errno.EOPNOTSUPP, errno.EPERM):
            raise
    buffer = memoryview(bytearray(COPY_CHUNK))
    while offset < size:
        got = os.preadv(src, [buffer[:min(len(buffer), size - offset)]], offset)
        if not got:
            raise OSError(f"file shrank to {offset} bytes while it was copied")
        view = buffer[:got]
        while view:
            written = os.pwrite(dst, view, offset)
            view = view[written:]
            offset += written


def _walk(folder: Path, key_base: str, prefix: str, out: list[str]) -> None:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            continue
        key = key_base + entry.name
        if entry.is_dir(follow_symlinks=False):
            # Descend only where keys under it could match the prefix.
            sub = key + "/"
            if sub.startswith(prefix) or prefix.startswith(sub):
                _walk(Path(entry.path), sub, prefix, out)
        elif entry.is_file() and key.startswith(prefix):
            out.append(key)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable: fsync the folder entry (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # platforms without O_DIRECTORY: the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
