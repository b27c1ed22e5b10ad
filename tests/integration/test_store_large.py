"""A 1 GiB checkpoint round trips through the checkpoint store on every
backend: FileStore, and S3Store on moto's server and on s3rver, with the
stores' default part size and concurrency (multipart, parallel). The file
streams from disk to the store and back; the test compares sha256s, and
checks that the process never held anything near the file's size in memory.

Marked ``large`` (deselect with ``-m "not large"``), but it runs by default:
it is what the "Done when" of the AWS issue asks for.
"""

from __future__ import annotations

import hashlib
import os
import resource
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuscout.agent.protocol import checkpoint_prefix
from gpuscout.store import FileStore, ObjectStore
from gpuscout.workload.checkpoint import CheckpointStore
from tests.s3_servers import S3Endpoint

MiB = 1024 * 1024
GiB = 1024 * MiB
SIZE = GiB + 4321  # not a whole number of parts
BLOCK = 8 * MiB

pytestmark = [pytest.mark.large, pytest.mark.timeout(600)]


def write_pattern(path: Path, size: int) -> str:
    """Fill ``path`` with ``size`` bytes quickly (one random block, each
    copy stamped with its index, so no two blocks are equal and a part
    written at the wrong offset changes the hash) and return its sha256."""
    block = bytearray(os.urandom(BLOCK))
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index, offset in enumerate(range(0, size, BLOCK)):
            block[:8] = index.to_bytes(8, "big")
            piece = memoryview(block)[: min(BLOCK, size - offset)]
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(params=["file", "moto", "s3rver"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ObjectStore]]:
    if request.param == "file":
        yield "file", FileStore(tmp_path / "store")
        return
    endpoint: S3Endpoint = request.getfixturevalue(f"{request.param}_server")
    s3 = endpoint.new_store()
    yield request.param, s3
    for key in list(s3.list("")):  # give the server its memory and disk back
        s3.delete(key)


def test_one_gib_checkpoint_round_trips(backend: tuple[str, ObjectStore],
                                        tmp_path: Path) -> None:
    name, store = backend
    source = tmp_path / "weights.bin"
    want = write_pattern(source, SIZE)
    ckpts = CheckpointStore(store, checkpoint_prefix("j-large"))

    # Python-level allocations of the client (moto's server runs in this
    # process too and reads whole objects, so it is left out of the count).
    tracemalloc.start()
    try:
        saved = ckpts.save_paths(3, {"weights.bin": source, "meta/step.json": _small(tmp_path)})
        source.unlink()  # the restore must come from the store
        restored = tmp_path / "restored"
        info = ckpts.load_to_dir(restored)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info == saved
    assert info.files["weights.bin"] == SIZE
    assert sha256_of(restored / "weights.bin") == want
    assert (restored / "meta" / "step.json").read_bytes() == b'{"step": 3}'
    assert sorted(p.name for p in restored.iterdir()) == ["meta", "weights.bin"]
    if name != "moto":
        assert peak < 64 * MiB, f"peak Python allocations {peak / MiB:.0f} MiB"
    print(f"\n{store!r}: peak traced {peak / MiB:.0f} MiB, max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _small(tmp_path: Path) -> Path:
    path = tmp_path / "step.json"
    path.write_bytes(b'{"step": 3}')
    return path
