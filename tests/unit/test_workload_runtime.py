"""The workload library standalone: exact state, checkpoint cadence,
restore of the latest verified checkpoint, artifacts, its small HTTP server."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gpuscout import workload
from gpuscout.agent import protocol as p
from gpuscout.store import FileStore, open_store
from gpuscout.store.base import FileDigest
from gpuscout.workload.checkpoint import CheckpointStore
from gpuscout.workload.runtime import AgentClient, AgentUnavailable, WorkloadServer


def standalone(tmp_path: Path, every: int | None = 5) -> workload.Run:
    return workload.init(checkpoint_every=every, default_dir=tmp_path, environ={})


@pytest.mark.parametrize(
    "value",
    [0.1 + 0.2, 1 / 3, -0.0, 5e-324, 1.7976931348623157e308, 2.0**-1074 * 3, 123456789.123456789],
)
def test_state_floats_round_trip_bit_for_bit(value: float) -> None:
    state = workload.decode_state(workload.encode_state({"x": value, "xs": [value, -value]}))
    assert state["x"].hex() == value.hex()
    assert [v.hex() for v in state["xs"]] == [value.hex(), (-value).hex()]


def test_state_accepts_numpy_and_keeps_non_finite() -> None:
    coef = np.random.default_rng(1).normal(size=8)
    data = workload.encode_state({"coef": coef, "b": np.float64(0.1), "n": math.inf})
    state = workload.decode_state(data)
    assert np.array_equal(np.asarray(state["coef"]), coef)
    assert state["b"] == 0.1 and state["n"] == math.inf
    with pytest.raises(TypeError):
        workload.encode_state({"x": object()})
    with pytest.raises(TypeError):
        workload.encode_state([1, 2])  # type: ignore[arg-type]


def test_standalone_checkpoints_every_n_steps_and_restores_the_latest(tmp_path: Path) -> None:
    with standalone(tmp_path) as run:
        assert not run.managed and run.instance_id == "standalone"
        assert run.restore() is None
        calls: list[int] = []

        def state_at(step: int) -> dict[str, Any]:
            calls.append(step)
            return {"w": step / 7}

        for step in range(1, 13):
            run.step_done(step, loss=1.0 / step, total_steps=12,
                          state=functools.partial(state_at, step))
        assert calls == [5, 10]  # the state is only built when a checkpoint is due
    with standalone(tmp_path) as again:
        assert again.restore() == (10, {"w": 10 / 7})
    assert (tmp_path / ".checkpoints").is_dir()


def test_restore_skips_a_corrupt_latest_checkpoint(tmp_path: Path) -> None:
    with standalone(tmp_path, every=None) as run:
        run.checkpoint(4, {"w": 4})
        latest = run.checkpoint(8, {"w": 8})
    # damage the newest checkpoint's state behind the store's back
    store = open_store((tmp_path / ".checkpoints").resolve().as_uri())
    damaged = [key for key in store.list(latest.key) if key.endswith("state.json")]
    assert damaged, list(store.list(""))
    store.put(damaged[0], b'{"w": 9}')
    with standalone(tmp_path) as again:
        assert again.restore() == (4, {"w": 4})


def test_store_url_is_used_standalone_when_set(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run = workload.init(checkpoint_every=2, default_dir=tmp_path / "out",
                        environ={p.ENV_STORE_URL: url})
    run.step_done(2, state={"w": 2})
    run.close()
    assert any(key.startswith("checkpoints/") for key in open_store(url).list(""))
    assert not (tmp_path / "out" / ".checkpoints").exists()


def test_artifacts_go_to_default_dir_standalone(tmp_path: Path) -> None:
    with standalone(tmp_path / "out") as run:
        where = run.save_artifact("model.json", b'{"a": 1}')
        assert Path(where).read_bytes() == b'{"a": 1}'
        run.save_artifact("sub/x.bin", b"x")
        assert (tmp_path / "out" / "sub" / "x.bin").read_bytes() == b"x"
        for bad in ("", "../x", "/etc/x", "a//b", "a/./b"):
            with pytest.raises(ValueError):
                run.save_artifact(bad, b"")


def test_managed_run_needs_the_agent_environment(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=p.ENV_STORE_URL):
        workload.init(default_dir=tmp_path, environ={p.ENV_AGENT_URL: "http://127.0.0.1:1"})


def test_serve_is_off_standalone_without_a_port(tmp_path: Path) -> None:
    with standalone(tmp_path) as run:
        assert run.serve({"GET /status": lambda r: {}}) is None


def test_agent_gone_is_reported_not_hidden() -> None:
    client = AgentClient("http://127.0.0.1:9", grace_s=0.3)
    with pytest.raises(AgentUnavailable):
        client.progress(1, loss=0.1, total_steps=2, at=0.0)
    client.close()


def test_workload_server_routes_and_errors() -> None:
    def echo(request: workload.Request) -> Any:
        body = request.json()
        if not isinstance(body, dict):
            raise workload.BadRequest("body must be an object")
        return {"got": body, "q": request.query}

    def broken(_: workload.Request) -> Any:
        raise RuntimeError("boom")

    server = WorkloadServer({"POST /echo": echo, "GET /status": lambda r: {"ok": True},
                             "GET /broken": broken})
    base = f"http://127.0.0.1:{server.port}"
    try:
        with httpx.Client(base_url=base) as client:
            assert client.get("/status").json() == {"ok": True}
            answer = client.post("/echo?a=1", json={"x": [1.5]})
            assert answer.json() == {"got": {"x": [1.5]}, "q": {"a": ["1"]}}
            assert client.post("/echo", json=[1]).status_code == 400
            invalid = client.post("/echo", content=b"{")
            assert invalid.json()["error"] == "the body is not valid JSON"
            assert client.post("/echo").status_code == 400
            assert client.get("/echo").status_code == 405
            assert client.get("/echo").headers["allow"] == "POST"
            assert client.get("/missing").status_code == 404
            assert client.get("/broken").status_code == 500
            # still serving after a failing handler, on the same connection
            assert client.get("/status").status_code == 200
    finally:
        server.close()


def test_bad_routes_are_refused() -> None:
    with pytest.raises(ValueError, match="METHOD /path"):
        WorkloadServer({"status": lambda r: {}})


def test_state_json_is_canonical() -> None:
    data = workload.encode_state({"b": 1.5, "a": [1, 2]})
    assert data == b'{"a":[1,2],"b":1.5}'
    assert json.loads(data) == {"a": [1, 2], "b": 1.5}
    assert sys.float_repr_style == "short"  # what exact round-trips rely on


class BrokenStore:
    """A store whose writes fail (a full disk, an S3 outage)."""

    url = "broken://"

    def put(self, key: str, data: bytes) -> None:
        raise OSError("disk full")

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        raise OSError("disk full")

    def get(self, key: str) -> bytes:
        raise KeyError(key)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        raise KeyError(key)

    def exists(self, key: str) -> bool:
        return False

    def list(self, prefix: str) -> Iterator[str]:
        return iter(())

    def delete(self, key: str) -> None:
        pass


def test_a_failing_store_does_not_stop_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = workload.Run(checkpoints=CheckpointStore(BrokenStore(), "ck"), checkpoint_every=1,
                       instance_id="i", default_dir=tmp_path)
    run.step_done(1, state={"w": 1.0})
    assert run.flush() is None
    assert run.last_checkpoint is None
    assert "checkpoint of step 1 failed" in caplog.text


def test_a_state_that_is_not_json_is_the_scripts_bug(tmp_path: Path) -> None:
    with standalone(tmp_path, every=1) as run, pytest.raises(TypeError):
        run.step_done(1, state={"w": object()})


# --- periodic checkpoints upload in the background --------------------------------


class SlowStore(FileStore):
    """A real file store whose every write takes ``delay_s`` longer (a slow
    link to S3); it records how many writes ran at once, at most."""

    def __init__(self, root: Path, delay_s: float) -> None:
        super().__init__(root)
        self.delay_s = delay_s
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _slow(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.delay_s)
            yield
        finally:
            with self._lock:
                self.active -= 1

    def put(self, key: str, data: bytes) -> None:
        with self._slow():
            super().put(key, data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        with self._slow():
            return super().put_file(key, path)


def slow_run(tmp_path: Path, delay_s: float, every: int | None) -> tuple[workload.Run, SlowStore]:
    store = SlowStore(tmp_path / "store", delay_s)
    run = workload.Run(checkpoints=CheckpointStore(store, "ck"), checkpoint_every=every,
                       instance_id="i", default_dir=tmp_path / "work")
    return run, store


def timed(call: Callable[[], object]) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def test_a_periodic_checkpoint_does_not_block_training_for_its_upload(tmp_path: Path) -> None:
    run, store = slow_run(tmp_path, delay_s=0.5, every=5)  # two writes: >= 1 s upload
    with run:
        for step in range(1, 5):
            run.step_done(step, state={"w": step})
        took = timed(lambda: run.step_done(5, state={"w": 5}))
        assert took < 0.4, took  # staged only: the upload runs in the background
        assert run.last_checkpoint is None  # not stored yet ...
        assert CheckpointStore(store, "ck").list() == []
        run.step_done(6, state={"w": 6})  # ... and training goes on meanwhile
        info = run.flush()
        assert info is not None and info.step == 5 and run.last_checkpoint == info
        assert [c.step for c in CheckpointStore(store, "ck").list()] == [5]
    with workload.Run(checkpoints=CheckpointStore(FileStore(tmp_path / "store"), "ck"),
                      checkpoint_every=None, instance_id="i", default_dir=tmp_path) as again:
        assert again.restore() == (5, {"w": 5})


def test_at_most_one_periodic_upload_is_in_flight(tmp_path: Path) -> None:
    run, store = slow_run(tmp_path, delay_s=0.3, every=1)  # each upload >= 0.6 s
    with run:
        assert timed(lambda: run.step_done(1, state={"w": 1})) < 0.25
        # the next one is due before the first is stored: it waits for it ...
        assert timed(lambda: run.step_done(2, state={"w": 2})) > 0.4
        # ... which is complete by then, and the second is in flight
        assert [c.step for c in CheckpointStore(store, "ck").list()] == [1]
        run.step_done(3, state={"w": 3})
    assert store.most_active == 1  # never two writes at once
    assert [c.step for c in CheckpointStore(store, "ck").list()] == [1, 2, 3]


def test_close_flushes_the_last_periodic_checkpoint(tmp_path: Path) -> None:
    run, store = slow_run(tmp_path, delay_s=0.3, every=4)
    for step in range(1, 9):
        run.step_done(step, state={"w": step})
    run.close()  # right after step 8's upload started
    assert run.last_checkpoint is not None and run.last_checkpoint.step == 8
    assert [c.step for c in CheckpointStore(store, "ck").list()] == [4, 8]
    run.close()  # idempotent


def test_a_failing_background_upload_is_logged_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = workload.Run(checkpoints=CheckpointStore(BrokenStore(), "ck"), checkpoint_every=2,
                       instance_id="i", default_dir=tmp_path)
    with run:
        for step in range(1, 6):
            run.step_done(step, state={"w": step})
        assert run.flush() is None
    assert "checkpoint of step 2 failed" in caplog.text
    assert "checkpoint of step 4 failed" in caplog.text
