"""Streaming S3 transfers between a local file and one object: multipart,
parallel, checksummed, hashed in order while they stream.

Why not boto3's ``upload_file`` / ``download_file``: they read and write
parts out of order (each thread at its own offset), so the sha256 of the
whole file (what the checkpoint manifest records) would take a separate
pass over a multi-GB file, and their in-memory queues hold up to hundreds
of MiB. Here the file is hashed strictly in order while it streams, and
the bytes move between the socket and the file through small reused
buffers: memory stays at a few MiB (``COPY_CHUNK`` plus 1 MiB per worker)
whatever the object's size or the part size.

An upload is one PUT streamed from the file, or a multipart upload of
``part_size`` parts, ``concurrency`` at a time (``choose_upload``):
- under ``threshold``: one PUT;
- over ``concurrency`` x ``part_size`` (512 MiB by default) or S3's 5 GiB
  limit for one PUT: multipart. A failed PUT is sent again whole; this
  bounds that loss by what losing every part in flight would cost, and
  keeps the largest checkpoints parallel whatever was measured;
- in between, whichever has shown the higher throughput on this store
  (bytes/s end to end, smoothed over its uploads). Nothing is assumed
  about the size: while nothing is known the upload is multipart, its
  first part sent alone to measure one stream. On S3, where parallel
  streams add up, multipart keeps winning. On a server that spends more
  on a multipart upload than on one PUT (moto and s3rver concatenate the
  parts on complete: 1.2-1.9x the CPU of one PUT for 256 MiB) on a host
  whose cores the client shares, one PUT wins from the second upload on.
  Choosing by a fixed time per stream (as downloads do) would not: one
  stream takes 1.2-2 s for 256 MiB on those servers, as long as it takes
  on S3, where parts are several times faster.

A download starts as one GET of
the whole object, hashed as it streams, and adds parallel ranged GETs for
the tail only when that one stream proves slow (``Transfers.download``):
each extra request costs a round trip on S3, and on a server that reads the
whole object for every range, much more.

Integrity, layer by layer:
- each part is sent with an S3 additional checksum (``CRC32`` by default,
  or ``SHA256``): S3 refuses a part whose bytes do not match, and checks the
  parts' checksums again when the upload completes. A small object (up to
  ``COPY_CHUNK``) is sent with ``ChecksumSHA256`` set to its sha256, so S3
  itself checks the very digest that is returned to the caller. A larger
  one-PUT object carries the checksum of a first pass over the file; its
  sha256 is taken from the bytes as they are sent, with the checksum again,
  and a difference (the file changed) fails the upload even where the
  server does not check (``_put_stream``). Servers that ignore these
  headers (s3rver) store the object all the same; a server that refuses
  them is asked again without, and the store stops sending them;
- PUTs that carry a checksum go through ``put_client``, which does not
  sign the payload: the signed checksum header binds the body (botocore
  reasons the same way over https); on plain http that saves a second
  sha256 pass over every byte. Parts keep payload signing;
- every ranged GET is pinned to the ETag of the first GET (``If-Match``),
  so a download never stitches two versions of a key together, and every
  answer's length is checked against what was asked for; a whole-object
  GET read to its end is also checked by botocore against the object's
  full checksum, where S3 has one;
- the returned ``FileDigest`` is the sha256 of the bytes actually sent or
  written, which a caller compares with what it expects (end to end).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import errno
import functools
import hashlib
import math
import os
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from s3transfer.utils import ReadFileChunk  # type: ignore[import-untyped]

from gpuscout.aws_errors import error_code
from gpuscout.store.base import FileDigest
from gpuscout.store.fs import COPY_CHUNK, temp_beside

MAX_PARTS = 10_000  # S3's limit for one multipart upload
MAX_PUT = 5 * 1024 ** 3  # S3's limit for one PUT
MIN_PART = 5 * 1024 * 1024  # S3's minimum part size (all parts but the last)
CHECKSUM_ALGORITHMS = ("CRC32", "SHA256")
# Answers of servers that do not support an additional checksum we sent.
# (A checksum that does not match, BadDigest and the like, is not one: that
# is damage in transit, and it fails the transfer.)
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
# How much one download worker reads from its socket at a time.
_NET_CHUNK = 1024 * 1024
# A download that one stream finishes within this many seconds stays on one
# stream (one request); a slower one gets helpers for its tail, whose extra
# requests (a round trip each) are then small against what they save.
SINGLE_STREAM_S = 1.0
# How long the lead stream runs before its rate decides.
PROBE_S = 0.25


class ObjectChanged(Exception):
    """The object was replaced while it was being downloaded (its ETag
    changed between two ranged GETs): start again."""


class SourceChanged(Exception):
    """The file changed (size, mtime, or was replaced) while it was being
    uploaded: what the key now holds may not be what was hashed, so the
    upload is not vouched for."""


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def plan_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part: ``part_size`` each, grown when needed
    so there are at most MAX_PARTS; the last one takes the rest."""
    part_size = max(part_size, MIN_PART, math.ceil(size / MAX_PARTS))
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]


class Upload(enum.Enum):
    """How ``Transfers.upload`` sends a file."""

    PUT = "put"  # one PUT request, streamed from the file
    MULTIPART = "multipart"  # parts of part_size, concurrency at a time


def choose_upload(size: int, *, threshold: int, part_size: int, concurrency: int,
                  put_rate: float | None, multipart_rate: float | None) -> Upload:
    """One PUT or a multipart upload for a file of ``size`` bytes.

    - under ``threshold`` (or one part's worth): one PUT, as ever;
    - over what a multipart upload has in flight at once (``concurrency``
      x ``part_size``), or over S3's 5 GiB limit for one PUT: multipart.
      A failed PUT is sent again whole; this bounds that loss by what a
      failure of every part in flight would cost;
    - in between, the path that has been faster on this store, by its
      measured throughput (bytes/s, end to end): ``put_rate`` of one-PUT
      uploads, ``multipart_rate`` of multipart ones. Until both are known:
      multipart (whose first part measures ``put_rate``). On S3 parallel
      parts win, as they should; a server that pays more for a multipart
      upload than for one PUT (s3rver, moto: they concatenate the parts)
      on a host without cores to spare gets one PUT.
    """
    if size < threshold or size <= part_size:
        return Upload.PUT
    if size > min(MAX_PUT, concurrency * part_size):
        return Upload.MULTIPART
    if put_rate is None or multipart_rate is None:
        return Upload.MULTIPART
    return Upload.PUT if put_rate >= multipart_rate else Upload.MULTIPART


class Rate:
    """A throughput in bytes/s, smoothed over samples (EWMA, half weight
    to the newest); None until the first."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        sample = nbytes / seconds
        self.value = sample if self.value is None else (self.value + sample) / 2


class Transfers:
    """The transfer engine of one S3Store: its client, bucket and settings.

    ``checksum``: the additional checksum algorithm for parts, or None for
    none of ours (botocore may still add its default CRC32). It is dropped
    for good the first time the server refuses it. ``single_stream_s``: see
    ``download`` (0: always parallel ranges; inf: always one stream).
    """

    def __init__(self, client: Any, bucket: str, *, threshold: int, part_size: int,
                 concurrency: int, checksum: str | None,
                 single_stream_s: float = SINGLE_STREAM_S, put_client: Any = None) -> None:
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
        self.single_stream_s = single_stream_s
        self.put_client = client if put_client is None else put_client
        # What this store's uploads have shown (see ``choose_upload``).
        self.put_rate = Rate()
        self.multipart_rate = Rate()
        self._lock = threading.Lock()

    # --- upload ----------------------------------------------------------

    def upload(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        with open(path, "rb") as source:
            before = os.fstat(source.fileno())
            size = before.st_size
            with self._lock:
                put_rate, multipart_rate = self.put_rate.value, self.multipart_rate.value
            how = choose_upload(size, threshold=self.threshold, part_size=self.part_size,
                                concurrency=self.concurrency, put_rate=put_rate,
                                multipart_rate=multipart_rate)
            started = time.monotonic()
            if how is Upload.PUT:
                digest = self._put_whole(key, source, size)
                if size >= self.threshold:  # a size where multipart was an option
                    self._learn(self.put_rate, size, time.monotonic() - started)
            else:
                digest = self._put_parts(key, source, size, started)
            after = os.fstat(source.fileno())
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            # What was stored may not be what was hashed: do not vouch for it.
            raise SourceChanged(f"{path} changed while it was uploaded")
        return digest

    def _learn(self, rate: Rate, size: int, seconds: float) -> None:
        with self._lock:
            rate.add(size, seconds)

    def _put_whole(self, key: str, source: BinaryIO, size: int) -> FileDigest:
        """One PUT. Up to COPY_CHUNK the file is read whole and sent as
        bytes with its sha256 as ChecksumSHA256: S3 refuses the PUT unless
        what it received has the very digest returned to the caller. A
        larger file streams: see ``_put_stream``."""
        if size > COPY_CHUNK:
            return self._put_stream(key, source, size)
        data = source.read(size + 1)
        if len(data) != size:
            raise SourceChanged(f"{source.name} changed size while it was uploaded")
        digest = hashlib.sha256(data)
        if self.checksum is None or self._checksummed(lambda: self.put_client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                ChecksumSHA256=b64(digest.digest()))) is None:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return FileDigest(size, digest.hexdigest())

    def _put_stream(self, key: str, source: BinaryIO, size: int) -> FileDigest:
        """One PUT of a file streamed from disk, nothing held in memory.

        A first pass takes the S3 additional checksum (``checksum``: CRC32,
        3.8 GB/s, by default), which goes in the request's headers, so it
        has to be known before the body; the sha256 of the file is then
        taken in the sending thread from the very bytes sent, while the
        server takes them in (``_HashingBody``), not in a second pass
        ahead of the send. The checksum is taken again from the bytes sent:
        if they are not the bytes of the first pass, the file changed, and
        even a server that ignores checksums (s3rver) does not get vouched
        for. S3 itself refuses a body that does not match the header.

        The request goes through ``put_client``, which does not sign the
        payload: the checksum header is signed and binds the body, so
        botocore's own sha256 pass over it to sign it on plain http would
        be one more pass for nothing (over https botocore skips it anyway).
        The sha256 recorded is checked against every byte on restore."""
        algorithm = self.checksum
        if algorithm is not None:
            first = _PartSum(algorithm)
            _checksum_file(source, size, first)
            body = _HashingBody(source, size, algorithm)
            if self._checksummed(lambda: self.put_client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                    ChecksumAlgorithm=algorithm, **first.headers())) is None:
                algorithm = None
            elif body.sent != size or body.part.headers() != first.headers():
                raise SourceChanged(f"{source.name} changed while it was uploaded")
        if algorithm is None:  # signed as botocore does by default
            body = _HashingBody(source, size, None)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size)
            if body.sent != size:
                raise SourceChanged(f"{source.name} changed while it was uploaded")
        return FileDigest(size, body.digest.hexdigest())

    def _put_parts(self, key: str, source: BinaryIO, size: int, started: float) -> FileDigest:
        """The caller's thread reads the file once, in order, into one
        reused buffer: the sha256 of the whole file and each part's
        checksum come from that pass. Each part is then sent by a worker
        that reads its own byte range of the file (from the page cache,
        just read), so no part is ever held in memory; S3 checks the part's
        bytes against the checksum taken in the first pass.

        While this store has no measure of one stream's upload rate, the
        first part goes alone (the others wait for it): its rate stands for
        a one-PUT upload's in ``choose_upload``. The upload's rate (the
        probe left out) is learnt as the multipart rate."""
        with self._lock:
            probe = self.put_rate.value is None
        probed = (0, 0.0)  # bytes and seconds of the probe part
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
                _feed(source, length, buffer, digest, part)
                # Bounds the parts queued ahead of the workers (no memory is
                # held per part; this keeps reads close behind the hashing).
                window.acquire()
                if failed.is_set():
                    window.release()
                    break
                sent = time.monotonic()
                future = pool.submit(send, number, offset, length, part.headers())
                future.add_done_callback(settle)
                futures.append(future)
                if probe and number == 1:
                    future.result()  # alone: one stream's rate
                    probed = (length, time.monotonic() - sent)
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
        if probed[0]:
            self._learn(self.put_rate, *probed)
        self._learn(self.multipart_rate, size - probed[0],
                    time.monotonic() - started - probed[1])
        return FileDigest(size, digest.hexdigest())

    def _create_upload(self, key: str, algorithm: str | None) -> tuple[str, str | None]:
        """Start a multipart upload; returns its id and the checksum
        algorithm its parts carry (None where the server has none)."""
        if algorithm is not None:
            answer = self._checksummed(lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm=algorithm))
            if answer is not None:
                # A server that does not echo the algorithm ignores it: the
                # parts need not carry checksums it would not check.
                echoed = answer.get("ChecksumAlgorithm") == algorithm
                return answer["UploadId"], algorithm if echoed else None
        answer = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return answer["UploadId"], None

    def _checksummed(self, request: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Send ``request``, one that carries our checksums; None when the
        server refuses them, which are then dropped for good (the caller
        sends it again without)."""
        try:
            return request()
        except ClientError as exc:
            if error_code(exc) not in _UNSUPPORTED_CODES:
                raise
            with self._lock:
                self.checksum = None
            return None

    # --- download --------------------------------------------------------

    def download(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        """Write the object to ``path`` (renamed into place when whole).

        One GET of the whole object streams into the file in order and is
        hashed as it arrives, so nothing is read twice. When that one stream
        would take longer than ``single_stream_s`` at the rate it shows in
        its first ``PROBE_S`` (a slow link, a large object), up to
        ``concurrency - 1`` helpers take parts from the end with ranged
        GETs pinned to its ETag, and the stream stops where their parts
        begin; this thread then hashes those parts in order, reading back
        what they wrote (from the page cache). A fast link or a small object
        costs one request; a slow one gets parallel ranges after a moment.
        Raises ClientError for a missing key (as boto3 does), and
        ObjectChanged when the object is replaced mid-download (a helper's
        pinned GET fails): the caller decides whether to try again."""
        answer = self.client.get_object(Bucket=self.bucket, Key=key)
        size = int(answer["ContentLength"])
        plan = plan_parts(size, self.part_size)
        try:
            with temp_beside(Path(path), readable=True) as out:
                if len(plan) > 1:
                    _reserve(out.fileno(), size)
                digest = self._get_parts(key, answer, plan, out.fileno())
        finally:
            answer["Body"].close()
        return FileDigest(size, digest.hexdigest())

    def _get_parts(self, key: str, first: dict[str, Any], parts: list[tuple[int, int]],
                   fd: int) -> Any:
        """Stream ``first`` (the whole object) into ``fd``, with helpers for
        its tail parts when one stream is too slow; return the sha256."""
        digest = hashlib.sha256()
        claims = _Claims(len(parts))
        stop = threading.Event()
        led = _Lead()

        def lead() -> None:
            # The object's bytes in order: written, and hashed right away.
            body = first["Body"]
            index = claims.take_front()
            while index is not None:
                offset, length = parts[index]
                _stream_into(body, fd, offset, length, led.add, stop, digest)
                led.parts = index + 1
                index = claims.take_front()
            if led.parts == len(parts) and body.read(1):
                raise OSError("S3 answered more bytes than the object's length")

        if self.concurrency == 1 or len(parts) <= 1:
            lead()  # nothing to run beside it: no thread
            return digest

        progress = _Progress(len(parts))

        def helper(index: int | None) -> None:
            try:
                while index is not None and not stop.is_set():
                    offset, length = parts[index]
                    answer = self._get_range(key, first["ETag"], offset, length)
                    written = functools.partial(progress.add, index)
                    with contextlib.closing(answer["Body"]) as body:
                        _stream_into(body, fd, offset, length, written, stop)
                        if body.read(1):
                            raise OSError(f"S3 answered more than the {length} bytes asked for")
                    index = claims.take_tail()
            finally:
                progress.wake()  # the hashing thread sees an end, good or bad

        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-download")
        helpers: list[Future[None]] = []

        def start_helpers() -> None:
            # Each helper's first part is claimed here, before it runs, so
            # they start at the end even if the lead is quick.
            for _ in range(self.concurrency - 1):
                index = claims.take_tail()
                if index is None:
                    break
                helpers.append(pool.submit(helper, index))

        try:
            if self.single_stream_s <= 0:
                start_helpers()
            started = time.monotonic()
            leader = pool.submit(lead)
            decided = bool(helpers)
            while True:
                done, _ = wait([leader, *helpers], timeout=PROBE_S / 5,
                               return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()  # raises what stopped it
                if leader.done():
                    break
                elapsed = time.monotonic() - started
                if not decided and elapsed >= PROBE_S:
                    decided = True
                    rate = led.written / elapsed
                    left = claims.front_bytes_left(parts, led.written)
                    if rate <= 0 or left / rate > self.single_stream_s:
                        start_helpers()
            # The lead took parts [0, led.parts); helpers have the rest.
            buffer = memoryview(bytearray(COPY_CHUNK))
            for index in range(led.parts, len(parts)):
                offset, length = parts[index]
                hashed = 0
                while hashed < length:
                    written = progress.wait_past(index, hashed)
                    if written > hashed:
                        _hash_range(fd, offset + hashed, written - hashed, digest, buffer)
                        hashed = written
                        continue
                    for future in helpers:
                        if future.done():
                            future.result()  # raises what stopped it
                    if all(future.done() for future in helpers):
                        raise OSError(f"part at {offset} ended after {hashed} bytes")
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.wake()
        for future in helpers:
            future.result()
        return digest

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


class _Lead:
    """What the lead stream of a download has done: bytes written, and the
    number of parts (from the first) it has finished."""

    def __init__(self) -> None:
        self.written = 0
        self.parts = 0

    def add(self, count: int) -> None:
        self.written += count  # one writer: the lead's thread


class _Claims:
    """Who writes which part of a download: the lead stream takes parts
    from the front (the first always), helpers from the back; each part is
    taken once."""

    def __init__(self, parts: int) -> None:
        self._front = 0
        self._back = parts - 1
        self._lock = threading.Lock()

    def take_front(self) -> int | None:
        with self._lock:
            if self._front > self._back:
                return None
            self._front += 1
            return self._front - 1

    def take_tail(self) -> int | None:
        with self._lock:
            # Part 0 is the lead's: its stream is already flowing there.
            if self._front > self._back or self._back == 0:
                return None
            self._back -= 1
            return self._back + 1

    def front_bytes_left(self, parts: list[tuple[int, int]], written: int) -> int:
        """Bytes the lead has still to write if nobody helps it."""
        with self._lock:
            last = self._back
        if last < 0:
            return 0
        offset, length = parts[last]
        return max(0, offset + length - written)


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


def _stream_into(body: Any, fd: int, offset: int, length: int,
                 written: Callable[[int], None], stop: threading.Event,
                 digest: Any = None) -> None:
    """Write the next ``length`` bytes of a GET answer's body into ``fd`` at
    ``offset`` through a small buffer (hashing them into ``digest`` if
    given), calling ``written(n)`` after each piece. Raises OSError if the
    body ends first, _Stopped once ``stop`` is set."""
    buffer = memoryview(bytearray(_NET_CHUNK))
    done = 0
    while done < length:
        if stop.is_set():
            raise _Stopped()
        got = body.readinto(buffer[:min(len(buffer), length - done)])
        if not got:
            raise OSError(f"S3 answered {done} bytes where {length} were due")
        view = buffer[:got]
        if digest is not None:
            digest.update(view)
        while view:
            count = os.pwrite(fd, view, offset + done)
            view = view[count:]
            done += count
            written(count)


class _Stopped(Exception):
    """A download worker was told to stop (another one failed)."""


def _reserve(fd: int, size: int) -> None:
    """Allocate the download's whole file before any part arrives: a disk
    without room fails now rather than after gigabytes, and the parts'
    writes then land in blocks already allocated (no allocation per write,
    none racing between the workers). Where the filesystem cannot, the
    writes allocate as they go."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    try:
        allocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # EOPNOTSUPP, EINVAL and the like: a filesystem without it.


def _hash_range(fd: int, offset: int, length: int, digest: Any, buffer: memoryview) -> None:
    end = offset + length
    while offset < end:
        got = os.preadv(fd, [buffer[:min(len(buffer), end - offset)]], offset)
        if not got:
            raise OSError("the download's file is shorter than what was written to it")
        digest.update(buffer[:got])
        offset += got


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _checksum_file(source: BinaryIO, size: int, into: _PartSum) -> None:
    """Add the first ``size`` bytes of ``source`` to ``into``."""
    source.seek(0)
    _feed(source, size, memoryview(bytearray(COPY_CHUNK)), into)


def _feed(source: BinaryIO, length: int, buffer: memoryview, *sums: Any) -> None:
    """Read the next ``length`` bytes of ``source`` through ``buffer`` into
    each of ``sums`` (anything with ``update``); SourceChanged if the file
    ends first."""
    remaining = length
    while remaining:
        got = source.readinto(buffer[:min(len(buffer), remaining)])  # type: ignore[attr-defined]
        if not got:
            raise SourceChanged(f"{source.name} shrank while it was uploaded")
        for into in sums:
            into.update(buffer[:got])
        remaining -= got


class _HashingBody:
    """The first ``size`` bytes of a file as a request body that hashes
    what it hands out, in order: ``digest`` (sha256) and ``part`` (the S3
    additional checksum, if any), and counts it in ``sent``. botocore
    rewinds a body to send it again (a retry): a rewind starts the sums
    again, so they are always those of the last sending, the one that
    succeeded."""

    def __init__(self, source: BinaryIO, size: int, algorithm: str | None) -> None:
        self._source = source
        self._size = size
        self._algorithm = algorithm
        self._at = 0
        source.seek(0)
        self._restart()

    def _restart(self) -> None:
        self.digest = hashlib.sha256()
        self.part = _PartSum(self._algorithm)
        self.sent = 0

    def read(self, amount: int | None = -1) -> bytes:
        left = self._size - self._at
        count = left if amount is None or amount < 0 else min(amount, left)
        data = self._source.read(count)
        if self._at != self.sent:  # read from past a gap: the sums cannot cover it
            raise OSError("request body read out of order")
        view = memoryview(data)
        self.digest.update(view)
        self.part.update(view)
        self._at += len(data)
        self.sent = self._at
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._at, 2: self._size}[whence]
        self._at = max(0, min(self._size, base + offset))
        self._source.seek(self._at)
        if self._at != self.sent:
            self._restart()  # sent again from the start
        return self._at

    def tell(self) -> int:
        return self._at

    def __len__(self) -> int:
        return self._size - self._at
