"""One suite for every object store: FileStore on a temp folder, and S3Store
against two real S3 servers on loopback (moto, and s3rver from npm), the
latter also under a bucket prefix. No mocks: each test talks to the real
backend, and the S3 ones each get a fresh bucket."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from gpuscout.store import (
    FileDigest,
    FileStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    open_store,
)
from gpuscout.store.fs import TMP_PREFIX
from tests.s3_servers import S3Endpoint

MiB = 1024 * 1024
# Lowered so a 20 MiB object goes multipart (S3's minimum part is 5 MiB).
TEST_THRESHOLD = 5 * MiB
BACKENDS = ["file", "moto", "moto-prefixed", "s3rver"]


@dataclass
class Backend:
    """A store under test, and how another process can open the same one."""

    name: str
    store: ObjectStore
    child_spec: dict[str, Any]


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name == "file":
        store = FileStore(tmp_path / "store")
        return Backend(name, store, {"kind": "file", "url": store.url})
    server_fixture = "s3rver_server" if name == "s3rver" else "moto_server"
    endpoint: S3Endpoint = request.getfixturevalue(server_fixture)
    prefix = "base/prefix" if name.endswith("-prefixed") else ""
    s3 = endpoint.new_store(prefix, multipart_threshold=TEST_THRESHOLD,
                            multipart_chunksize=TEST_THRESHOLD)
    return Backend(name, s3, {"kind": "s3", "url": s3.url, "env": endpoint.env(),
                              "threshold": TEST_THRESHOLD})


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> ObjectStore:
    return backend.store


# --- the contract, on every backend --------------------------------------------


def test_is_an_object_store(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    assert store.url.startswith(("file:///", "s3://"))


def test_round_trip(store: ObjectStore) -> None:
    blobs = {
        "jobs/j-1/artifacts/model.json": b'{"coef": [1.5]}',
        "jobs/j-1/empty": b"",
        "jobs/j-1/binary.bin": bytes(range(256)) * 17,
        "jobs/ünï cødé/a b+c=d.txt": "héllo".encode(),
    }
    for key, data in blobs.items():
        assert not store.exists(key)
        store.put(key, data)
    for key, data in blobs.items():
        assert store.exists(key)
        assert store.get(key) == data


def test_overwrite_replaces_the_whole_object(store: ObjectStore) -> None:
    store.put("k", b"a much longer first version of the object")
    store.put("k", b"short")
    assert store.get("k") == b"short"
    assert list(store.list("")) == ["k"]


def test_concurrent_readers_see_one_whole_version(backend: Backend) -> None:
    """While one thread overwrites a key with alternating versions, every
    read returns one whole version and every listing shows just the key: no
    partial object, no temporary name, is ever visible. The versions are
    above the multipart threshold, so S3 reads are parallel ranged GETs that
    must not stitch two versions together."""
    if backend.name == "s3rver":
        # Seen here: a GET during a PUT returned the first 256 KiB of the new
        # version, or a body cut short. S3 and moto publish objects whole.
        pytest.xfail("s3rver writes objects in place: readers can see a truncated object")
    store = backend.store
    versions = [bytes([n]) * (TEST_THRESHOLD + MiB) for n in (0xAA, 0xBB)]
    store.put("obj", versions[0])
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(8):
                store.put("obj", versions[i % 2])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 3:
            assert store.get("obj") in versions
            assert list(store.list("")) == ["obj"]
            reads += 1
    finally:
        thread.join(30)
    assert not errors, errors
    assert store.get("obj") == versions[1]


# A child process that overwrites one key forever with two 12 MiB versions
# (multipart on S3, a long write on disk), and says when the first is in.
CHILD = textwrap.dedent("""
    import json, sys
    from gpuscout.store import FileStore, S3Store
    spec = json.loads(sys.argv[1])
    if spec["kind"] == "file":
        store = FileStore(spec["url"])
    else:
        store = S3Store(spec["url"], multipart_threshold=spec["threshold"],
                        multipart_chunksize=spec["threshold"])
    versions = [bytes([0x11]) * (12 << 20), bytes([0x22]) * (12 << 20)]
    store.put("victim", versions[0])
    print("ready", flush=True)
    i = 1
    while True:
        store.put("victim", versions[i % 2])
        i += 1
""")


def test_killed_writer_leaves_a_whole_version(backend: Backend) -> None:
    """SIGKILL a process in the middle of its writes: the key still holds
    one whole version, and nothing half-written is listed."""
    if backend.name == "s3rver":
        # Seen here: s3rver was still assembling the killed client's last
        # multipart upload in place when we read, and returned a truncated
        # object. S3 and moto complete an upload atomically.
        pytest.xfail("s3rver writes objects in place: readers can see a truncated object")
    env = {**os.environ, **backend.child_spec.get("env", {})}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(backend.child_spec)],
        stdout=subprocess.PIPE, env=env, start_new_session=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(random.uniform(0.05, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    data = backend.store.get("victim")
    assert len(data) == 12 << 20
    assert data in (bytes([0x11]) * (12 << 20), bytes([0x22]) * (12 << 20))
    assert list(backend.store.list("")) == ["victim"]


def test_list_is_sorted_and_filtered_by_prefix(store: ObjectStore) -> None:
    keys = ["jobs/j1/x", "jobs/j1/y/z", "jobs/j10/x", "jobs/j2/a", "jobs-x", "other/k",
            "jobs/j1/y/a"]
    for key in random.sample(keys, len(keys)):
        store.put(key, key.encode())
    assert list(store.list("")) == sorted(keys)
    # '-' sorts before '/': byte order, as S3 lists.
    assert list(store.list("jobs")) == ["jobs-x", "jobs/j1/x", "jobs/j1/y/a", "jobs/j1/y/z",
                                        "jobs/j10/x", "jobs/j2/a"]
    assert list(store.list("jobs/j1/")) == ["jobs/j1/x", "jobs/j1/y/a", "jobs/j1/y/z"]
    assert list(store.list("jobs/j1")) == ["jobs/j1/x", "jobs/j1/y/a", "jobs/j1/y/z",
                                           "jobs/j10/x"]
    assert list(store.list("jobs/j1/y/z")) == ["jobs/j1/y/z"]
    assert list(store.list("nothing/")) == []
    assert list(store.list("jobs/j3")) == []


def test_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as caught:
        store.get("jobs/j-1/nope")
    assert caught.value.key == "jobs/j-1/nope"
    assert isinstance(caught.value, KeyError)
    assert "jobs/j-1/nope" in str(caught.value)
    assert not store.exists("jobs/j-1/nope")
    # A "folder" is not an object.
    store.put("dir/child", b"x")
    with pytest.raises(ObjectNotFound):
        store.get("dir")
    assert not store.exists("dir")


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.delete("never/was")
    store.put("a/b/c", b"1")
    store.put("a/d", b"2")
    store.delete("a/b/c")
    store.delete("a/b/c")
    with pytest.raises(ObjectNotFound):
        store.get("a/b/c")
    assert list(store.list("")) == ["a/d"]
    store.delete("a")  # not an object: nothing happens
    assert store.get("a/d") == b"2"


def test_multipart_sized_object_round_trips(backend: Backend) -> None:
    data = os.urandom(20 * MiB + 12345)
    backend.store.put("big/weights.bin", data)
    assert hashlib.sha256(backend.store.get("big/weights.bin")).digest() == \
        hashlib.sha256(data).digest()
    if isinstance(backend.store, S3Store) and backend.name.startswith("moto"):
        # A multipart upload's ETag is "<md5 of part md5s>-<part count>" on
        # S3 and moto (s3rver gives the whole object's md5 instead).
        s3 = backend.store
        head = s3.client.head_object(Bucket=s3.bucket, Key=s3._full("big/weights.bin"))
        assert head["ETag"].strip('"').endswith("-5"), head["ETag"]
        assert head["ContentLength"] == len(data)


# --- streaming files, on every backend ------------------------------------------


def write_random(path: Path, size: int) -> FileDigest:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return FileDigest(size, hashlib.sha256(data).hexdigest())


# Empty, small, exactly one part, and several parts with a short last one.
FILE_SIZES = [0, 1, 1000, TEST_THRESHOLD, 3 * TEST_THRESHOLD + 777]


@pytest.mark.parametrize("size", FILE_SIZES)
def test_file_round_trip(backend: Backend, tmp_path: Path, size: int) -> None:
    """put_file and get_file stream a file in and out, and each returns the
    size and sha256 of the bytes it moved."""
    store = backend.store
    source = tmp_path / "in" / "weights.bin"
    want = write_random(source, size)
    assert store.put_file("ckpt/weights.bin", source) == want
    assert list(store.list("")) == ["ckpt/weights.bin"]
    assert store.get("ckpt/weights.bin") == source.read_bytes()  # bytes API agrees

    dest = tmp_path / "out" / "deep" / "w.bin"  # folders are made
    assert store.get_file("ckpt/weights.bin", dest) == want
    assert dest.read_bytes() == source.read_bytes()
    assert os.listdir(dest.parent) == ["w.bin"]  # no temporary file left


def test_get_file_of_a_put_object_and_overwrites(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    data = os.urandom(2 * TEST_THRESHOLD + 5)
    store.put("k", data)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"an older file in the way")
    digest = store.get_file("k", dest)
    assert digest == FileDigest(len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data


def test_get_file_of_a_missing_key_writes_nothing(backend: Backend, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x.bin"
    with pytest.raises(ObjectNotFound) as caught:
        backend.store.get_file("no/such/key", dest)
    assert caught.value.key == "no/such/key"
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_put_file_of_a_missing_file_stores_nothing(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        backend.store.put_file("k", tmp_path / "nope.bin")
    assert list(backend.store.list("")) == []


# moto's server runs in the test process and reads whole objects per GET, so
# the client's memory cannot be told apart from the server's there.
@pytest.mark.parametrize("backend", ["file", "s3rver"], indirect=True)
def test_streaming_memory_is_bounded_by_parts_not_size(backend: Backend,
                                                       tmp_path: Path) -> None:
    """A file of 12 parts moves with about concurrency x part size in
    memory, whatever its size."""
    store = backend.store
    if isinstance(store, S3Store):
        store.transfers.concurrency = 2
    source = tmp_path / "big.bin"
    want = write_random(source, 12 * TEST_THRESHOLD)
    tracemalloc.start()
    try:
        assert store.put_file("big", source) == want
        assert store.get_file("big", tmp_path / "back.bin") == want
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * TEST_THRESHOLD, f"peak {peak / MiB:.1f} MiB"


BAD_KEYS = ["", "/abs/key", "../escape", "a/../../b", "a//b", "a/", ".", "a/./b",
            "a\\b", "nul\x00byte", f"x/{TMP_PREFIX}1234"]


def test_bad_keys_are_rejected(store: ObjectStore) -> None:
    """Every verb refuses them with a ValueError that names the key, and
    nothing is written."""
    for key in BAD_KEYS:
        for verb in ("put", "get", "exists", "delete", "put_file", "get_file"):
            args: tuple[object, ...] = (
                (key, b"x") if verb == "put"
                else (key, __file__) if verb == "put_file"
                else (key, os.devnull + ".never") if verb == "get_file"
                else (key,))
            with pytest.raises(ValueError) as caught:
                getattr(store, verb)(*args)
            assert repr(key) in str(caught.value), (verb, key, caught.value)
    for prefix in ["/abs", "../", "a/../b", "a//"]:
        with pytest.raises(ValueError, match="prefix"):
            store.list(prefix)
    assert list(store.list("")) == []


# --- FileStore specifics -------------------------------------------------------


def test_file_store_ignores_what_a_crashed_put_left(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("jobs/j/k", b"old")
    leftover = tmp_path / "jobs" / "j" / f"{TMP_PREFIX}deadbeef"
    leftover.write_bytes(b"half of the new ver")
    assert store.get("jobs/j/k") == b"old"
    assert list(store.list("")) == ["jobs/j/k"]


def test_file_store_leaves_no_temp_files_or_empty_folders(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    for i in range(3):
        store.put("a/b/c", str(i).encode())
    assert sorted(p.name for p in (tmp_path / "root" / "a" / "b").iterdir()) == ["c"]
    store.delete("a/b/c")
    assert list((tmp_path / "root").iterdir()) == []


def test_file_store_copies_without_copy_file_range(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot copy between the two files (another
    filesystem, an old kernel), put_file and get_file copy through a buffer."""
    def cannot(*_: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cannot)
    store = FileStore(tmp_path / "root")
    want = write_random(tmp_path / "src.bin", 3 * MiB + 5)
    assert store.put_file("a/b", tmp_path / "src.bin") == want
    assert store.get_file("a/b", tmp_path / "out.bin") == want
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "src.bin").read_bytes()


def test_file_store_url_and_path_forms(tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    by_path = FileStore(spaced)
    by_url = FileStore(by_path.url)
    assert by_url.root == by_path.root == spaced.resolve()
    assert by_path.url.startswith("file:///") and "%20" in by_path.url
    by_path.put("k", b"v")
    assert by_url.get("k") == b"v"
    with pytest.raises(ValueError, match="remote host"):
        FileStore("file://elsewhere/x")


def test_file_store_missing_root_is_empty(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "not-yet")
    assert list(store.list("")) == []
    with pytest.raises(ObjectNotFound):
        store.get("k")


# --- S3Store specifics ---------------------------------------------------------


def test_s3_store_creates_no_bucket_by_itself(moto_server: S3Endpoint) -> None:  # noqa: F811
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    store = S3Store(f"s3://{bucket}", endpoint_url=moto_server.url,
                    session=moto_server.session())
    with pytest.raises(ClientError) as caught:
        store.put("k", b"v")
    assert caught.value.response["Error"]["Code"] == "NoSuchBucket"
    with pytest.raises(ClientError):  # a missing bucket is not a missing key
        store.get("k")
    names = [b["Name"] for b in moto_server.client().list_buckets()["Buckets"]]
    assert bucket not in names


def test_s3_store_prefix_keeps_keys_apart(moto_server: S3Endpoint) -> None:  # noqa: F811
    outer = moto_server.new_store()
    inner = S3Store(f"{outer.url}/tenant/a/", endpoint_url=moto_server.url,
                    session=moto_server.session())
    assert inner.url == f"{outer.url}/tenant/a"
    inner.put("k", b"inner")
    outer.put("k", b"outer")
    assert list(outer.list("")) == ["k", "tenant/a/k"]
    assert list(inner.list("")) == ["k"]
    assert inner.get("k") == b"inner"


def test_s3_put_file_sends_parts_with_checksums(moto_server: S3Endpoint,  # noqa: F811
                                                tmp_path: Path) -> None:
    """Above the threshold put_file is a multipart upload whose parts carry
    CRC32 checksums (the server keeps the composite one); below it, one PUT
    carrying the file's sha256, which is what the caller gets back."""
    s3 = moto_server.new_store(multipart_threshold=TEST_THRESHOLD,
                               multipart_chunksize=TEST_THRESHOLD)
    big = write_random(tmp_path / "big", 3 * TEST_THRESHOLD + 1)
    assert s3.put_file("big", tmp_path / "big") == big
    head = s3.client.head_object(Bucket=s3.bucket, Key="big", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-4"), head["ETag"]
    assert head.get("ChecksumCRC32"), head

    small = write_random(tmp_path / "small", 1000)
    assert s3.put_file("small", tmp_path / "small") == small
    head = s3.client.head_object(Bucket=s3.bucket, Key="small", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == small.sha256


def test_s3_store_rejects_an_unknown_checksum_algorithm(
        moto_server: S3Endpoint) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="MD5"):
        moto_server.new_store(checksum_algorithm="MD5")
    assert moto_server.new_store(checksum_algorithm=None).transfers.checksum is None


def _refuse(operation: str, code: str, when: Any) -> Any:
    """A botocore before-call hook: the server refuses ``operation`` with
    ``code`` when ``when(params)`` holds (an S3-compatible server without a
    feature, or a part that fails)."""
    def hook(params: dict[str, Any], **_: Any) -> None:
        if when(params):
            raise ClientError({"Error": {"Code": code, "Message": "refused"}}, operation)
    return hook


def test_s3_store_falls_back_when_checksums_are_refused(
        moto_server: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    s3 = moto_server.new_store(multipart_threshold=TEST_THRESHOLD,
                               multipart_chunksize=TEST_THRESHOLD)
    s3.client.meta.events.register(
        "before-call.s3.CreateMultipartUpload",
        _refuse("CreateMultipartUpload", "NotImplemented",
                lambda p: "ChecksumAlgorithm" in p.get("headers", {}) or
                "x-amz-checksum-algorithm" in p.get("headers", {})))
    want = write_random(tmp_path / "f", 2 * TEST_THRESHOLD + 3)
    assert s3.put_file("f", tmp_path / "f") == want
    assert s3.transfers.checksum is None  # dropped for good
    assert s3.get("f") == (tmp_path / "f").read_bytes()


@pytest.mark.parametrize("size", [MiB + 1, 2 * TEST_THRESHOLD + 3],
                         ids=["in-memory", "streamed"])
def test_s3_one_put_falls_back_when_its_checksum_is_refused(
        moto_server: S3Endpoint, tmp_path: Path, size: int) -> None:  # noqa: F811
    """A one-PUT upload (read whole, or streamed from the file) whose
    checksum header the server refuses is sent again without it, and the
    store stops sending checksums."""
    s3 = moto_server.new_store(multipart_threshold=4 * TEST_THRESHOLD,
                               multipart_chunksize=4 * TEST_THRESHOLD)
    s3.transfers.put_client.meta.events.register(
        "before-call.s3.PutObject",
        _refuse("PutObject", "NotImplemented",
                lambda p: any(k.lower().startswith("x-amz-checksum-")
                              for k in p.get("headers", {}))))
    want = write_random(tmp_path / "f", size)
    assert s3.put_file("f", tmp_path / "f") == want
    assert s3.transfers.checksum is None  # dropped for good
    assert s3.get("f") == (tmp_path / "f").read_bytes()


def test_s3_failed_upload_is_aborted(moto_server: S3Endpoint,  # noqa: F811
                                     tmp_path: Path) -> None:
    """A part that fails fails put_file, and the multipart upload is
    aborted: no object, no upload left for S3 to bill."""
    s3 = moto_server.new_store(multipart_threshold=TEST_THRESHOLD,
                               multipart_chunksize=TEST_THRESHOLD)
    s3.client.meta.events.register(
        "before-call.s3.UploadPart",
        _refuse("UploadPart", "InternalError",
                lambda p: "partNumber=3" in p.get("query_string", "") or
                p.get("query_string", {}).get("partNumber") == 3))
    write_random(tmp_path / "f", 5 * TEST_THRESHOLD)
    with pytest.raises(ClientError, match="InternalError"):
        s3.put_file("f", tmp_path / "f")
    assert list(s3.list("")) == []
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


@pytest.mark.parametrize("server", ["moto_server", "s3rver_server"])
def test_s3_get_file_restarts_when_the_object_is_replaced(
        server: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The object is overwritten between the first GET of a download and
    the ranged GETs of its helpers: the download starts again and writes
    one whole version (moto answers the pinned GET 412; s3rver ignores
    If-Match, and the changed ETag gives it away)."""
    endpoint: S3Endpoint = request.getfixturevalue(server)
    s3 = endpoint.new_store(multipart_threshold=TEST_THRESHOLD,
                            multipart_chunksize=TEST_THRESHOLD)
    s3.transfers.single_stream_s = 0  # helpers at once, whatever the link's speed
    old, new = os.urandom(3 * TEST_THRESHOLD), os.urandom(3 * TEST_THRESHOLD)
    s3.put("k", old)
    writer = endpoint.client()
    calls = []

    def overwrite_once(**_: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            writer.put_object(Bucket=s3.bucket, Key=s3._full("k"), Body=new)

    s3.client.meta.events.register("after-call.s3.GetObject", overwrite_once)
    digest = s3.get_file("k", tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == new
    assert digest.sha256 == hashlib.sha256(new).hexdigest()
    assert len(calls) > 3  # the first attempt was thrown away


@pytest.mark.parametrize("server", ["moto_server", "s3rver_server"])
def test_s3_get_file_streams_once_or_in_pinned_ranges(
        server: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A download is one GET when one stream is fast enough, and the same
    bytes from parallel ranged GETs, each pinned to the first GET's ETag,
    when it is not."""
    endpoint: S3Endpoint = request.getfixturevalue(server)
    s3 = endpoint.new_store(multipart_threshold=TEST_THRESHOLD,
                            multipart_chunksize=TEST_THRESHOLD)
    source = tmp_path / "in.bin"
    want = write_random(source, 4 * TEST_THRESHOLD + 99)
    s3.put_file("k", source)
    gets: list[dict[str, Any]] = []
    s3.client.meta.events.register("before-call.s3.GetObject",
                                   lambda params, **_: gets.append(params))

    s3.transfers.single_stream_s = float("inf")
    assert s3.get_file("k", tmp_path / "one.bin") == want
    assert len(gets) == 1 and "range" not in {h.lower() for h in gets[0]["headers"]}

    gets.clear()
    s3.transfers.single_stream_s = 0
    assert s3.get_file("k", tmp_path / "ranges.bin") == want
    assert (tmp_path / "ranges.bin").read_bytes() == source.read_bytes()
    ranged = [g["headers"] for g in gets[1:]]
    assert ranged and all(h["Range"].startswith("bytes=") for h in ranged)
    etag = s3.client.head_object(Bucket=s3.bucket, Key=s3._full("k"))["ETag"]
    assert {h["If-Match"] for h in ranged} == {etag}
    assert len(gets) == 5  # the whole-object GET, and four ranges for the rest


class _PacedBody:
    """A GET answer's body that delivers at most ``rate`` bytes a second."""

    def __init__(self, data: bytes, rate: float) -> None:
        self.data, self.rate, self.at = data, rate, 0

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), len(self.data) - self.at, 256 * 1024)
        buffer[:count] = self.data[self.at:self.at + count]
        self.at += count
        time.sleep(count / self.rate)
        return count

    def read(self, amount: int = -1) -> bytes:
        end = len(self.data) if amount < 0 else self.at + amount
        chunk, self.at = self.data[self.at:end], min(end, len(self.data))
        return chunk

    def close(self) -> None:
        pass


class _PacedS3:
    """Just get_object, with the whole-object GET paced at ``rate`` bytes a
    second and ranged GETs (``ranges`` records them) at full speed."""

    def __init__(self, data: bytes, rate: float) -> None:
        self.data, self.rate = data, rate
        self.ranges: list[str] = []

    def get_object(self, Bucket: str, Key: str, Range: str | None = None,  # noqa: N803
                   IfMatch: str | None = None) -> dict[str, Any]:  # noqa: N803
        if Range is None:
            return {"ContentLength": len(self.data), "ETag": '"e1"',
                    "Body": _PacedBody(self.data, self.rate)}
        assert IfMatch == '"e1"'
        self.ranges.append(Range)
        start, end = (int(n) for n in Range.removeprefix("bytes=").split("-"))
        return {"ContentLength": end + 1 - start, "ETag": '"e1"',
                "Body": _PacedBody(self.data[start:end + 1], float("inf"))}


@pytest.mark.parametrize(("rate_mib_s", "helped"), [(400, False), (8, True)])
def test_a_slow_stream_gets_helpers_and_a_fast_one_does_not(
        tmp_path: Path, rate_mib_s: float, helped: bool) -> None:
    """The one-stream download asks for parallel ranges only when the
    stream it has would take longer than single_stream_s."""
    from gpuscout.store.transfer import PROBE_S, Transfers

    data = os.urandom(4 * TEST_THRESHOLD)  # 4 parts: 2.5 s at 8 MiB/s, 0.05 s at 400
    client = _PacedS3(data, rate_mib_s * MiB)
    transfers = Transfers(client, "b", threshold=TEST_THRESHOLD, part_size=TEST_THRESHOLD,
                          concurrency=4, checksum=None, single_stream_s=1.0)
    start = time.monotonic()
    digest = transfers.download("k", tmp_path / "out.bin")
    took = time.monotonic() - start
    assert digest == FileDigest(len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "out.bin").read_bytes() == data
    assert bool(client.ranges) == helped
    if helped:  # from the end, after the probe; the stream kept the front
        assert client.ranges[0] == f"bytes={3 * TEST_THRESHOLD}-{4 * TEST_THRESHOLD - 1}"
        assert took < 2.5 - PROBE_S


GiB = 1024 * MiB


@pytest.mark.parametrize(("size", "put_rate", "multipart_rate", "want"), [
    (TEST_THRESHOLD - 1, None, None, "put"),  # under the threshold: one PUT, as ever
    (TEST_THRESHOLD, None, None, "put"),  # one part's worth
    (3 * TEST_THRESHOLD, None, None, "multipart"),  # nothing measured yet
    (3 * TEST_THRESHOLD, 100.0, None, "multipart"),
    (3 * TEST_THRESHOLD, 200.0, 100.0, "put"),  # one PUT has been faster here
    (3 * TEST_THRESHOLD, 100.0, 200.0, "multipart"),  # parallel parts have (S3)
    (8 * TEST_THRESHOLD, 200.0, 100.0, "put"),  # all of it in flight at once
    (8 * TEST_THRESHOLD + 1, 200.0, 100.0, "multipart"),  # more than multipart has in flight
])
def test_choose_upload(size: int, put_rate: float | None, multipart_rate: float | None,
                       want: str) -> None:
    from gpuscout.store.transfer import choose_upload

    how = choose_upload(size, threshold=TEST_THRESHOLD, part_size=TEST_THRESHOLD,
                        concurrency=8, put_rate=put_rate, multipart_rate=multipart_rate)
    assert how.value == want


def test_choose_upload_never_puts_over_five_gib() -> None:
    from gpuscout.store.transfer import Upload, choose_upload

    how = choose_upload(6 * GiB, threshold=64 * MiB, part_size=1 * GiB, concurrency=64,
                        put_rate=1e12, multipart_rate=1.0)
    assert how is Upload.MULTIPART


def _record_uploads(s3: S3Store) -> list[str]:
    """Events of put_file's requests, in order: "put", "create",
    "part N", "part N done", "complete"."""
    events: list[str] = []
    s3.transfers.put_client.meta.events.register(
        "before-call.s3.PutObject", lambda **_: events.append("put"))
    s3.client.meta.events.register(
        "before-call.s3.PutObject", lambda **_: events.append("put"))
    s3.client.meta.events.register(
        "before-call.s3.CreateMultipartUpload", lambda **_: events.append("create"))
    s3.client.meta.events.register(
        "before-call.s3.UploadPart",
        lambda params, **_: events.append(f"part {params['query_string']['partNumber']}"))
    s3.client.meta.events.register(
        "after-call.s3.UploadPart",
        lambda context, **_: events.append("part done"))
    s3.client.meta.events.register(
        "before-call.s3.CompleteMultipartUpload", lambda **_: events.append("complete"))
    return events


@pytest.mark.parametrize("server", ["moto_server", "s3rver_server"])
def test_s3_upload_takes_the_path_that_has_been_faster(
        server: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The first large upload of a store is multipart, its first part sent
    alone (one stream's rate); then each upload takes the path whose
    measured throughput is higher, and both give the same bytes back."""
    endpoint: S3Endpoint = request.getfixturevalue(server)
    s3 = endpoint.new_store(multipart_threshold=TEST_THRESHOLD,
                            multipart_chunksize=TEST_THRESHOLD)
    events = _record_uploads(s3)
    source = tmp_path / "w.bin"
    want = write_random(source, 3 * TEST_THRESHOLD + 5)

    assert s3.put_file("first", source) == want
    assert events[:3] == ["create", "part 1", "part done"]  # alone: the probe
    assert sorted(events[3:-1]) == ["part 2", "part 3", "part 4",
                                    "part done", "part done", "part done"]
    assert events[-1] == "complete"
    rates = s3.transfers.put_rate, s3.transfers.multipart_rate
    assert all(rate.value is not None and rate.value > 0 for rate in rates)

    events.clear()
    rates[0].value, rates[1].value = 2e9, 1e9  # one PUT has been faster
    assert s3.put_file("second", source) == want
    assert events == ["put"]
    assert s3.get("second") == source.read_bytes()
    if server == "moto_server":  # a single PUT's ETag has no part count
        head = s3.client.head_object(Bucket=s3.bucket, Key="second", ChecksumMode="ENABLED")
        assert "-" not in head["ETag"]
        assert head["ChecksumCRC32"] == base64.b64encode(
            zlib.crc32(source.read_bytes()).to_bytes(4, "big")).decode()

    events.clear()
    rates[0].value, rates[1].value = 1e9, 2e9  # parallel parts have
    assert s3.put_file("third", source) == want
    assert events[0] == "create" and events[-1] == "complete"
    assert events.count("part done") == 4
    # No probe (one stream's rate is known): nothing new learnt about one PUT.
    assert rates[0].value == 1e9

    events.clear()
    s3.transfers.concurrency = 2  # 4 parts: more than 2 in flight
    rates[0].value, rates[1].value = 2e9, 1e9
    assert s3.put_file("fourth", source) == want
    assert events[0] == "create" and events.count("part done") == 4


def test_s3_streamed_put_skips_payload_signing_but_sends_a_checksum(
        moto_server: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    """A PUT streamed from a file carries the body's CRC32 in a signed
    header and leaves the payload unsigned (no second pass to hash it)."""
    s3 = moto_server.new_store(multipart_threshold=2 * TEST_THRESHOLD,
                               multipart_chunksize=2 * TEST_THRESHOLD)
    sent: list[dict[str, str]] = []
    s3.transfers.put_client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    want = write_random(tmp_path / "f", 2 * TEST_THRESHOLD)  # over COPY_CHUNK: streamed
    assert s3.put_file("f", tmp_path / "f") == want
    assert len(sent) == 1
    headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in sent[0].items()}
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    crc = zlib.crc32((tmp_path / "f").read_bytes()).to_bytes(4, "big")
    assert headers["x-amz-checksum-crc32"] == base64.b64encode(crc).decode()
    assert "x-amz-checksum-crc32" in headers["authorization"].lower()  # signed


@pytest.mark.parametrize("server", ["moto_server", "s3rver_server"])
def test_s3_file_changed_during_a_put_is_not_vouched_for(
        server: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Bytes that change between the checksum's pass and the send (size
    and mtime kept, so only the checksum can tell) fail the upload, also
    on servers that do not check checksums: the checkpoint's manifest is
    never written, and nothing counts."""
    from gpuscout.store.transfer import SourceChanged
    from gpuscout.workload.checkpoint import CheckpointStore

    endpoint: S3Endpoint = request.getfixturevalue(server)
    s3 = endpoint.new_store(multipart_threshold=2 * TEST_THRESHOLD,
                            multipart_chunksize=2 * TEST_THRESHOLD)
    source = tmp_path / "w.bin"
    write_random(source, 2 * TEST_THRESHOLD)
    stat = source.stat()

    def tamper(**_: Any) -> None:
        with source.open("r+b") as out:
            out.seek(TEST_THRESHOLD)
            out.write(b"\x00" * 16)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    s3.transfers.put_client.meta.events.register("before-call.s3.PutObject", tamper)
    ckpts = CheckpointStore(s3, "ckpts")
    # Neither server checks the header (S3 would refuse the PUT): ours does.
    with pytest.raises(SourceChanged):
        ckpts.save_paths(1, {"w.bin": source})
    assert ckpts.latest() is None


def test_streamed_put_body_hashes_what_it_sends(tmp_path: Path) -> None:
    """Rewound to its start (a retry), the body's sums start again; read
    from a point it has not reached, it refuses."""
    from gpuscout.store.transfer import _HashingBody

    data = os.urandom(3 * MiB)
    (tmp_path / "f").write_bytes(data)
    with (tmp_path / "f").open("rb") as source:
        body = _HashingBody(source, len(data) - 10, "CRC32")
        assert body.read(1000) == data[:1000]
        body.seek(0)
        assert body.sent == 0
        got = b"".join(iter(lambda: body.read(64 * 1024), b""))
        assert got == data[:-10] and body.sent == len(data) - 10
        assert body.digest.hexdigest() == hashlib.sha256(data[:-10]).hexdigest()
        body.seek(5000)
        with pytest.raises(OSError, match="out of order"):
            body.read(10)


def test_s3_streamed_put_memory_is_bounded(s3rver_server: S3Endpoint,  # noqa: F811
                                           tmp_path: Path) -> None:
    """A file sent in one PUT streams: memory stays at a small buffer."""
    s3 = s3rver_server.new_store(multipart_threshold=TEST_THRESHOLD,
                                 multipart_chunksize=TEST_THRESHOLD)
    s3.transfers.put_rate.value, s3.transfers.multipart_rate.value = 2e9, 1e9
    source = tmp_path / "big.bin"
    want = write_random(source, 8 * TEST_THRESHOLD)
    tracemalloc.start()
    try:
        assert s3.put_file("big", source) == want
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "-" not in s3.client.head_object(Bucket=s3.bucket, Key="big")["ETag"]
    assert peak < 3 * TEST_THRESHOLD, f"peak {peak / MiB:.1f} MiB"


# --- open_store ----------------------------------------------------------------


def test_open_store_by_scheme(tmp_path: Path, moto_server: S3Endpoint,  # noqa: F811
                              monkeypatch: pytest.MonkeyPatch) -> None:
    by_url = open_store((tmp_path / "s").as_uri())
    by_path = open_store(str(tmp_path / "s"))
    assert isinstance(by_url, FileStore) and isinstance(by_path, FileStore)
    assert by_url.url == by_path.url

    bucket_store = moto_server.new_store()
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    s3 = open_store(f"{bucket_store.url}/jobs")
    assert isinstance(s3, S3Store)
    assert s3.endpoint_url == moto_server.url  # from AWS_ENDPOINT_URL
    s3.put("x", b"1")
    assert bucket_store.get("jobs/x") == b"1"


@pytest.mark.parametrize("url, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("gs://bucket/x", "unsupported"),
    ("http://example.com/x", "unsupported"),
    ("s3:///no-bucket", "no bucket"),
    ("s3://bucket/../x", "prefix"),
    ("file://host/x", "remote host"),
])
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def _children() -> set[str]:
    path = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return set(path.read_text().split()) if path.exists() else set()


@pytest.fixture(autouse=True)
def _no_stray_children() -> Iterator[None]:
    """A test leaves no process of its own behind (the session's s3rver
    may start during one, and lives until the session ends)."""
    before = _children()
    yield
    for pid in _children() - before:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone
        assert b"s3rver" in cmdline, f"test left child {pid} running: {cmdline!r}"
