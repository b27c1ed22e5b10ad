"""The checkpoint format over real stores: FileStore on a temp folder and
S3Store against moto and s3rver. Damage is done the way storage or a crash
would do it: by writing, truncating or deleting objects in the store."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuscout.agent.protocol import checkpoint_prefix
from gpuscout.store import FileDigest, FileStore, ObjectStore
from gpuscout.store.fs import TMP_PREFIX
from gpuscout.workload import checkpoint as checkpoint_module
from gpuscout.workload.checkpoint import (
    MANIFEST,
    CheckpointInfo,
    CheckpointStore,
    CorruptCheckpoint,
    NoCheckpoint,
    new_version,
)
from tests.s3_servers import S3Endpoint

PREFIX = checkpoint_prefix("j-42")


@pytest.fixture(params=["file", "moto", "s3rver"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    endpoint: S3Endpoint = request.getfixturevalue(f"{request.param}_server")
    return endpoint.new_store()


@pytest.fixture
def ckpts(store: ObjectStore) -> CheckpointStore:
    return CheckpointStore(store, PREFIX)


def state(step: int) -> dict[str, bytes]:
    return {
        "state.json": json.dumps({"step": step, "w": [0.1 * step, 1 / 3]}).encode(),
        "weights/layer0.bin": bytes([step % 256]) * 1000 + os.urandom(24),
    }


class RecordingStore:
    """A real store that also notes the order of puts."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.puts: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        self.puts.append(key)
        return self.inner.put_file(key, path)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> FileDigest:
        return self.inner.get_file(key, path)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


# --- the happy path ------------------------------------------------------------


def test_save_load_round_trip(store: ObjectStore) -> None:
    recording = RecordingStore(store)
    ckpts = CheckpointStore(recording, PREFIX)
    files = state(7)
    before = datetime.now(UTC)
    info = ckpts.save(7, files)

    assert info.step == 7
    assert info.key.startswith(f"{PREFIX}/000000000007-")
    assert info.files == {name: len(data) for name, data in files.items()}
    assert info.size == sum(len(d) for d in files.values())
    assert before - timedelta(seconds=1) <= info.created_at <= datetime.now(UTC)
    # Every file first, the manifest last.
    assert recording.puts[-1] == info.manifest_key
    assert sorted(recording.puts[:-1]) == sorted(f"{info.key}/{n}" for n in files)

    manifest = json.loads(store.get(info.manifest_key))
    assert manifest["format"] == 1 and manifest["step"] == 7
    assert datetime.fromisoformat(manifest["created_at"]) == info.created_at
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in files.items()
    }

    # A fresh reader (another instance, after a move) sees the same.
    reader = CheckpointStore(store, PREFIX + "/")
    assert reader.latest() == info
    assert reader.load() == (info, files)
    assert reader.load(7) == (info, files)
    assert reader.list() == [info]


def test_latest_is_the_highest_step(ckpts: CheckpointStore) -> None:
    saved = {step: ckpts.save(step, state(step)) for step in (3, 10, 1, 2)}
    assert ckpts.latest() == saved[10]
    assert ckpts.load()[0] == saved[10]
    assert [i.step for i in ckpts.list()] == [1, 2, 3, 10]
    assert ckpts.load(2)[0] == saved[2]


def test_no_checkpoint(ckpts: CheckpointStore) -> None:
    assert ckpts.latest() is None
    assert ckpts.list() == []
    with pytest.raises(NoCheckpoint):
        ckpts.load()
    ckpts.save(1, state(1))
    with pytest.raises(NoCheckpoint, match="step 5"):
        ckpts.load(5)


def test_prefixes_do_not_see_each_other(store: ObjectStore) -> None:
    a = CheckpointStore(store, checkpoint_prefix("j-1"))
    b = CheckpointStore(store, checkpoint_prefix("j-10"))  # j-1 is a string prefix of it
    a.save(1, state(1))
    b.save(2, state(2))
    assert [i.step for i in a.list()] == [1]
    assert [i.step for i in b.list()] == [2]


def test_foreign_keys_under_the_prefix_are_ignored(
        store: ObjectStore, ckpts: CheckpointStore) -> None:
    good = ckpts.save(4, state(4))
    store.put(f"{PREFIX}/README", b"not a checkpoint")
    store.put(f"{PREFIX}/999-short/{MANIFEST}", b"{}")
    store.put(f"{PREFIX}/latest/state.json", b"{}")
    assert ckpts.latest() == good
    assert ckpts.list() == [good]


# --- damage is never restored --------------------------------------------------


def flip_a_byte(store: ObjectStore, info: CheckpointInfo) -> str:
    key = f"{info.key}/weights/layer0.bin"
    data = bytearray(store.get(key))
    data[500] ^= 0x01
    store.put(key, bytes(data))
    return "sha256"


def grow_a_file(store: ObjectStore, info: CheckpointInfo) -> str:
    key = f"{info.key}/state.json"
    store.put(key, store.get(key) + b" ")
    return "size"


def delete_a_file(store: ObjectStore, info: CheckpointInfo) -> str:
    store.delete(f"{info.key}/weights/layer0.bin")
    return "missing file"


def delete_the_manifest(store: ObjectStore, info: CheckpointInfo) -> str:
    store.delete(info.manifest_key)
    return "no MANIFEST.json"


def truncate_the_manifest(store: ObjectStore, info: CheckpointInfo) -> str:
    raw = store.get(info.manifest_key)
    store.put(info.manifest_key, raw[: len(raw) // 2])
    return "does not parse"


def manifest_of_another_step(store: ObjectStore, info: CheckpointInfo) -> str:
    doc = json.loads(store.get(info.manifest_key))
    doc["step"] = info.step + 1
    store.put(info.manifest_key, json.dumps(doc).encode())
    return "says step"


DAMAGE: list[Callable[[ObjectStore, CheckpointInfo], str]] = [
    flip_a_byte, grow_a_file, delete_a_file, delete_the_manifest, truncate_the_manifest,
    manifest_of_another_step,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_checkpoint_is_skipped_for_the_previous_good_one(
        store: ObjectStore, ckpts: CheckpointStore,
        damage: Callable[[ObjectStore, CheckpointInfo], str]) -> None:
    good = ckpts.save(10, state(10))
    good_files = ckpts.load(10)[1]
    bad = ckpts.save(20, state(20))
    reason = damage(store, bad)

    for reader in (ckpts, CheckpointStore(store, PREFIX)):
        assert reader.latest() == good
        assert reader.load() == (good, good_files)
        assert reader.load(None)[0].key == good.key
        with pytest.raises(CorruptCheckpoint) as caught:
            reader.load(20)
        assert caught.value.key == bad.key
        assert reason in caught.value.reason
        assert bad.key in str(caught.value)


def test_only_damaged_checkpoints_means_none(
        store: ObjectStore, ckpts: CheckpointStore) -> None:
    flip_a_byte(store, ckpts.save(1, state(1)))
    delete_the_manifest(store, ckpts.save(2, state(2)))
    assert ckpts.latest() is None
    with pytest.raises(NoCheckpoint, match="no verified checkpoint"):
        ckpts.load()


def test_a_partial_save_does_not_count(store: ObjectStore, ckpts: CheckpointStore) -> None:
    """A save that died before its manifest (or one still running) leaves
    files without a manifest: invisible until the manifest lands."""
    good = ckpts.save(5, state(5))
    store.put(f"{PREFIX}/000000000006-0123456789abcdef/state.json", b'{"step": 6}')
    assert ckpts.latest() == good
    assert ckpts.list() == [good]


# --- immutability and versions -------------------------------------------------


def test_saving_a_step_twice_gives_two_versions(
        store: ObjectStore, ckpts: CheckpointStore) -> None:
    first_files, second_files = state(4), state(4)
    assert first_files != second_files  # random tail: distinguishable
    first = ckpts.save(4, first_files)
    first_objects = {k: store.get(k) for k in store.list(first.key + "/")}
    second = ckpts.save(4, second_files)

    assert first.key != second.key and first.version != second.version
    assert {k: store.get(k) for k in store.list(first.key + "/")} == first_objects
    assert ckpts.load(4) == (second, second_files)  # the later version wins
    assert ckpts.latest() == second
    assert ckpts.list() == [first, second]

    # A damaged newer version of the step falls back to the older good one.
    flip_a_byte(store, second)
    assert ckpts.load(4) == (first, first_files)
    assert ckpts.latest() == first


def test_many_quick_saves_of_one_step_never_collide(ckpts: CheckpointStore) -> None:
    keys = {ckpts.save(0, {"s": bytes([i])}).key for i in range(20)}
    assert len(keys) == 20
    assert ckpts.load(0)[1] == {"s": bytes([19])}


# --- prune ---------------------------------------------------------------------


def test_discard_after_removes_newer_checkpoints_good_or_partial(
        store: ObjectStore, ckpts: CheckpointStore) -> None:
    saved = {step: ckpts.save(step, state(step)) for step in (10, 20, 30)}
    partial = f"{PREFIX}/{40:012d}-{new_version()}"
    store.put(f"{partial}/state.json", b"half")  # a save cut off: no manifest

    deleted = ckpts.discard_after(20)

    assert sorted(deleted) == sorted([saved[30].key, partial])
    assert ckpts.latest() == saved[20]
    assert [i.step for i in ckpts.list()] == [10, 20]
    assert list(store.list(partial + "/")) == []
    assert ckpts.discard_after(20) == []


def test_prune_keeps_the_newest_good_ones(store: ObjectStore, ckpts: CheckpointStore) -> None:
    saved = {step: ckpts.save(step, state(step)) for step in range(1, 6)}
    flip_a_byte(store, saved[5])  # newest is bad: it does not count toward keep
    flip_a_byte(store, saved[2])  # an old bad one goes like the old good ones

    deleted = ckpts.prune(keep=2)

    assert sorted(deleted) == sorted([saved[1].key, saved[2].key])
    assert ckpts.latest() == saved[4]
    assert [i.step for i in ckpts.list()] == [3, 4, 5]  # list() does not hash
    for step in (1, 2):
        assert list(store.list(saved[step].key + "/")) == []
    assert ckpts.prune(keep=2) == []


def test_prune_never_deletes_the_only_good_checkpoint(
        store: ObjectStore, ckpts: CheckpointStore) -> None:
    only = ckpts.save(1, state(1))
    delete_the_manifest(store, ckpts.save(2, state(2)))
    assert ckpts.prune(keep=1) == []
    assert ckpts.latest() == only
    with pytest.raises(ValueError, match="at least one"):
        ckpts.prune(keep=0)


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("step", [-1, True, 1.0, 10**12, "3"])
def test_save_rejects_bad_steps(ckpts: CheckpointStore, step: object) -> None:
    with pytest.raises(ValueError, match="step"):
        ckpts.save(step, {"a": b""})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [MANIFEST, "../escape", "/abs", "a//b", ""])
def test_save_rejects_bad_file_names(ckpts: CheckpointStore, name: str) -> None:
    with pytest.raises(ValueError, match="MANIFEST|invalid object key"):
        ckpts.save(1, {name: b"x"})
    assert ckpts.list() == []


def test_save_rejects_non_bytes(ckpts: CheckpointStore) -> None:
    with pytest.raises(TypeError, match="state.json"):
        ckpts.save(1, {"state.json": "text"})  # type: ignore[dict-item]


def test_prefix_is_validated(store: ObjectStore) -> None:
    for prefix in ["", "/", "../x", "a//b"]:
        with pytest.raises(ValueError):
            CheckpointStore(store, prefix)


# --- files on disk: save_paths and load_to_dir -----------------------------------


def write_state(folder: Path, step: int) -> dict[str, Path]:
    """The files of ``state(step)`` written under ``folder``."""
    paths = {}
    for name, data in state(step).items():
        path = folder / f"step-{step}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[name] = path
    return paths


def read_dir(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_paths_load_to_dir_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    recording = RecordingStore(store)
    ckpts = CheckpointStore(recording, PREFIX)
    paths = write_state(tmp_path / "src", 7)
    files = {name: path.read_bytes() for name, path in paths.items()}
    info = ckpts.save_paths(7, paths)

    assert info.step == 7 and info.files == {n: len(d) for n, d in files.items()}
    assert recording.puts[-1] == info.manifest_key  # the manifest last
    manifest = json.loads(store.get(info.manifest_key))
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in files.items()
    }

    dest = tmp_path / "restored"
    reader = CheckpointStore(store, PREFIX)
    assert reader.load_to_dir(dest) == info
    assert read_dir(dest) == files  # nested names make folders; nothing else left
    assert reader.load() == (info, files)  # one format: the bytes API reads it too
    assert reader.latest() == info


def test_load_to_dir_reads_a_checkpoint_saved_as_bytes(
        ckpts: CheckpointStore, tmp_path: Path) -> None:
    info = ckpts.save(3, state(3))
    files = ckpts.load(3)[1]
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "state.json").write_bytes(b"stale")
    (dest / "unrelated.txt").write_bytes(b"kept")
    assert ckpts.load_to_dir(dest, 3) == info
    assert read_dir(dest) == {**files, "unrelated.txt": b"kept"}


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_load_to_dir_never_restores_damage(
        store: ObjectStore, ckpts: CheckpointStore, tmp_path: Path,
        damage: Callable[[ObjectStore, CheckpointInfo], str]) -> None:
    good = ckpts.save_paths(10, write_state(tmp_path / "src", 10))
    good_files = ckpts.load(10)[1]
    bad = ckpts.save_paths(20, write_state(tmp_path / "src", 20))
    reason = damage(store, bad)

    dest = tmp_path / "dest"
    with pytest.raises(CorruptCheckpoint) as caught:
        ckpts.load_to_dir(dest, 20)
    assert caught.value.key == bad.key and reason in caught.value.reason
    assert read_dir(dest) == {}  # nothing of the bad one landed, no staging left

    assert ckpts.load_to_dir(dest) == good  # the previous good one
    assert read_dir(dest) == good_files
    assert not any(p.name.startswith(TMP_PREFIX) for p in dest.rglob("*"))


def test_load_to_dir_skips_a_partial_save(
        store: ObjectStore, ckpts: CheckpointStore, tmp_path: Path) -> None:
    good = ckpts.save_paths(5, write_state(tmp_path / "src", 5))
    store.put_file(f"{PREFIX}/000000000006-0123456789abcdef/state.json",
                   write_state(tmp_path / "src", 6)["state.json"])
    assert ckpts.load_to_dir(tmp_path / "d") == good
    with pytest.raises(CorruptCheckpoint, match="no MANIFEST.json"):
        ckpts.load_to_dir(tmp_path / "d", 6)
    assert read_dir(tmp_path / "d") == ckpts.load(5)[1]


def test_load_to_dir_without_a_checkpoint(ckpts: CheckpointStore, tmp_path: Path) -> None:
    with pytest.raises(NoCheckpoint):
        ckpts.load_to_dir(tmp_path / "d")


def test_large_files_are_verified_without_holding_them(
        store: ObjectStore, ckpts: CheckpointStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """latest() and prune() hash files above IN_MEMORY_LIMIT by streaming
    them through a temporary file: damage is still found."""
    monkeypatch.setattr(checkpoint_module, "IN_MEMORY_LIMIT", 100)
    good = ckpts.save_paths(1, write_state(tmp_path / "src", 1))
    bad = ckpts.save_paths(2, write_state(tmp_path / "src", 2))
    flip_a_byte(store, bad)  # weights/layer0.bin: 1024 bytes, above the limit
    assert ckpts.latest() == good
    assert ckpts.prune(keep=1) == []
    assert ckpts.latest() == good


def test_save_paths_rejects_bad_input(ckpts: CheckpointStore, tmp_path: Path) -> None:
    path = write_state(tmp_path / "src", 1)["state.json"]
    with pytest.raises(ValueError, match="step"):
        ckpts.save_paths(-1, {"state.json": path})
    for name in (MANIFEST, "../escape", ""):
        with pytest.raises(ValueError, match="MANIFEST|invalid object key"):
            ckpts.save_paths(1, {name: path})
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        ckpts.save_paths(1, {"state.json": path, "missing.bin": tmp_path / "nope"})
    assert ckpts.list() == []
