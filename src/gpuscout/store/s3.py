"""The S3 object store (AWS S3 or anything that speaks its API), through boto3.

``s3://bucket`` or ``s3://bucket/some/prefix``: keys live under the prefix.
The endpoint is, in order: the ``endpoint_url`` argument,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else AWS itself; credentials
and region come from boto3's usual chain (environment, profile, instance
role). Nothing is created implicitly: a missing bucket is an error, unless
``create_bucket=True`` (tests, demos).

An S3 PUT is atomic by itself (an object becomes visible whole, a multipart
upload only when it completes), so ``put`` needs no temporary key. Objects
of ``multipart_threshold`` bytes or more travel through boto3's transfer
manager: a multipart upload, and parallel ranged GETs, ``max_concurrency``
at a time, which is what multi-GB checkpoints need.

``put_file`` / ``get_file`` stream between a local file and an object
without holding it in memory (see ``gpuscout.store.transfer``), with S3
additional checksums (``checksum_algorithm``), the file hashed in order as
it streams. An upload is one PUT or parts of ``multipart_chunksize``
bytes, ``max_concurrency`` at a time: multipart above ``max_concurrency``
x ``multipart_chunksize`` (and 5 GiB), and in between whichever has been
faster on this store. A download is one streaming GET, joined by ranged
GETs pinned to its ETag when one stream proves slow.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from s3transfer.exceptions import S3DownloadFailedError  # type: ignore[import-untyped]

from gpuscout.aws_errors import error_code
from gpuscout.store.base import FileDigest, ObjectNotFound
from gpuscout.store.fs import check_key, check_prefix
from gpuscout.store.transfer import ObjectChanged, Transfers

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 64 * MiB
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_CHECKSUM_ALGORITHM = "CRC32"
MAX_KEY_BYTES = 1024  # S3's limit on a full key, prefix included
# What S3 (and S3-compatible servers) answer for a missing object.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# Large reads restart when the object is replaced while being read.
_GET_ATTEMPTS = 5


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b"); ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"not an s3:// URL: {url!r}")
    if not parts.netloc:
        raise ValueError(f"s3:// URL has no bucket: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"s3:// URL must not have a query or fragment: {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        check_prefix(prefix)
    return parts.netloc, prefix


def endpoint_from_env(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def is_not_found(exc: ClientError) -> bool:
    """A missing object (a missing bucket answers NoSuchBucket: not this)."""
    return error_code(exc) in _NOT_FOUND_CODES


class S3Store:
    """Objects in one S3 bucket, under an optional key prefix."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        session: boto3.session.Session | None = None,
        create_bucket: bool = False,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        checksum_algorithm: str | None = DEFAULT_CHECKSUM_ALGORITHM,
    ) -> None:
        """``session``: a boto3 session to take credentials and region from
        (default: a new one, i.e. the environment). Multipart parts must be
        at least 5 MiB on S3, so ``multipart_chunksize`` is at least that.
        ``checksum_algorithm``: the S3 additional checksum of each part that
        ``put_file`` sends ("CRC32", "SHA256", or None for none)."""
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        if multipart_chunksize < 5 * MiB:
            raise ValueError(f"multipart_chunksize must be >= 5 MiB, got {multipart_chunksize}")
        self.endpoint_url = endpoint_url or endpoint_from_env()
        # boto3 sessions are not thread-safe but clients are: one session
        # makes the one client every thread of this store shares.
        session = session or boto3.session.Session()
        region = session.region_name
        if region is None and self.endpoint_url:
            region = "us-east-1"  # S3-compatible servers ignore it; boto3 needs one
        config = Config(
            # SigV4 everywhere, presigned URLs included (SigV2 is gone from
            # newer regions).
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=max(10, max_concurrency * 2),
            # Local and on-premises S3 servers want path-style URLs
            # (http://host:port/bucket/key), not bucket.host names.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        self.client: Any = session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=region, config=config
        )
        # For PUTs that carry the body's sha256 as ChecksumSHA256 (a signed
        # header, checked by S3): signing the payload as well would only
        # hash the same bytes a second time. botocore already skips it over
        # https; this client skips it over plain http too.
        unsigned = config.merge(Config(s3={
            **(config.s3 or {}), "payload_signing_enabled": False}))
        put_client: Any = session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=region, config=unsigned
        )
        self.multipart_threshold = multipart_threshold
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self.transfers = Transfers(
            self.client, self.bucket, threshold=multipart_threshold,
            part_size=multipart_chunksize, concurrency=max_concurrency,
            checksum=checksum_algorithm, put_client=put_client,
        )
        if create_bucket:
            self._create_bucket(region)

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.url!r}{where})"

    def _create_bucket(self, region: str | None) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if not is_not_found(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    def _full(self, key: str) -> str:
        check_key(key)
        full = f"{self.prefix}/{key}" if self.prefix else key
        if len(full.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"invalid object key {key!r}: longer than S3's {MAX_KEY_BYTES} bytes")
        return full

    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        if len(data) >= self.multipart_threshold:
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, full, Config=self.transfer
            )
        else:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get(self, key: str) -> bytes:
        full = self._full(key)
        for _ in range(_GET_ATTEMPTS):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if is_not_found(exc):
                    raise ObjectNotFound(key) from None
                raise
            body = answer["Body"]
            if answer.get("ContentLength", 0) < self.multipart_threshold:
                with body:
                    data: bytes = body.read()
                return data
            # Large: drop this stream and fetch in parallel ranges instead.
            # s3transfer pins every ranged GET to the ETag it saw first, so a
            # concurrent overwrite cannot mix two objects: it fails the pin
            # (412), and we start again.
            body.close()
            buffer = io.BytesIO()
            try:
                self.client.download_fileobj(self.bucket, full, buffer, Config=self.transfer)
            except ClientError as exc:
                if is_not_found(exc):
                    raise ObjectNotFound(key) from None
                if error_code(exc) in ("PreconditionFailed", "412"):
                    continue
                raise
            except S3DownloadFailedError as exc:
                # s3transfer's wrapping of that same 412 on a ranged GET.
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ClientError) and error_code(cause) in (
                        "PreconditionFailed", "412"):
                    continue
                raise
            return buffer.getvalue()
        raise RuntimeError(f"{key!r} changed under every one of {_GET_ATTEMPTS} reads")

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        return self.transfers.upload(self._full(key), path)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        full = self._full(key)
        for _ in range(_GET_ATTEMPTS):
            try:
                return self.transfers.download(full, path)
            except ClientError as exc:
                if is_not_found(exc):
                    raise ObjectNotFound(key) from None
                raise
            except ObjectChanged:
                continue  # replaced mid-download: read the new version whole
        raise RuntimeError(f"{key!r} changed under every one of {_GET_ATTEMPTS} reads")

    def presigned_get_url(self, key: str, expires_s: float) -> str:
        """A URL that GETs ``key`` without credentials for ``expires_s``
        seconds (SigV4: at most 7 days, and no longer than the signing
        credentials live). It holds a signature and the access key id, not
        the secret key; made with temporary credentials it also holds their
        session token, which signs nothing without the secret key."""
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=max(1, int(expires_s)),
        )
        return url

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``, sorted (a snapshot taken now).

        AWS lists in UTF-8 byte order already, but not every S3-compatible
        server does (s3rver orders by path segment), and the protocol
        promises the order, so the keys are sorted here.
        """
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        return iter(sorted(self._iter_keys(base, base + prefix)))

    def _iter_keys(self, base: str, full_prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", ()):
                yield item["Key"][len(base):]

    def delete(self, key: str) -> None:
        # S3 answers 204 for a key that is not there: idempotent as it is.
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))


