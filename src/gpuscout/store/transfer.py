"""Streaming S3 transfers between a local file and one object: multipart,
parallel, checksummed, hashed in order while they stream.

Why not boto3's ``upload_file`` / ``download_file``: they read and write
parts out of order (each thread at its own offset), so the sha256 of the
whole file (what the checkpoint manifest records) would take a second pass
over a multi-GB file. Here the caller's thread reads (uploads) or writes
(downloads) the file strictly in order and hashes it as it goes, while up to
``concurrency`` parts travel at once on worker threads. Memory is bounded by
``concurrency`` parts plus one, whatever the object's size.

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
import collections
import hashlib
import math
import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from gpuscout.store.base import FileDigest
from gpuscout.store.fs import COPY_CHUNK, temp_beside

MAX_PARTS = 10_000  # S3's limit for one multipart upload
MIN_PART = 5 * 1024 * 1024  # S3's minimum part size (all parts but the last)
CHECKSUM_ALGORITHMS = ("CRC32", "SHA256")
# Answers of servers that do not support an additional checksum we sent.
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest",
                                "XAmzContentChecksumMismatch", "InvalidChecksum"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})


class ObjectChanged(Exception):
    """The object was replaced while it was being downloaded (its ETag
    changed between two ranged GETs): start again."""


class SourceChanged(Exception):
    """The file changed size while it was being uploaded."""


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def part_checksum(algorithm: str, data: bytes) -> str:
    """The base64 value S3 expects in ``x-amz-checksum-<algorithm>``."""
    if algorithm == "CRC32":
        return b64(zlib.crc32(data).to_bytes(4, "big"))
    if algorithm == "SHA256":
        return b64(hashlib.sha256(data).digest())
    raise ValueError(f"unsupported checksum algorithm {algorithm!r}: use one of "
                     f"{', '.join(CHECKSUM_ALGORITHMS)} or None")


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
        if checksum is not None:
            part_checksum(checksum, b"")  # validates the name
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
            size = os.fstat(source.fileno()).st_size
            if size < self.threshold or size <= self.part_size:
                return self._put_whole(key, source)
            return self._put_parts(key, source, size)

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
        algorithm = self.checksum
        upload_id, algorithm = self._create_upload(key, algorithm)
        digest = hashlib.sha256()
        parts = plan_parts(size, self.part_size)
        window = threading.BoundedSemaphore(self.concurrency)
        failed = threading.Event()
        futures: list[Future[dict[str, Any]]] = []

        def send(number: int, data: bytes) -> dict[str, Any]:
            kwargs: dict[str, Any] = {}
            if algorithm is not None:
                kwargs[f"Checksum{algorithm}"] = part_checksum(algorithm, data)
            answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                             PartNumber=number, Body=data, **kwargs)
            return {"PartNumber": number, "ETag": answer["ETag"], **kwargs}

        def settle(future: Future[dict[str, Any]]) -> None:
            if future.cancelled() or future.exception() is not None:
                failed.set()
            window.release()

        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-upload")
        try:
            for number, (_, length) in enumerate(parts, start=1):
                window.acquire()
                if failed.is_set():
                    window.release()
                    break
                data = source.read(length)
                if len(data) != length:
                    window.release()
                    raise SourceChanged(f"{source.name} shrank while it was uploaded")
                digest.update(data)
                future = pool.submit(send, number, data)
                future.add_done_callback(settle)
                futures.append(future)
            else:
                if source.read(1):
                    raise SourceChanged(f"{source.name} grew while it was uploaded")
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
        the size and the ETag the other parts are pinned to. Raises
        ClientError for a missing key (as boto3 does), and ObjectChanged
        when the object is replaced mid-download: the caller decides
        whether to try again."""
        first_range = max(self.part_size, MIN_PART)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key,
                                            Range=f"bytes=0-{first_range - 1}")
        except ClientError as exc:
            if error_code(exc) != "InvalidRange":
                raise
            # An empty object has no byte 0 to ask for.
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        with temp_beside(Path(path)) as out:
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
            head = _read_body(answer, min(size, first_range))
            digest.update(head)
            _write_all(out, head)
            del head
            rest = [(offset, min(first_range, size - offset))
                    for offset in range(first_range, size, first_range)]
            if rest:
                self._get_ranges(key, answer["ETag"], rest, digest, out)
            return FileDigest(size, digest.hexdigest())

    def _get_ranges(self, key: str, etag: str, ranges: list[tuple[int, int]],
                    digest: Any, out: BinaryIO) -> None:
        def fetch(offset: int, length: int) -> bytes:
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
            return _read_body(answer, length)

        pending: collections.deque[Future[bytes]] = collections.deque()
        queue = iter(ranges)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-download") as pool:
            try:
                for _ in range(self.concurrency):
                    item = next(queue, None)
                    if item is not None:
                        pending.append(pool.submit(fetch, *item))
                while pending:
                    data = pending.popleft().result()
                    item = next(queue, None)
                    if item is not None:
                        pending.append(pool.submit(fetch, *item))
                    digest.update(data)
                    _write_all(out, data)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


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


def _read_body(answer: dict[str, Any], expected: int) -> bytes:
    body = answer["Body"]
    try:
        data: bytes = body.read()
    finally:
        body.close()
    if len(data) != expected:
        raise OSError(f"S3 answered {len(data)} bytes where {expected} were asked for")
    return data


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
