"""The job log: a real child process's pipes pumped into a LogShipper, against
the file store and S3 servers on loopback (moto, s3rver); the read side
(read_instance, read_job_log, LogFollower) on the chunks it wrote."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuscout.joblog import (
    MAX_LINE_BYTES,
    LogFollower,
    LogShipper,
    Segment,
    chunk_key,
    format_line,
    format_timestamp,
    logs_prefix,
    parse_line,
    read_instance,
    read_job_log,
)
from gpuscout.store import FileStore, ObjectStore
from tests.s3_servers import S3Endpoint

JOB = "j-1"
CANARY = "sk-canary-0123456789abcdef"
TS = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"


def make_store(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if name == "file":
        return FileStore(tmp_path / "store")
    endpoint: S3Endpoint = request.getfixturevalue(f"{name}_server")
    return endpoint.new_store("base" if name == "moto" else "")


@pytest.fixture(params=["file", "moto", "s3rver"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Every kind of store: for the end-to-end subprocess test."""
    return make_store(request.param, request, tmp_path)


@pytest.fixture(params=["file", "moto"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return make_store(request.param, request, tmp_path)


@pytest.fixture
def fstore(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(main())


def texts(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        parsed = parse_line(line)
        assert parsed is not None, line
        out.append(parsed[1])
    return out


def all_bytes(store: ObjectStore) -> bytes:
    return b"".join(store.get(key) for key in store.list(""))


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def feed(*pieces: bytes) -> asyncio.StreamReader:
    """A StreamReader holding ``pieces`` then EOF (call on a running loop)."""
    reader = asyncio.StreamReader(limit=1024)
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()
    return reader


async def pumped(*pieces: bytes, **kwargs: Any) -> list[str]:
    shipper = LogShipper(FileStore("/nonexistent-never-flushed"), JOB, "i-x",
                         flush_interval_s=60, **kwargs)
    await shipper.pump(feed(*pieces))
    return shipper.tail_lines(100)


# --- format ---------------------------------------------------------------------


def test_format_and_parse_round_trip() -> None:
    at = 1795942461.1239  # 2026-11-29T08:54:21.123Z
    line = format_line(at, "epoch 1 loss 0.5")
    assert line == "2026-11-29T08:54:21.123Z epoch 1 loss 0.5\n"
    parsed = parse_line(line)
    assert parsed is not None
    assert parsed[0] == pytest.approx(1795942461.123) and parsed[1] == "epoch 1 loss 0.5"
    assert parse_line(format_line(at, "")) == (pytest.approx(1795942461.123), "")
    assert format_timestamp(0.9999) == "1970-01-01T00:00:00.999Z"
    assert parse_line("-- moved from i-a to i-b at step 120 --") is None
    assert parse_line("2026-13-29T08:54:21.123Z month 13") is None
    with pytest.raises(ValueError):
        format_line(at, "two\nlines")
    assert chunk_key(JOB, "i-a", 7) == "jobs/j-1/logs/i-a/00000007.log"
    assert logs_prefix(JOB) == "jobs/j-1/logs"
    with pytest.raises(ValueError):
        chunk_key(JOB, "i/a", 0)
    with pytest.raises(ValueError):
        Segment("i-a", "2026-11-29T08:54:21.123Z looks like a line")
    with pytest.raises(ValueError):
        Segment("i-a", "two\nlines")


# --- a real child process ----------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    secret = sys.argv[1]
    for i in range(5):
        print(f"out {i}", flush=True)
        print(f"err {i}", file=sys.stderr, flush=True)
    print(f"token={secret} and {secret[:10]}-partial", flush=True)
    print("waiting", flush=True)
    sys.stdin.readline()  # the test lets it go on once chunks are in the store
    for i in range(5, 10):
        print(f"out {i}", flush=True)
    sys.stdout.write("no newline at the end")
""")


def test_child_output_arrives_in_order_while_it_runs(any_store: ObjectStore,
                                                     tmp_path: Path) -> None:
    local = tmp_path / "local" / "job.log"

    async def main() -> None:
        shipper = LogShipper(any_store, JOB, "i-a", redact=[CANARY, "abc"],
                             flush_interval_s=0.1, local_path=local)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, CANARY, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout and proc.stderr and proc.stdin
        pumps = [asyncio.create_task(shipper.pump(proc.stdout)),
                 asyncio.create_task(shipper.pump(proc.stderr, prefix="E: ", source="stderr"))]
        # Chunks appear while the child still runs (it waits on stdin).
        await eventually(lambda: "waiting" in "".join(read_instance(any_store, JOB, "i-a")[0]))
        assert proc.returncode is None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        proc.stdin.close()
        await asyncio.gather(*pumps)
        assert await proc.wait() == 0
        assert await shipper.close() is True

        lines, last = read_instance(any_store, JOB, "i-a")
        assert last >= 1  # more than one chunk
        got = texts(lines)
        stdout = [t for t in got if not t.startswith("E: ")]
        assert stdout == [f"out {i}" for i in range(5)] + [
            "token=*** and sk-canary--partial", "waiting"] + [
            f"out {i}" for i in range(5, 10)] + ["no newline at the end"]
        assert [t for t in got if t.startswith("E: ")] == [f"E: err {i}" for i in range(5)]
        stamps = [parse_line(line)[0] for line in lines]  # type: ignore[index]
        assert stamps == sorted(stamps)
        assert time.time() - 30 < stamps[0] <= stamps[-1] <= time.time()
        for line in lines:
            assert line[:24].endswith("Z") and line[24] == " "

        assert CANARY.encode() not in all_bytes(any_store)
        assert CANARY not in local.read_text()
        assert local.read_text() == "".join(line + "\n" for line in lines)
        assert shipper.tail_lines(2, source="stderr") == ["E: err 3", "E: err 4"]
        assert shipper.tail_lines(1) == ["no newline at the end"]

    run(main())


def test_a_mebibyte_line_without_newline_is_cut_not_fatal(fstore: FileStore) -> None:
    child = "import sys; sys.stdout.write('x' * (1 << 20)); sys.stdout.flush()"

    async def main() -> None:
        shipper = LogShipper(fstore, JOB, "i-a", flush_interval_s=0.1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", child, stdout=asyncio.subprocess.PIPE, limit=64 * 1024)
        assert proc.stdout
        await shipper.pump(proc.stdout)
        assert await proc.wait() == 0
        assert await shipper.close()

    run(main())
    (line,) = texts(read_instance(fstore, JOB, "i-a")[0])
    assert line == "x" * MAX_LINE_BYTES + f" [... {(1 << 20) - MAX_LINE_BYTES} bytes cut]"


# --- pump: line rules -------------------------------------------------------------


def test_pump_line_rules() -> None:
    assert run(pumped(b"a\nb", b"c\n\nd\r\ne\r", b"\nf")) == ["a", "bc", "", "d", "e", "f"]
    # Progress bars: only the last state of a rewritten line...
    bar = b"\r  0%|", b"\r 50%|#####", b"\r100%|##########\n", b"done\n"
    assert run(pumped(*bar)) == ["  0%|", "100%|##########", "done"]
    # ... or every state, when states may be logged as often as they come.
    assert run(pumped(*bar, progress_interval_s=0)) == [
        "  0%|", " 50%|#####", "100%|##########", "done"]
    # A state left pending at EOF is logged.
    assert run(pumped(b"\r 10%\r 20%\r")) == [" 10%", " 20%"]
    # Invalid UTF-8 is replaced; a multi-byte character split between reads is whole.
    assert run(pumped(b"bad \xff\xfe end\n", "caf\u00e9\n".encode()[:4],
                      "caf\u00e9\n".encode()[4:])) == ["bad \ufffd\ufffd end", "caf\u00e9"]


def test_pump_logs_a_quiet_progress_state() -> None:
    async def main() -> list[str]:
        shipper = LogShipper(FileStore("/nonexistent"), JOB, "i-x", flush_interval_s=60,
                             progress_interval_s=0.05)
        reader = asyncio.StreamReader()
        task = asyncio.create_task(shipper.pump(reader))
        reader.feed_data(b"\r 10%\r 20%\r 30%")  # 10% logged at once; 20% waits
        await asyncio.sleep(0.2)
        quiet = shipper.tail_lines(10)
        reader.feed_data(b"\n")
        reader.feed_eof()
        await task
        return [*quiet, "|", *shipper.tail_lines(10)]

    assert run(main()) == [" 10%", " 20%", "|", " 10%", " 20%", " 30%"]


def test_redaction_survives_cuts_and_pieces() -> None:
    secret = "s3cr3t-VALUE-xyz"  # 16 bytes
    # A secret split between reads; a line of secrets so long that pump stops
    # keeping its bytes part-way through one (past MAX_LINE_BYTES + 16 + 4).
    long = secret.encode() * 1100
    lines = run(pumped(b"pre s3cr3t-VA", b"LUE-xyz post\n", long, b"\n",
                       redact=[secret, "abc", ""]))
    assert lines[0] == "pre *** post"
    assert lines[1] == "***" * 1025 + f" [... {16 * (1100 - 1025)} bytes cut]"
    # add(): short values are not redacted; long lines are cut after redaction.
    shipper = LogShipper(FileStore("/nonexistent"), JOB, "i-x", redact=[secret, "abc"])
    shipper.add(f"abc {secret}" + "w" * (2 * MAX_LINE_BYTES))
    (text,) = shipper.tail_lines(5, source="agent")
    assert text.startswith("abc ***www") and text.endswith(
        f" [... {MAX_LINE_BYTES + 7} bytes cut]")
    with pytest.raises(ValueError):
        shipper.add("x", source="nope")


# --- flushing ---------------------------------------------------------------------


def test_close_flushes_the_rest_and_big_batches_go_at_once(store: ObjectStore,
                                                         tmp_path: Path) -> None:
    async def main() -> None:
        shipper = LogShipper(store, JOB, "i-a", flush_interval_s=60, max_chunk_bytes=1000)
        for i in range(40):
            shipper.add(f"line {i:02d} " + "p" * 40, at=1000.0 + i)
        # Over max_chunk_bytes: written now, not in a minute, in chunks of <= 1000 bytes.
        await eventually(lambda: len(list(store.list(logs_prefix(JOB)))) >= 2)
        shipper.add("last", at=2000.0)
        assert await shipper.close()
        assert shipper.pending_lines == 0 and shipper.shipped_lines == 41

    run(main())
    keys = list(store.list(logs_prefix(JOB) + "/"))
    assert keys == [chunk_key(JOB, "i-a", n) for n in range(len(keys))]
    assert all(len(store.get(key)) <= 1000 for key in keys)
    lines, last = read_instance(store, JOB, "i-a")
    assert last == len(keys) - 1
    assert texts(lines) == [f"line {i:02d} " + "p" * 40 for i in range(40)] + ["last"]
    assert lines[0].startswith("1970-01-01T00:16:40.000Z ")


class FlakyStore:
    """A FileStore whose puts fail while ``down`` is set (optionally after
    writing: a put that succeeded but was reported failed)."""

    def __init__(self, inner: FileStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.down = threading.Event()
        self.write_then_fail = False
        self.failed = 0

    def put(self, key: str, data: bytes) -> None:
        if self.down.is_set():
            self.failed += 1
            if self.write_then_fail:
                self.inner.put(key, data)
            raise ConnectionError("store unreachable")
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_store_failure_then_recovery_keeps_lines(fstore: FileStore) -> None:
    flaky = FlakyStore(fstore)

    async def main() -> None:
        shipper = LogShipper(flaky, JOB, "i-a", flush_interval_s=0.02)  # type: ignore[arg-type]
        shipper.add("before")
        await eventually(lambda: fstore.exists(chunk_key(JOB, "i-a", 0)))
        flaky.down.set()
        flaky.write_then_fail = True  # the first failed put did write its chunk
        for i in range(20):
            shipper.add(f"during {i}")
            await asyncio.sleep(0.005)
        await eventually(lambda: flaky.failed >= 3)
        flaky.write_then_fail = False
        shipper.add("more during")
        await asyncio.sleep(0.05)
        flaky.down.clear()
        shipper.add("after")
        assert await shipper.close()

    run(main())
    lines, _ = read_instance(fstore, JOB, "i-a")
    assert texts(lines) == ["before"] + [f"during {i}" for i in range(20)] + [
        "more during", "after"]


def test_a_long_outage_drops_the_oldest_lines_with_a_note(fstore: FileStore) -> None:
    flaky = FlakyStore(fstore)
    flaky.down.set()
    line_bytes = len(format_line(0, "line 000"))

    async def main() -> int:
        shipper = LogShipper(flaky, JOB, "i-a", flush_interval_s=0.01,  # type: ignore[arg-type]
                             max_chunk_bytes=10 * line_bytes, max_pending_bytes=50 * line_bytes)
        for i in range(200):
            shipper.add(f"line {i:03d}")
            if i % 20 == 0:
                await asyncio.sleep(0.02)
        flaky.down.clear()
        assert await shipper.close(timeout_s=5)
        return shipper.dropped_lines

    dropped = run(main())
    got = texts(read_instance(fstore, JOB, "i-a")[0])
    assert dropped > 0
    kept = [t for t in got if t.startswith("line ")]
    notes = [t for t in got if not t.startswith("line ")]
    assert notes == [f"[gpuscout: {dropped} log lines dropped here: the object store was "
                     "unreachable too long]"]
    assert got.index(notes[0]) <= 10  # where the dropped lines were
    assert len(kept) + dropped == 200 and kept == sorted(kept)
    assert kept[-1] == "line 199"


def test_a_restarted_agent_appends(fstore: FileStore) -> None:
    async def ship(text: str) -> None:
        shipper = LogShipper(fstore, JOB, "i-a", flush_interval_s=60)
        shipper.add(text)
        assert await shipper.close()

    run(ship("first agent"))
    run(ship("second agent"))
    lines, last = read_instance(fstore, JOB, "i-a")
    assert texts(lines) == ["first agent", "second agent"] and last == 1


# --- read side ----------------------------------------------------------------------


def put_chunk(store: ObjectStore, instance: str, seq: int, *words: str) -> None:
    data = "".join(format_line(1000.0 + seq, w) for w in words).encode()
    store.put(chunk_key(JOB, instance, seq), data)


SEGMENTS = [Segment("i-a", "-- placed on i-a (aws:us-east-1a:g4dn.xlarge:spot) --"),
            Segment("i-b", "-- moved from i-a to i-b at step 120 --")]


def test_read_job_log_two_segments_and_tail(store: ObjectStore) -> None:
    put_chunk(store, "i-a", 0, "a0", "a1")
    put_chunk(store, "i-a", 1, "a2")
    put_chunk(store, "i-b", 0, "b0", "b1")
    put_chunk(store, "i-c", 0, "not in a segment")
    full = read_job_log(store, JOB, SEGMENTS)
    assert [parse_line(x)[1] if parse_line(x) else x for x in full] == [  # type: ignore[index]
        SEGMENTS[0].marker, "a0", "a1", "a2", SEGMENTS[1].marker, "b0", "b1"]
    for tail in range(len(full) + 3):
        assert read_job_log(store, JOB, SEGMENTS, tail=tail) == full[len(full) - tail:] * (
            tail > 0)
    assert read_job_log(store, JOB, [Segment("i-a")]) == full[1:4]
    # An instance named twice has its lines once, under its first segment.
    again = [*SEGMENTS, Segment("i-a", "-- back on i-a --")]
    assert read_job_log(store, JOB, again) == [*full, "-- back on i-a --"]
    assert read_job_log(store, JOB, [Segment("i-none", "-- nothing yet --")]) == [
        "-- nothing yet --"]
    with pytest.raises(ValueError):
        read_job_log(store, JOB, SEGMENTS, tail=-1)


class MemStore:
    """Objects in a dict; counts the keys its listings return."""

    url = "mem://"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.listed = 0

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def list(self, prefix: str) -> Iterator[str]:
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        self.listed += len(keys)
        return iter(keys)


def test_read_instance_past_a_cursor_lists_only_what_is_new() -> None:
    mem = MemStore()
    for seq in range(1250):
        put_chunk(mem, "i-a", seq, f"c{seq}")  # type: ignore[arg-type]
    for after in (-1, 0, 97, 98, 99, 100, 198, 199, 1198, 1248, 1249, 1300):
        mem.listed = 0
        lines, last = read_instance(mem, JOB, "i-a", after_seq=after)  # type: ignore[arg-type]
        assert texts(lines) == [f"c{s}" for s in range(after + 1, 1250)]
        assert last == max(after, 1249)
        if after >= 1198:  # a follower's poll: one or two blocks of 100, not 1250 keys
            assert mem.listed <= 200


def test_follower_returns_each_line_once(store: ObjectStore) -> None:
    follower = LogFollower(store, JOB)
    seen: list[str] = []
    assert follower.poll([]) == []
    assert follower.poll(SEGMENTS[:1]) == [SEGMENTS[0].marker]
    put_chunk(store, "i-a", 0, "a0", "a1")
    seen += follower.poll(SEGMENTS[:1])
    assert follower.poll(SEGMENTS[:1]) == []
    put_chunk(store, "i-a", 1, "a2")
    put_chunk(store, "i-b", 0, "b0")
    seen += follower.poll(SEGMENTS)  # a's new chunk, then b's marker and lines
    put_chunk(store, "i-b", 1, "b1")
    put_chunk(store, "i-b", 2, "b2")
    seen += follower.poll(SEGMENTS)
    assert follower.poll(SEGMENTS) == []
    assert [parse_line(x)[1] if parse_line(x) else x for x in seen] == [  # type: ignore[index]
        "a0", "a1", "a2", SEGMENTS[1].marker, "b0", "b1", "b2"]
    assert [SEGMENTS[0].marker, *seen] == read_job_log(store, JOB, SEGMENTS)
    with pytest.raises(ValueError):
        follower.poll(SEGMENTS[1:])

    tailing = LogFollower(store, JOB, tail=2)
    assert texts(tailing.poll(SEGMENTS)) == ["b1", "b2"]
    put_chunk(store, "i-b", 3, "b3")
    assert texts(tailing.poll(SEGMENTS)) == ["b3"]
    third = Segment("i-c", "-- moved from i-b to i-c at step 300 --")
    put_chunk(store, "i-c", 0, "c0")
    assert tailing.poll([*SEGMENTS, third])[0] == third.marker
    assert tailing.poll([*SEGMENTS, third]) == []


def test_shipper_and_follower_together(fstore: FileStore) -> None:
    """The follower, polled while two shippers write (a move), returns the
    log exactly once and in the same order as read_job_log."""

    async def main() -> list[str]:
        follower = LogFollower(fstore, JOB)
        got: list[str] = []
        a = LogShipper(fstore, JOB, "i-a", flush_interval_s=0.01)
        for i in range(30):
            a.add(f"a {i}")
            if i % 5 == 0:
                got += await asyncio.to_thread(follower.poll, SEGMENTS[:1])
            await asyncio.sleep(0.003)
        b = LogShipper(fstore, JOB, "i-b", flush_interval_s=0.01)
        for i in range(30):
            b.add(f"b {i}")
            if i == 3:
                a.add("a late")
                assert await a.close()
            if i % 5 == 0:
                got += await asyncio.to_thread(follower.poll, SEGMENTS)
            await asyncio.sleep(0.003)
        assert await b.close()
        got += follower.poll(SEGMENTS)
        return got

    got = run(main())
    assert sorted(got) == sorted(read_job_log(fstore, JOB, SEGMENTS))
    assert len(set(got)) == len(got) == 2 + 61


class HangingStore(FlakyStore):
    """Puts block until ``release`` is set."""

    def __init__(self, inner: FileStore) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        self.release.wait(10)
        self.inner.put(key, data)


def test_close_gives_up_on_a_hanging_store_and_can_be_retried(fstore: FileStore) -> None:
    hanging = HangingStore(fstore)

    async def main() -> tuple[bool, float, bool]:
        shipper = LogShipper(hanging, JOB, "i-a", flush_interval_s=0.01)  # type: ignore[arg-type]
        shipper.add("one")
        await asyncio.sleep(0.05)  # a put is stuck in its thread now
        started = time.monotonic()
        first = await shipper.close(timeout_s=0.3)
        took = time.monotonic() - started
        hanging.release.set()
        shipper.add("two")
        return first, took, await shipper.close(timeout_s=5)

    first, took, second = run(main())
    assert first is False and took < 2.0
    assert second is True
    assert texts(read_instance(fstore, JOB, "i-a")[0]) == ["one", "two"]
