"""Checkpoint throughput of each object store, against a plain boto3 call.

For each store, side by side in one run, on the same bytes (one file of
``--size-mib`` MiB):

- FileStore on a temporary folder;
- S3Store on moto's server (``python -m moto.server``, its own process);
- S3Store on s3rver (the npm package; ``make test-deps`` installs it);

it measures a checkpoint write (``CheckpointStore.save_paths``: the file
streams from disk, is hashed, and the manifest is written last) and a
checkpoint read (``CheckpointStore.load_to_dir``: the newest checkpoint
streams to disk and every byte is checked against the manifest), in MiB/s
of the file's size. The baseline on each S3 server is one plain boto3
``put_object`` / ``get_object`` of the same bytes held in memory, nothing
else (no hashing, no file); for FileStore it is one plain write (with
fsync, as the store does) and read of the same bytes. ratio = checkpoint
throughput / baseline throughput (the target is >= 1.0). S3Store picks one
PUT or a multipart upload by what each has shown on the store, starting
with multipart (see gpuscout.store.transfer): the path each write took, and
its ratio, are printed per round. Each figure is the
median of ``--rounds`` rounds; the checkpoint and the baseline alternate
within a round. Everything runs on loopback with a warm page cache.

    .venv/bin/python bench/store.py [--size-mib 256] [--rounds 3] [--json]
                                    [--part-mib N] [--concurrency N]

``--part-mib`` / ``--concurrency`` set S3Store's multipart_chunksize (and
threshold) and max_concurrency; by default the store's own defaults.

With ``--json`` the last line of the output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]

from gpuscout.store import FileStore, ObjectStore, S3Store
from gpuscout.workload.checkpoint import CheckpointStore

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]
S3RVER_BIN = REPO_ROOT / "node_modules" / ".bin" / "s3rver"


# --- servers (the few lines of tests/s3_servers.py this needs) -----------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(argv: list[str], port: int) -> Iterator[str]:
    """Run a server process until the block ends; yields its URL."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{argv[0]} exited: {log.read()[-2000:].decode()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not listen on {port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, str]]:
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with server(argv, port) as url:
        yield url, "testing"


@contextlib.contextmanager
def s3rver_server() -> Iterator[tuple[str, str]]:
    if not S3RVER_BIN.exists():
        sys.exit(f"s3rver is not installed at {S3RVER_BIN}: run `make test-deps`")
    root = Path(tempfile.mkdtemp(prefix="gpuscout-bench-s3rver-"))
    port = free_port()
    argv = [str(S3RVER_BIN), "--directory", str(root), "--port", str(port),
            "--address", "127.0.0.1", "--silent"]
    try:
        with server(argv, port) as url:
            yield url, "S3RVER"  # s3rver's fixed credentials
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- measuring -----------------------------------------------------------------


def write_pattern(path: Path, size: int) -> bytes:
    """``size`` bytes that do not repeat block to block; returns them."""
    block = bytearray(os.urandom(8 * MiB))
    with path.open("wb") as out:
        for index, offset in enumerate(range(0, size, len(block))):
            block[:8] = index.to_bytes(8, "big")
            out.write(memoryview(block)[: min(len(block), size - offset)])
    return path.read_bytes()


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_store(name: str, store: ObjectStore, source: Path, data: bytes, work: Path,
                rounds: int, baseline_put: Callable[[], object],
                baseline_get: Callable[[], bytes]) -> dict[str, Any]:
    ckpts = CheckpointStore(store, f"bench/{uuid.uuid4().hex[:8]}/checkpoints")
    want = hashlib.sha256(data).hexdigest()
    times: dict[str, list[float]] = {"write": [], "read": [], "put": [], "get": []}
    multipart: list[int] = []  # S3: multipart uploads started, per write
    if isinstance(store, S3Store):
        store.client.meta.events.register("before-call.s3.CreateMultipartUpload",
                                          lambda **_: multipart.append(1))
    paths = []
    for step in range(rounds):
        times["put"].append(timed(baseline_put))
        multipart.clear()
        times["write"].append(timed(partial(ckpts.save_paths, step, {"w.bin": source})))
        paths.append("multipart" if multipart else "put")
        start = time.perf_counter()
        got = baseline_get()
        times["get"].append(time.perf_counter() - start)
        assert got == data, f"{name}: baseline read back other bytes"
        del got
        dest = work / f"restored-{name}-{step}"
        times["read"].append(timed(partial(ckpts.load_to_dir, dest)))
        assert ckpts.latest() is not None
        with (dest / "w.bin").open("rb") as restored:
            assert hashlib.file_digest(restored, "sha256").hexdigest() == want
        shutil.rmtree(dest)
        ckpts.prune(keep=1)
    size_mib = len(data) / MiB
    rate = {k: size_mib / statistics.median(v) for k, v in times.items()}
    return {
        "store": name,
        "write_mib_s": round(rate["write"], 1),
        "read_mib_s": round(rate["read"], 1),
        "baseline_put_mib_s": round(rate["put"], 1),
        "baseline_get_mib_s": round(rate["get"], 1),
        "write_ratio": round(rate["write"] / rate["put"], 2),
        "read_ratio": round(rate["read"] / rate["get"], 2),
        "write_ratio_per_round": [round(p / w, 2) for p, w in zip(times["put"], times["write"],
                                                                  strict=True)],
        "upload_paths": paths if isinstance(store, S3Store) else None,
    }


def file_baseline(work: Path, data: bytes) -> tuple[Callable[[], object], Callable[[], bytes]]:
    target = work / "plain.bin"

    def put() -> None:
        with target.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())

    return put, target.read_bytes


def s3_baseline(store: S3Store, data: bytes) -> tuple[Callable[[], object], Callable[[], bytes]]:
    key = store._full("plain/object.bin")

    def put() -> None:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data)

    def get() -> bytes:
        body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
        try:
            got: bytes = body.read()
        finally:
            body.close()
        return got

    return put, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--part-mib", type=int, default=None,
                        help="S3 part size and multipart threshold (default: the store's)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="S3 parts in flight (default: the store's)")
    args = parser.parse_args(argv)
    size = args.size_mib * MiB
    results = []
    with tempfile.TemporaryDirectory(prefix="gpuscout-bench-store-") as tmp:
        work = Path(tmp)
        source = work / "checkpoint.bin"
        data = write_pattern(source, size)

        store = FileStore(work / "filestore")
        results.append(bench_store("FileStore", store, source, data, work, args.rounds,
                                   *file_baseline(work, data)))
        for name, start in (("S3Store/moto", moto_server), ("S3Store/s3rver", s3rver_server)):
            with start() as (url, secret):
                session = boto3.session.Session(aws_access_key_id=secret,
                                                 aws_secret_access_key=secret,
                                                 region_name="us-east-1")
                tuning: dict[str, Any] = {}
                if args.part_mib:
                    tuning["multipart_chunksize"] = tuning["multipart_threshold"] = (
                        args.part_mib * MiB)
                if args.concurrency:
                    tuning["max_concurrency"] = args.concurrency
                s3 = S3Store(f"s3://bench-{uuid.uuid4().hex[:12]}", endpoint_url=url,
                             session=session, create_bucket=True, **tuning)
                results.append(bench_store(name, s3, source, data, work, args.rounds,
                                           *s3_baseline(s3, data)))

    settings = {
        "size_mib": args.size_mib, "rounds": args.rounds,
        "multipart_threshold_mib": s3.multipart_threshold // MiB,
        "part_mib": s3.transfers.part_size // MiB,
        "max_concurrency": s3.transfers.concurrency,
        "checksum": s3.transfers.checksum, "cpus": os.cpu_count(),
    }
    print(f"checkpoint of {args.size_mib} MiB, median of {args.rounds} rounds; "
          f"S3 parts of {settings['part_mib']} MiB, {settings['max_concurrency']} at a time, "
          f"{settings['checksum']} part checksums; {settings['cpus']} CPUs")
    header = (f"{'store':<16}{'write MiB/s':>12}{'put_object':>12}{'ratio':>7}"
              f"{'read MiB/s':>12}{'get_object':>12}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['store']:<16}{row['write_mib_s']:>12}{row['baseline_put_mib_s']:>12}"
              f"{row['write_ratio']:>7}{row['read_mib_s']:>12}{row['baseline_get_mib_s']:>12}"
              f"{row['read_ratio']:>7}")
    print("(FileStore's baseline: one plain write with fsync / one plain read of the bytes)")
    for row in results:
        if row["upload_paths"]:
            rounds = ", ".join(f"{path} {ratio}" for path, ratio in
                               zip(row["upload_paths"], row["write_ratio_per_round"], strict=True))
            print(f"{row['store']} writes by round (upload path, ratio): {rounds}")
    if args.json:
        print(json.dumps({"settings": settings, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
