"""Streaming S3 transfers between a local file and one object: multipart,
parallel, checksummed, hashed in order while they stream.

Why not boto3's ``upload_file`` / ``download_file``: they read and write
parts out of order (each thread at its own offset), so the sha256 of the
whole file (what the checkpoint manifest records) would take a separate
pass over a multi-GB file, and their in-memory queues hold up to hundreds
of MiB. Here the caller's thread hashes the file strictly in order while up
to ``concurrency`` parts travel at once on worker threads, and the parts
move between the socket and the file through small reused buffers: memory
stays at a few MiB (``COPY_CHUNK`` plus 1 MiB per worker) whatever the
object's size or the part size. Objects under the multipart threshold go in
one PUT, read whole (at most ``threshold`` bytes).

Integrity, layer by layer:
- each part is sent with an S3 additional checksum (``CRC32`` by default,
  or ``SHA256``): S3 refuses a part whose bytes do not match, and checks the
  parts' checksums again when the upload completes. A one-part object is
  sent with ``ChecksumSHA256`` set to its sha256, so S3 itself checks the
  very digest that is returned to the caller. Servers that ignore these
  headers (s3rver) store the object all the same; a server that refuses
  them is asked again without, and the store stops sending them;
- every ranged GET is pinned to the ETag of the first one (``If-Match``),
  so a download never stitches two versions of a key together, and its
  length is checked against the range asked for;
- the returned ``FileDigest`` is the sha256 of the bytes actually sent or
  written, which a caller compares with what it expects (end to end).
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from s3transfer.utils import ReadFileChunk  # type: ignore[import-untyped]

from gpuscout.store.base import FileDigest
from gpuscout.store.fs import COPY_CHUNK, temp_beside

MAX_PARTS = 10_000  # S3's limit for one multipart upload
MIN_PART = 5 * 1024 * 1024  # S3's minimum part size (all parts but the last)
CHECKSUM_ALGORITHMS = ("CRC32", "SHA256")
# Answers of servers that do not support an additional checksum we sent.
# (A checksum that does not match, BadDigest and the like, is not one: that
# is damage in transit, and it fails the transfer.)
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
# How much one download worker reads from its socket at a time.
_NET_CHUNK = 1024 * 1024


class ObjectChanged(Exception):
    """The object was replaced while it was being downloaded (its ETag
    changed between two ranged GETs): start again."""


class SourceChanged(Exception):
    """The file changed (size, mtime, or was replaced) while it was being
    uploaded: what the key now holds may not be what was hashed, so the
    upload is not vouched for."""


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def plan_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part: ``part_size`` each, grown when needed
    so there are at most MAX_PARTS; the last one takes the rest."""
    part_size = max(part_size, MIN_PART, math.ceil(size / MAX_PARTS))
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]


class Transfers:
    """The transfer engine of one S3Store: its client, bucket and settings.

    ``checksum``: the additional checksum algorithm for parts, or None for
    none of ours (botocore may still add its default CRC32). It is dropped
    for good the first time the server refuses it.
    """

    def __init__(self, client: Any, bucket: str, *, threshold: int, part_size: int,
                 concurrency: int, checksum: str | None) -> None:
        if checksum is not None and checksum not in CHECKSUM_ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {checksum!r}: use one of "
                             f"{', '.join(CHECKSUM_ALGORITHMS)} or None")
        if concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {concurrency}")
        self.client = client
        self.bucket = bucket
        self.threshold = threshold
        self.part_size = part_size
        self.concurrency = concurrency
        self.checksum = checksum
        self._lock = threading.Lock()

    # --- upload ----------------------------------------------------------

    def upload(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        with open(path, "rb") as source:
            before = os.fstat(source.fileno())
            if before.st_size < self.threshold or before.st_size <= self.part_size:
                digest = self._put_whole(key, source)
            else:
                digest = self._put_parts(key, source, before.st_size)
            after = os.fstat(source.fileno())
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            # What was stored may not be what was hashed: do not vouch for it.
            raise SourceChanged(f"{path} changed while it was uploaded")
        return digest

    def _put_whole(self, key: str, source: BinaryIO) -> FileDigest:
        data = source.read()  # under the multipart threshold: small enough
        digest = hashlib.sha256(data)
        kwargs: dict[str, Any] = {}
        if self.checksum is not None:
            kwargs["ChecksumAlgorithm"] = "SHA256"
            kwargs["ChecksumSHA256"] = b64(digest.digest())
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)
        except ClientError as exc:
            if not kwargs or error_code(exc) not in _UNSUPPORTED_CODES:
                raise
            self._drop_checksums()
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return FileDigest(len(data), digest.hexdigest())

    def _put_parts(self, key: str, source: BinaryIO, size: int) -> FileDigest:
        """The caller's thread reads the file once, in order, into one
        reused buffer: the sha256 of the whole file and each part's
        checksum come from that pass. Each part is then sent by a worker
        that reads its own byte range of the file (from the page cache,
        just read), so no part is ever held in memory; S3 checks the part's
        bytes against the checksum taken in the first pass."""
        upload_id, algorithm = self._create_upload(key, self.checksum)
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(COPY_CHUNK))
        futures: list[Future[dict[str, Any]]] = []
        window = threading.BoundedSemaphore(self.concurrency * 2)
        failed = threading.Event()

        first = os.fstat(source.fileno())

        def send(number: int, offset: int, length: int, checksum: dict[str, str]) -> dict[str, Any]:
            # Its own handle on the file: a position of its own.
            with open(source.name, "rb") as own:
                now = os.fstat(own.fileno())
                if (now.st_dev, now.st_ino) != (first.st_dev, first.st_ino):
                    raise SourceChanged(f"{source.name} was replaced while it was uploaded")
                own.seek(offset)
                body = ReadFileChunk(own, length, size, enable_callbacks=False)
                answer = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=body, ContentLength=length, **checksum)
            return {"PartNumber": number, "ETag": answer["ETag"], **checksum}

        def settle(future: Future[dict[str, Any]]) -> None:
            if future.cancelled() or future.exception() is not None:
                failed.set()
            window.release()

        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-upload")
        try:
            for number, (offset, length) in enumerate(plan_parts(size, self.part_size), 1):
                part = _PartSum(algorithm)
                remaining = length
                while remaining:
                    got = source.readinto(buffer[:min(len(buffer), remaining)])  # type: ignore[attr-defined]
                    if not got:
                        raise SourceChanged(f"{source.name} shrank while it was uploaded")
                    digest.update(buffer[:got])
                    part.update(buffer[:got])
                    remaining -= got
                # Bounds the parts queued ahead of the workers (no memory is
                # held per part; this keeps reads close behind the hashing).
                window.acquire()
                if failed.is_set():
                    window.release()
                    break
                future = pool.submit(send, number, offset, length, part.headers())
                future.add_done_callback(settle)
                futures.append(future)
            done = [future.result() for future in futures]  # raises the first failure
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": done})
        except BaseException:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id)
            except ClientError:
                pass  # S3's lifecycle rule for incomplete uploads is the backstop
            raise
        pool.shutdown(wait=True)
        return FileDigest(size, digest.hexdigest())

    def _create_upload(self, key: str, algorithm: str | None) -> tuple[str, str | None]:
        """Start a multipart upload; returns its id and the checksum
        algorithm its parts carry (None where the server has none)."""
        if algorithm is not None:
            try:
                answer = self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=key, ChecksumAlgorithm=algorithm)
            except ClientError as exc:
                if error_code(exc) not in _UNSUPPORTED_CODES:
                    raise
                self._drop_checksums()
            else:
                # A server that does not echo the algorithm ignores it: the
                # parts need not carry checksums it would not check.
                echoed = answer.get("ChecksumAlgorithm") == algorithm
                return answer["UploadId"], algorithm if echoed else None
        answer = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return answer["UploadId"], None

    def _drop_checksums(self) -> None:
        with self._lock:
            self.checksum = None

    # --- download --------------------------------------------------------

    def download(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        """Write the object to ``path`` (renamed into place when whole).

        The first GET asks for the first part: for an object of one part
        that is the whole download, and for a larger one its answer names
        the size and the ETag the other parts are pinned to. Workers write
        each part's bytes straight into the file at its offset as they
        arrive; the caller's thread hashes the file in order behind them,
        reading back what was just written (from the page cache), so no
        part is held in memory. Raises ClientError for a missing key (as
        boto3 does), and ObjectChanged when the object is replaced
        mid-download: the caller decides whether to try again."""
        first_range = max(self.part_size, MIN_PART)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key,
                                            Range=f"bytes=0-{first_range - 1}")
        except ClientError as exc:
            if error_code(exc) != "InvalidRange":
                raise
            # An empty object has no byte 0 to ask for.
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        with temp_beside(Path(path), readable=True) as out:
            digest = hashlib.sha256()
            if not answer.get("ContentRange"):
                # The whole object came back (empty, or a server that
                # ignores Range): stream it as it is.
                size = 0
                body = answer["Body"]
                try:
                    for chunk in body.iter_chunks(COPY_CHUNK):
                        digest.update(chunk)
                        _write_all(out, chunk)
                        size += len(chunk)
                finally:
                    body.close()
                if size != answer["ContentLength"]:
                    raise OSError(f"S3 answered {size} bytes for an object of "
                                  f"{answer['ContentLength']}")
                return FileDigest(size, digest.hexdigest())
            size = _total_size(answer)
            if size == 0:  # s3rver answers "bytes 0-0/0" for an empty object
                answer["Body"].close()
                return FileDigest(0, digest.hexdigest())
            parts = [(offset, min(first_range, size - offset))
                     for offset in range(0, size, first_range)]
            self._get_parts(key, answer, parts, out.fileno(), digest)
            return FileDigest(size, digest.hexdigest())

    def _get_parts(self, key: str, first: dict[str, Any], parts: list[tuple[int, int]],
                   fd: int, digest: Any) -> None:
        """Workers stream each part into ``fd`` at its offset (the first
        from the answer already open, the others by ranged GETs pinned to
        its ETag) and report each piece written; this thread hashes the
        file in order right behind them, so hashing overlaps the transfer."""
        progress = _Progress(len(parts))
        etag = first["ETag"]

        def fetch(index: int) -> None:
            try:
                offset, length = parts[index]
                answer = first if index == 0 else self._get_range(key, etag, offset, length)
                _stream_into(answer, fd, offset, length, lambda n: progress.add(index, n))
            finally:
                progress.wake()

        buffer = memoryview(bytearray(COPY_CHUNK))
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-download") as pool:
            futures = [pool.submit(fetch, index) for index in range(len(parts))]
            try:
                for index, (offset, length) in enumerate(parts):
                    hashed = 0
                    while hashed < length:
                        written = progress.wait_past(index, hashed)
                        if written > hashed:
                            _hash_range(fd, offset + hashed, written - hashed, digest, buffer)
                            hashed = written
                        elif futures[index].done():
                            futures[index].result()  # raises what stopped it
                            raise OSError(f"part at {offset} ended after {hashed} bytes")
                    futures[index].result()
            except BaseException:
                for future in futures:
                    future.cancel()
                first["Body"].close()  # in case its worker never started
                raise

    def _get_range(self, key: str, etag: str, offset: int, length: int) -> dict[str, Any]:
        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=key, IfMatch=etag,
                Range=f"bytes={offset}-{offset + length - 1}")
        except ClientError as exc:
            if error_code(exc) in _PRECONDITION_CODES or _status(exc) == 404:
                raise ObjectChanged(key) from None
            raise
        if answer.get("ETag", etag) != etag:  # servers that ignore If-Match
            answer["Body"].close()
            raise ObjectChanged(key)
        return answer


class _Progress:
    """Bytes written so far into each part of a download: workers add to
    it, the hashing thread waits on it."""

    def __init__(self, parts: int) -> None:
        self._written = [0] * parts
        self._changed = threading.Condition()

    def add(self, index: int, count: int) -> None:
        with self._changed:
            self._written[index] += count
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_past(self, index: int, count: int, timeout: float = 1.0) -> int:
        """The bytes written into part ``index`` once more than ``count``
        are, or after ``timeout`` (or a wake) whatever it is then."""
        with self._changed:
            if self._written[index] <= count:
                self._changed.wait(timeout)
            return self._written[index]


class _PartSum:
    """The running S3 additional checksum of one part."""

    def __init__(self, algorithm: str | None) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._sha = hashlib.sha256() if algorithm == "SHA256" else None

    def update(self, data: memoryview) -> None:
        if self.algorithm == "CRC32":
            self._crc = zlib.crc32(data, self._crc)
        elif self._sha is not None:
            self._sha.update(data)

    def headers(self) -> dict[str, str]:
        if self.algorithm == "CRC32":
            return {"ChecksumCRC32": b64(self._crc.to_bytes(4, "big"))}
        if self._sha is not None:
            return {"ChecksumSHA256": b64(self._sha.digest())}
        return {}


def _stream_into(answer: dict[str, Any], fd: int, offset: int, length: int,
                 written: Callable[[int], None]) -> None:
    """Write a GET answer's body into ``fd`` at ``offset`` through a small
    buffer, calling ``written(n)`` after each piece; it must be exactly
    ``length`` bytes."""
    body = answer["Body"]
    buffer = memoryview(bytearray(_NET_CHUNK))
    done = 0
    try:
        while done < length:
            got = body.readinto(buffer[:min(len(buffer), length - done)])
            if not got:
                break
            view = buffer[:got]
            while view:
                count = os.pwrite(fd, view, offset + done)
                view = view[count:]
                done += count
                written(count)
        if done != length or body.read(1):
            raise OSError(f"S3 answered a byte count other than the {length} asked for")
    finally:
        body.close()


def _hash_range(fd: int, offset: int, length: int, digest: Any, buffer: memoryview) -> None:
    end = offset + length
    while offset < end:
        got = os.preadv(fd, [buffer[:min(len(buffer), end - offset)]], offset)
        if not got:
            raise OSError("the download's file is shorter than what was written to it")
        digest.update(buffer[:got])
        offset += got


def _write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def _total_size(answer: dict[str, Any]) -> int:
    """The object's size from a (possibly ranged) GET answer."""
    content_range = answer.get("ContentRange")
    if content_range:  # "bytes 0-99/12345"
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return int(answer["ContentLength"])


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
