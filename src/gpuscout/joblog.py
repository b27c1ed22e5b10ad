"""The job log: what a job's setup and command print, kept in the object store.

Every instance's agent captures the stdout and stderr of the job's processes
line by line, stamps each line with the time it arrived, and ships the lines
to the object store in chunks while the job runs (``LogShipper``), so the log
outlives the instance. The control plane reads the chunks back as one
continuous log across the instances a job ran on (``read_job_log``), or
streams it (``LogFollower``).

Format (declared here once: ``chunk_key``, ``format_line``, ``parse_line``)::

    jobs/<job id>/logs/<instance id>/<seq:08d>.log

One object per chunk; ``seq`` counts 0, 1, 2, ... per instance with no gaps
(a chunk is written only after the one before it is in the store). A chunk is
UTF-8 text of whole lines, each ``"<UTC time> <text>\\n"`` with the time in
ISO 8601 with milliseconds and a Z::

    2026-11-29T08:54:21.123Z epoch 1 loss 0.5

Lines in the store never hold secrets: the shipper replaces each value it is
told to redact by ``***`` before a line is kept anywhere.

Segment markers (``"-- moved from i-a to i-b at step 120 --"``) are never
stored: the control plane builds them from what it knows about the job's
placements and ``read_job_log`` puts them between the instances' lines,
without a timestamp, so ``parse_line(marker)`` is None and a reader can tell
them from the job's own lines.

Times are Unix seconds (float), as everywhere in the agent protocol.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gpuscout.agent.protocol import logs_prefix
from gpuscout.store.base import ObjectNotFound, ObjectStore
from gpuscout.store.fs import check_key

log = logging.getLogger(__name__)

# A line longer than this (UTF-8 bytes of its text, after redaction) is cut.
MAX_LINE_BYTES = 16 * 1024
# Values shorter than this are not redacted: they would match everywhere.
MIN_REDACT_CHARS = 4
REDACTED = "***"
# Where the ring buffers of ``LogShipper.tail_lines`` come from.
SOURCES = ("stdout", "stderr", "agent")
# How much ``pump`` reads from a pipe at a time.
READ_BYTES = 64 * 1024
# Chunks the follower lists at a time past its cursor (the first 6 of the 8 digits).
_BLOCK = 100

_LINE_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})\.(\d{3})Z (.*)", re.DOTALL)
_CHUNK_RE = re.compile(r"(\d{8,})\.log")


# --- the format ----------------------------------------------------------------


def instance_prefix(job_id: str, instance_id: str) -> str:
    """The folder of one instance's chunks, with a trailing '/'."""
    return f"{logs_prefix(job_id)}/{instance_id}/"


def chunk_key(job_id: str, instance_id: str, seq: int) -> str:
    """The key of chunk ``seq`` (>= 0) of an instance.

    Raises ValueError for a negative seq, an id holding '/', or a key that is
    not a valid object key.
    """
    if seq < 0:
        raise ValueError(f"chunk seq must be >= 0, not {seq}")
    for name, value in (("job id", job_id), ("instance id", instance_id)):
        if not value or "/" in value:
            raise ValueError(f"{name} must be non-empty and hold no '/': {value!r}")
    return check_key(f"{instance_prefix(job_id, instance_id)}{seq:08d}.log")


def format_timestamp(at: float) -> str:
    """Unix seconds as ``2026-11-29T08:54:21.123Z`` (UTC, milliseconds rounded down)."""
    millis = math.floor(at * 1000)
    secs, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def format_line(at: float, text: str) -> str:
    """One stored line: ``"<timestamp> <text>\\n"``; ``at`` in Unix seconds.

    Raises ValueError if ``text`` holds a newline (one call, one line).
    """
    if "\n" in text:
        raise ValueError("a log line's text must not hold a newline")
    return f"{format_timestamp(at)} {text}\n"


def parse_line(line: str) -> tuple[float, str] | None:
    """``(at, text)`` of a stored line (a trailing newline is ignored), ``at``
    in Unix seconds; None for a line without a timestamp (a segment marker)."""
    if line.endswith("\n"):
        line = line[:-1]
    match = _LINE_RE.fullmatch(line)
    if match is None:
        return None
    try:
        parsed = time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return calendar.timegm(parsed) + int(match.group(2)) / 1000, match.group(3)


def _chunk_seq(name: str) -> int | None:
    match = _CHUNK_RE.fullmatch(name)
    return int(match.group(1)) if match else None


# --- agent side: capture and ship ------------------------------------------------


class _Redactor:
    def __init__(self, values: Iterable[str]) -> None:
        secrets = sorted({v for v in values if len(v) >= MIN_REDACT_CHARS}, key=len,
                         reverse=True)
        self.secrets = secrets
        # Longest first: at each position the longest secret that matches wins.
        self._re = re.compile("|".join(map(re.escape, secrets))) if secrets else None
        self.max_bytes = max((len(s.encode()) for s in secrets), default=0)

    def __call__(self, text: str) -> str:
        return self._re.sub(REDACTED, text) if self._re is not None else text

    def strip_partial_tail(self, text: str) -> str:
        """Drop an end of ``text`` that is the start of a secret: what is left of
        a secret that a cut went through."""
        changed = True
        while changed:
            changed = False
            for secret in self.secrets:
                for k in range(min(len(secret) - 1, len(text)), 0, -1):
                    if text.endswith(secret[:k]):
                        text, changed = text[:-k], True
                        break
        return text


class _LineSplitter:
    """Bytes of one pipe in, lines out (see ``LogShipper.pump`` for the rules)."""

    def __init__(self, keep_bytes: int, progress_interval_s: float) -> None:
        self.keep_bytes = keep_bytes
        self.progress_interval_s = progress_interval_s
        self.buf = bytearray()
        self.cut = 0  # bytes of the current state dropped past keep_bytes
        self.state: tuple[bytes, int] | None = None  # latest state ended by '\r'
        self.state_logged = False
        self.last_progress = -math.inf  # monotonic time a state was last logged

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """Lines completed by ``data``, each ``(bytes kept, bytes cut)``."""
        out: list[tuple[bytes, int]] = []
        pos, size = 0, len(data)
        while pos < size:
            nl = data.find(b"\n", pos)
            cr = data.find(b"\r", pos, nl if nl >= 0 else size)
            end = cr if cr >= 0 else nl
            self._append(data, pos, end if end >= 0 else size)
            if end < 0:
                break
            if end == cr:
                self._carriage_return(out)
            else:
                self._end_line(out, newline=True)
            pos = end + 1
        return out

    def idle(self) -> list[tuple[bytes, int]]:
        """The pipe was quiet a while: log a rewritten line's latest state."""
        if self.state is not None and not self.state_logged:
            self.state_logged = True
            self.last_progress = time.monotonic()
            return [self.state]
        return []

    def eof(self) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        self._end_line(out, newline=False)
        return out

    def _append(self, data: bytes, start: int, stop: int) -> None:
        room = self.keep_bytes - len(self.buf)
        take = min(stop - start, max(room, 0))
        self.buf += data[start:start + take]
        self.cut += stop - start - take

    def _carriage_return(self, out: list[tuple[bytes, int]]) -> None:
        if not self.buf and not self.cut:
            return  # '\r\r', or '\r' at the start of a line: nothing was drawn
        self.state = (bytes(self.buf), self.cut)
        self.state_logged = False
        self.buf.clear()
        self.cut = 0
        now = time.monotonic()
        if now - self.last_progress >= self.progress_interval_s:
            self.state_logged = True
            self.last_progress = now
            out.append(self.state)

    def _end_line(self, out: list[tuple[bytes, int]], *, newline: bool) -> None:
        if self.buf or self.cut:
            out.append((bytes(self.buf), self.cut))
        elif self.state is not None:
            if not self.state_logged:
                out.append(self.state)
        elif newline:
            out.append((b"", 0))  # an empty line
        self.buf.clear()
        self.cut = 0
        self.state = None
        self.state_logged = False
        self.last_progress = -math.inf


class LogShipper:
    """Collects a job's output lines on an instance and ships them to the store.

    Lines come in through ``add`` (one line) and ``pump`` (a child's pipe);
    each is redacted, cut if very long, stamped, appended to ``local_path``
    (if given) and queued. A background task on the running event loop
    writes the queued lines as the instance's next chunk every
    ``flush_interval_s`` seconds, and at once when more than
    ``max_chunk_bytes`` bytes are queued; a chunk holds at most
    ``max_chunk_bytes`` bytes (unless one line alone is longer). Store calls
    block, so they run in a worker thread; one chunk is written at a time.

    A failed write is retried, with the same key and the same bytes, at the
    next flush; nothing is lost while the store is down unless more than
    ``max_pending_bytes`` bytes queue up: then the oldest queued lines are
    dropped and the next chunk starts with a line saying how many.

    On its first flush the shipper lists the instance's chunks and continues
    after the last one, so an agent restarted on the same instance appends to
    the log instead of overwriting it.

    Use it on one event loop's thread. Await the pumps (they return at EOF)
    before ``close()``, which writes what is left.

    Raises ValueError (from the constructor) for a job or instance id that
    cannot name a chunk, or for a non-positive interval or size.
    """

    def __init__(
        self,
        store: ObjectStore,
        job_id: str,
        instance_id: str,
        *,
        redact: Iterable[str] = (),
        flush_interval_s: float = 2.0,
        max_chunk_bytes: int = 256 * 1024,
        max_pending_bytes: int = 16 * 1024 * 1024,
        local_path: Path | None = None,
        tail_size: int = 200,
        progress_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``redact``: values to replace by ``***`` (those under 4 characters
        are ignored). ``local_path``: a file every line is also appended to
        (its folder is created). ``tail_size``: lines kept per source for
        ``tail_lines``. ``progress_interval_s``: see ``pump``. ``clock``:
        Unix seconds for lines added without ``at``."""
        chunk_key(job_id, instance_id, 0)  # raises for ids that cannot name a chunk
        if flush_interval_s <= 0 or max_chunk_bytes <= 0 or tail_size <= 0:
            raise ValueError("flush_interval_s, max_chunk_bytes and tail_size must be > 0")
        if max_pending_bytes < max_chunk_bytes:
            raise ValueError("max_pending_bytes must be >= max_chunk_bytes")
        self.store = store
        self.job_id = job_id
        self.instance_id = instance_id
        self.flush_interval_s = flush_interval_s
        self.max_chunk_bytes = max_chunk_bytes
        self.max_pending_bytes = max_pending_bytes
        self.progress_interval_s = progress_interval_s
        self.local_path = local_path
        self._clock = clock
        self._redact = _Redactor(redact)
        self._rings: dict[str | None, collections.deque[str]] = {
            source: collections.deque(maxlen=tail_size) for source in (None, *SOURCES)
        }
        self._counts: dict[str, int] = dict.fromkeys(SOURCES, 0)
        self._pending: collections.deque[str] = collections.deque()
        self._pending_bytes = 0
        self._dropped = 0  # lines dropped since the last chunk was formed
        self._dropped_at = 0.0
        self._dropped_total = 0
        self._inflight: tuple[int, bytes] | None = None  # (seq, data) being written
        self._next_seq: int | None = None  # found by listing on the first flush
        self._shipped_lines = 0
        self._failing = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._local: IO[str] | None = None
        self._local_failed = False

    # -- input --------------------------------------------------------------

    def add(self, text: str, at: float | None = None, *, source: str = "agent") -> None:
        """Log ``text`` as one line (several if it holds newlines) from
        ``source`` (one of SOURCES), at ``at`` Unix seconds (default: now).

        The text is redacted first, then cut to MAX_LINE_BYTES bytes of UTF-8
        with ``" [... N bytes cut]"`` appended. Never blocks and never raises
        for a store problem; raises ValueError for an unknown source.
        """
        self._add(text, at, source, 0)

    def _add(self, text: str, at: float | None, source: str, cut: int) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown log source {source!r}: one of {SOURCES}")
        when = self._clock() if at is None else at
        for part in text.split("\n"):
            part = self._clean(part, cut)
            self._rings[None].append(part)
            self._rings[source].append(part)
            self._counts[source] += 1
            self._queue(format_line(when, part))
        self._start()

    def redact(self, values: Iterable[str]) -> None:
        """Also replace these values by ``***`` in every line added from now
        on (the job's secrets, known only once the control plane sends them)."""
        self._redact = _Redactor([*self._redact.secrets, *values])

    def lines_added(self, source: str) -> int:
        """How many lines ``source`` has added so far (to take the tail of
        one process's output: ``tail_lines`` of the lines added since)."""
        return self._counts[source]

    def _clean(self, text: str, cut: int) -> str:
        text = self._redact(text)
        data = text.encode("utf-8", "replace")
        if len(data) > MAX_LINE_BYTES:
            kept = data[:MAX_LINE_BYTES].decode("utf-8", "ignore")
            cut += len(data) - len(kept.encode())
            text = kept
        if cut:
            stripped = self._redact.strip_partial_tail(text)
            cut += len(text.encode()) - len(stripped.encode())
            text = f"{stripped} [... {cut} bytes cut]"
        return text

    async def pump(
        self, stream: asyncio.StreamReader, *, prefix: str = "", source: str = "stdout"
    ) -> None:
        """Read ``stream`` (a child's pipe) until EOF, logging each line as
        ``prefix + line`` from ``source``.

        Bytes are read in pieces, so a line of any length (longer than the
        reader's limit, or never ended) is fine: what is past MAX_LINE_BYTES
        is dropped as it arrives and the line is logged cut. Text is decoded
        as UTF-8 with errors replaced; "\\r\\n" counts as "\\n".

        Carriage returns (progress bars): a "\\r" that does not end a line
        rewrites it, as on a terminal, so only the line's last state is
        logged when its "\\n" (or EOF) comes. While a line keeps being
        rewritten, its latest complete state is also logged at most once
        every ``progress_interval_s`` seconds, and when the pipe has been
        quiet that long, so a long progress bar shows up now and then
        instead of as thousands of lines or not at all. A state counts as
        complete once the "\\r" after it arrived.
        """
        self._start()
        keep = MAX_LINE_BYTES + self._redact.max_bytes + 4
        splitter = _LineSplitter(keep, self.progress_interval_s)
        timeout = self.progress_interval_s if self.progress_interval_s > 0 else None
        while True:
            try:
                data = await asyncio.wait_for(stream.read(READ_BYTES), timeout)
            except TimeoutError:
                self._emit(splitter.idle(), prefix, source)
                continue
            if not data:
                break
            self._emit(splitter.feed(data), prefix, source)
        self._emit(splitter.eof(), prefix, source)

    def _emit(self, lines: list[tuple[bytes, int]], prefix: str, source: str) -> None:
        for raw, cut in lines:
            self._add(prefix + raw.decode("utf-8", "replace"), None, source, cut)

    def _queue(self, line: str) -> None:
        self._write_local(line)
        self._pending.append(line)
        self._pending_bytes += len(line.encode())
        while self._pending_bytes > self.max_pending_bytes and len(self._pending) > 1:
            old = self._pending.popleft()
            self._pending_bytes -= len(old.encode())
            if not self._dropped:
                self._dropped_at = parsed[0] if (parsed := parse_line(old)) else self._clock()
            self._dropped += 1
            self._dropped_total += 1
        if self._pending_bytes > self.max_chunk_bytes and not self._failing:
            self._wake.set()

    def _write_local(self, line: str) -> None:
        if self.local_path is None or self._local_failed:
            return
        try:
            if self._local is None:
                self.local_path.parent.mkdir(parents=True, exist_ok=True)
                self._local = self.local_path.open("a", encoding="utf-8")
            self._local.write(line)
        except OSError as exc:
            self._local_failed = True
            log.warning("job log: cannot write the local copy %s: %s", self.local_path, exc)

    # -- output -------------------------------------------------------------

    def tail_lines(self, n: int, source: str | None = None) -> list[str]:
        """The last ``n`` texts added (redacted and cut, without timestamps),
        oldest first; from every source, or from ``source`` only. At most
        ``tail_size`` per source are kept. Raises ValueError for an unknown
        source."""
        if source is not None and source not in SOURCES:
            raise ValueError(f"unknown log source {source!r}: one of {SOURCES}")
        ring = self._rings[source]
        return list(ring)[-n:] if n > 0 else []

    @property
    def pending_lines(self) -> int:
        """Lines added but not yet in the store (not counting a chunk in flight)."""
        return len(self._pending)

    @property
    def dropped_lines(self) -> int:
        """Lines dropped in all, because the store was down too long."""
        return self._dropped_total

    @property
    def shipped_lines(self) -> int:
        """Lines written to the store so far (drop notices included)."""
        return self._shipped_lines

    # -- flushing ----------------------------------------------------------

    def _start(self) -> None:
        if self._task is not None or self._closing:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: lines wait for the first add on it, or close()
        self._task = asyncio.create_task(self._run(), name=f"joblog-{self.instance_id}")

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            if self._closing:
                break
            await self.flush()

    async def flush(self) -> bool:
        """Write everything queued now, chunk by chunk; True if all of it is
        in the store, False if a write failed (it is retried later). Never
        raises for a store error."""
        async with self._lock:
            try:
                if self._next_seq is None:
                    self._next_seq = await asyncio.to_thread(self._find_next_seq)
                while True:
                    if self._inflight is None:
                        if not self._pending and not self._dropped:
                            break
                        self._inflight = self._form_chunk(self._next_seq)
                    seq, data = self._inflight
                    key = chunk_key(self.job_id, self.instance_id, seq)
                    await asyncio.to_thread(self.store.put, key, data)
                    self._shipped_lines += data.count(b"\n")
                    self._inflight = None
                    self._next_seq = seq + 1
            except Exception as exc:
                if not self._failing:
                    log.warning("job log: cannot write to the store (will retry): %s", exc)
                self._failing = True
                return False
            finally:
                if self._local is not None:
                    with contextlib.suppress(OSError):
                        self._local.flush()
            if self._failing:
                log.info("job log: the store takes chunks again")
            self._failing = False
            return True

    def _find_next_seq(self) -> int:
        prefix = instance_prefix(self.job_id, self.instance_id)
        seqs = [_chunk_seq(key[len(prefix):]) for key in self.store.list(prefix)]
        return max((s for s in seqs if s is not None), default=-1) + 1

    def _form_chunk(self, seq: int) -> tuple[int, bytes]:
        parts: list[bytes] = []
        size = 0
        if self._dropped:
            note = (f"[gpuscout: {self._dropped} log lines dropped here: the object store "
                    "was unreachable too long]")
            parts.append(format_line(self._dropped_at, note).encode())
            size += len(parts[0])
            self._dropped = 0
        while self._pending:
            data = self._pending[0].encode()
            if parts and size + len(data) > self.max_chunk_bytes:
                break
            self._pending.popleft()
            self._pending_bytes -= len(data)
            parts.append(data)
            size += len(data)
        return seq, b"".join(parts)

    async def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the background task and write what is left, retrying every
        ``flush_interval_s`` for up to ``timeout_s`` seconds. Returns True if
        every line reached the store (False: they stay queued, and a later
        ``close()`` tries again). Closes the local copy. Never raises for a
        store error."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while True:
            # A store that hangs (rather than fails) must not hold close() up.
            remaining = max(deadline - time.monotonic(), 0.5)
            try:
                ok = await asyncio.wait_for(self.flush(), remaining)
            except TimeoutError:
                ok = False
            remaining = deadline - time.monotonic()
            if ok or remaining <= 0:
                break
            await asyncio.sleep(min(self.flush_interval_s, remaining))
        if self._local is not None:
            with contextlib.suppress(OSError):
                self._local.close()
            self._local = None
        return ok


# --- control-plane side: read back ------------------------------------------------


def _instance_seqs(store: ObjectStore, job_id: str, instance_id: str, after_seq: int) -> list[int]:
    """Sorted seqs of an instance's chunks above ``after_seq``. Past a cursor,
    only the blocks of 100 seqs from the cursor on are listed (seqs have no
    gaps), so following a long log does not list all of it every time."""
    prefix = instance_prefix(job_id, instance_id)
    chunk_key(job_id, instance_id, 0)  # raises for ids that cannot name a chunk

    def listed(sub: str) -> list[int]:
        seqs = (_chunk_seq(key[len(prefix):]) for key in store.list(prefix + sub))
        return sorted(s for s in seqs if s is not None and s > after_seq)

    if after_seq < 0 or after_seq + 1 >= 10**8 - _BLOCK:
        return listed("")
    found: list[int] = []
    block = (after_seq + 1) // _BLOCK
    while block * _BLOCK < 10**8 - _BLOCK:
        seqs = listed(f"{block * _BLOCK:08d}"[:6])
        found.extend(seqs)
        if not seqs or seqs[-1] % _BLOCK != _BLOCK - 1:
            return found
        block += 1
    return listed("")


def _read_chunk(store: ObjectStore, job_id: str, instance_id: str, seq: int) -> list[str]:
    try:
        data = store.get(chunk_key(job_id, instance_id, seq))
    except ObjectNotFound:
        return []  # deleted since it was listed
    lines = data.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_instance(
    store: ObjectStore, job_id: str, instance_id: str, *, after_seq: int = -1
) -> tuple[list[str], int]:
    """The lines of one instance's chunks with seq > ``after_seq``, in order
    (stored form: timestamp, space, text; no newline), and the seq to pass
    as ``after_seq`` next time: the last seq read, or ``after_seq`` when
    there was no new chunk (-1 for an instance with no chunks).

    Raises ValueError for ids that cannot name a chunk; store errors
    (network, permissions) propagate.
    """
    lines: list[str] = []
    last = after_seq
    for seq in _instance_seqs(store, job_id, instance_id, after_seq):
        lines.extend(_read_chunk(store, job_id, instance_id, seq))
        last = seq
    return lines, last


@dataclass(frozen=True)
class Segment:
    """A stretch of a job's life on one instance: its chunks, shown after
    ``marker`` (a line such as ``"-- placed on i-abc (aws:us-east-1a:g4dn.xlarge:spot) --"``
    or ``"-- moved from i-a to i-b at step 120 --"``), or after nothing.

    Raises ValueError for an empty instance id or one holding '/', or for a
    marker that holds a newline or starts like a timestamped line.
    """

    instance_id: str
    marker: str | None = None

    def __post_init__(self) -> None:
        if not self.instance_id or "/" in self.instance_id:
            raise ValueError(f"instance id must be non-empty and hold no '/': "
                             f"{self.instance_id!r}")
        if self.marker is not None and ("\n" in self.marker or parse_line(self.marker)):
            raise ValueError(f"a marker is one line without a timestamp: {self.marker!r}")


def _read_log(
    store: ObjectStore, job_id: str, segments: Sequence[Segment], tail: int | None,
    want_cursors: bool,
) -> tuple[list[str], dict[str, int]]:
    """The log and each instance's last seq. An instance's chunks are read
    once, under its first segment. With ``tail``, chunks are read from the
    end backwards and only as many as the tail needs."""
    owner: dict[str, int] = {}
    for i, seg in enumerate(segments):
        owner.setdefault(seg.instance_id, i)
    cursors: dict[str, int] = {}
    if tail is None:
        out: list[str] = []
        for i, seg in enumerate(segments):
            if seg.marker is not None:
                out.append(seg.marker)
            if owner[seg.instance_id] == i:
                lines, cursors[seg.instance_id] = read_instance(store, job_id, seg.instance_id)
                out.extend(lines)
        return out, cursors
    if tail < 0:
        raise ValueError(f"tail must be >= 0, not {tail}")
    parts: list[list[str]] = []  # newest first
    count = 0
    for i in reversed(range(len(segments))):
        if count >= tail and not want_cursors:
            break
        seg = segments[i]
        if owner[seg.instance_id] == i:
            seqs = _instance_seqs(store, job_id, seg.instance_id, -1)
            cursors[seg.instance_id] = seqs[-1] if seqs else -1
            for seq in reversed(seqs):
                if count >= tail:
                    break
                lines = _read_chunk(store, job_id, seg.instance_id, seq)
                parts.append(lines)
                count += len(lines)
        if seg.marker is not None and count < tail:
            parts.append([seg.marker])
            count += 1
    lines = [line for part in reversed(parts) for line in part]
    return (lines[len(lines) - tail:] if tail else []), cursors


def read_job_log(
    store: ObjectStore, job_id: str, segments: Sequence[Segment], *, tail: int | None = None
) -> list[str]:
    """One continuous log (lines without newlines): for each segment in
    order, its marker (if any), then its instance's lines. An instance named
    by several segments has its lines under the first. With ``tail``, only
    the last ``tail`` lines (markers count), reading only the chunks needed.

    Raises ValueError for a negative tail or ids that cannot name a chunk;
    store errors propagate.
    """
    lines, _ = _read_log(store, job_id, list(segments), tail, want_cursors=False)
    return lines


class LogFollower:
    """A cursor over a job's log, for ``--follow``: each ``poll`` returns the
    lines not returned before.

    ``poll(segments)`` takes the job's segments as they are now; they may
    only grow (a move appends one). It returns the markers of segments it has
    not seen, and each instance's chunks past the ones it read, segment by
    segment. A chunk an old instance writes after a later segment's marker
    was returned comes out in the poll that finds it (``read_job_log`` puts
    it in its place). With ``tail``, the first poll returns only the last
    ``tail`` lines of the log so far.
    """

    def __init__(self, store: ObjectStore, job_id: str, *, tail: int | None = None) -> None:
        """Raises ValueError for a negative tail."""
        if tail is not None and tail < 0:
            raise ValueError(f"tail must be >= 0, not {tail}")
        self.store = store
        self.job_id = job_id
        self.tail = tail
        self._segments: list[Segment] = []
        self._cursors: dict[str, int] = {}
        self._polled = False

    def poll(self, segments: Sequence[Segment]) -> list[str]:
        """The new lines, oldest first. Raises ValueError if ``segments`` does
        not start with the segments of the previous poll; store errors
        propagate (and the next poll picks up where this one stopped)."""
        segments = list(segments)
        known = len(self._segments)
        if [s.instance_id for s in segments[:known]] != [
                s.instance_id for s in self._segments]:
            raise ValueError("segments may only grow: a poll got segments that do not "
                             "start with those of the poll before")
        # A marker that changed (a move in progress that completed or rolled
        # back) is shown again, as it reads now.
        changed = [seg.marker for old, seg in zip(self._segments, segments, strict=False)
                   if seg.marker is not None and seg.marker != old.marker]
        if not self._polled and self.tail is not None:
            lines, self._cursors = _read_log(self.store, self.job_id, segments, self.tail,
                                             want_cursors=True)
            self._segments, self._polled = segments, True
            return lines
        # Work on copies and commit at the end, so a store error part-way
        # loses nothing: the next poll does it all again.
        owner: dict[str, int] = {}
        for i, seg in enumerate(segments):
            owner.setdefault(seg.instance_id, i)
        cursors = dict(self._cursors)
        out: list[str] = []
        for i, seg in enumerate(segments):
            if i < known and seg.marker in changed:
                out.append(seg.marker)
            if i >= known and seg.marker is not None:
                out.append(seg.marker)
            if owner[seg.instance_id] == i:
                lines, cursors[seg.instance_id] = read_instance(
                    self.store, self.job_id, seg.instance_id,
                    after_seq=cursors.get(seg.instance_id, -1))
                out.extend(lines)
        self._segments, self._cursors, self._polled = segments, cursors, True
        return out
