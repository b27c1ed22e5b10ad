"""Code sync (gpuscout.workdir) on real files in a temp folder, through the
filesystem store and a real S3 server (moto on loopback)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from gpuscout.store import FileStore, ObjectNotFound, ObjectStore
from gpuscout.workdir import (
    MAX_WORKDIR_BYTES,
    WORKDIR_PREFIX,
    PackedWorkdir,
    WorkdirError,
    fetch_and_unpack,
    key_of,
    pack,
    parse_ref,
    upload,
)
from tests.integration.test_checkpoint import RecordingStore
from tests.s3_servers import S3Endpoint


def write(root: Path, rel: str, data: bytes | str = b"x", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def members(packed: PackedWorkdir) -> list[str]:
    with tarfile.open(packed.path, "r:gz") as tar:
        return tar.getnames()


def tree(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Every file and symlink below root: kind, content or link text, mode bits."""
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path), 0)
            elif path.is_file():
                out[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777)
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write(root, "train.py", "print('hi')\n")
    write(root, "run.sh", "#!/bin/sh\necho run\n", mode=0o755)
    write(root, "pkg/__init__.py", "")
    write(root, "pkg/model.py", "W = 1\n" * 100)
    write(root, "conf/base.yaml", "lr: 0.1\n")
    return root


@pytest.fixture
def packed_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture(params=["file", "moto"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    endpoint: S3Endpoint = request.getfixturevalue("moto_server")
    return endpoint.new_store()


# --- what goes in ----------------------------------------------------------------


def test_gitignore_rules_root_nested_negation_git_and_gpuscoutignore(
        tmp_path: Path, packed_dir: Path) -> None:
    root = tmp_path / "proj"
    write(root, ".gitignore", "*.log\n!keep.log\nbuild/\n/data\n__pycache__/\n")
    write(root, ".gpuscoutignore", "*.ckpt\n!wanted.log\n")
    write(root, "a.log")
    write(root, "keep.log")
    write(root, "wanted.log")
    write(root, "model.ckpt")
    write(root, "build/out.o")
    write(root, "data/huge.bin")
    write(root, "src/data/small.csv")  # /data is anchored at the root
    write(root, "src/__pycache__/m.cpython-311.pyc")
    write(root, "src/main.py")
    write(root, "src/.gitignore", "*.tmp\n!important.log\nlocal/\n")
    write(root, "src/x.tmp")
    write(root, "src/important.log")  # nested negation beats the root's *.log
    write(root, "src/other.log")
    write(root, "src/local/secret.txt")
    write(root, "x.tmp")  # the nested rule does not apply above its folder
    write(root, "build2/build/y")  # build/ matches at any depth
    write(root, "lib/sub/.gitignore", "*\n!.gitignore\n!keep/\n")
    write(root, "lib/sub/drop.txt")
    write(root, "lib/top.txt")
    write(root, ".git/HEAD", "ref: refs/heads/main\n")
    write(root, ".git/objects/ab/cd")
    write(root, "vendor/.git", "gitdir: ../.git/modules/vendor\n")  # a submodule's .git file
    write(root, "vendor/lib.py")

    packed = pack(root, out_dir=packed_dir)
    names = set(members(packed))
    assert names == {
        ".gitignore", ".gpuscoutignore", "keep.log", "wanted.log", "src/data/small.csv",
        "src/main.py", "src/.gitignore", "src/important.log", "x.tmp",
        "lib/sub/.gitignore", "lib/top.txt", "vendor/lib.py",
    }
    assert packed.files == len(names)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_ignore_rules_agree_with_git(tmp_path: Path, packed_dir: Path) -> None:
    root = tmp_path / "proj"
    write(root, ".gitignore", "*.log\n!keep.log\nbuild/\n/data\n**/tmp/**\n!/lib/**/*.so\n")
    for rel in ["a.log", "keep.log", "sub/keep.log", "sub/x.log", "build/o", "sub/build/o",
                "data/d", "sub/data/d", "tmp/t", "x/tmp/y/z", "lib/a/b.so", "lib/a/b.o",
                "weird name [1].txt", "sub/deep/er/file.py", "sub/deep/er/.gitignore",
                "sub/deep/ok.txt", "sub/deep/.gitignore", "sub/deep/gone.txt"]:
        write(root, rel)
    write(root, "sub/deep/.gitignore", "gone.txt\ner/\n")
    write(root, "sub/deep/er/.gitignore", "!file.py\n")  # inside an ignored folder: moot
    (root / "sub/link").symlink_to("../keep.log")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--others", "--exclude-standard", "-z"],
        check=True, capture_output=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1",
                                              "HOME": str(tmp_path)},
    ).stdout.decode().split("\0")
    assert sorted(members(pack(root, out_dir=packed_dir))) == sorted(n for n in listed if n)


def test_nothing_comes_back_from_an_ignored_folder(tmp_path: Path, packed_dir: Path) -> None:
    """Git's rule: a file cannot be re-included when its folder is excluded."""
    root = tmp_path / "proj"
    write(root, ".gitignore", "logs/\n!logs/keep.txt\ndata/*\n!data/keep.txt\n")
    write(root, "logs/keep.txt")
    write(root, "data/keep.txt")
    write(root, "data/drop.txt")
    assert members(pack(root, out_dir=packed_dir)) == [".gitignore", "data/keep.txt"]


def test_same_content_packs_to_the_same_bytes(tmp_path: Path, project: Path,
                                              packed_dir: Path) -> None:
    first = pack(project, out_dir=packed_dir)
    twin = tmp_path / "twin"
    # Written in the opposite order, with other mtimes.
    for rel, (_, data, mode) in reversed(list(tree(project).items())):
        write(twin, rel, data, mode=mode)
        os.utime(twin / rel, (1_700_000_000, 1_700_000_000))
    second = pack(twin, out_dir=packed_dir)
    assert first.path != second.path
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert first.size == first.path.stat().st_size
    assert first.ref == f"sha256:{first.sha256}"
    assert first.key == f"{WORKDIR_PREFIX}/{first.sha256}.tar.gz"
    with tarfile.open(first.path, "r:gz") as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
            assert info.mode in (0o644, 0o755)
    with gzip.open(first.path) as gz:
        gz.read()
        assert gz.mtime == 0

    (twin / "pkg/model.py").write_text("W = 2\n")
    assert pack(twin, out_dir=packed_dir).sha256 != first.sha256


def test_round_trip_keeps_files_modes_and_links(store: ObjectStore, tmp_path: Path,
                                                project: Path, packed_dir: Path) -> None:
    (project / "latest").symlink_to("conf/base.yaml")
    (project / "pkg/up").symlink_to("../conf")
    (project / "abs").symlink_to(project / "pkg/model.py")  # absolute, inside
    packed = pack(project, out_dir=packed_dir)
    ref = upload(store, packed)
    assert ref == packed.ref
    assert store.exists(key_of(ref))

    dest = tmp_path / "instance" / "job"
    n = fetch_and_unpack(store, ref, dest)
    got = tree(dest)
    want = tree(project)
    want["abs"] = ("link", "pkg/model.py", 0)  # stored relative
    assert got == want
    assert n == packed.files == len(want)
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "train.py").stat().st_mode & 0o777 == 0o644
    assert (dest / "latest").read_text() == "lr: 0.1\n"
    assert (dest / "abs").read_text() == (project / "pkg/model.py").read_text()
    assert (dest / "train.py").stat().st_mtime > 1_000_000_000  # not the archive's 0
    assert not [p for p in dest.parent.iterdir() if p != dest]  # no temporaries left


def test_unpack_into_an_empty_folder_but_not_a_full_one(tmp_path: Path, project: Path,
                                                        packed_dir: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = upload(store, pack(project, out_dir=packed_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fetch_and_unpack(store, ref, empty) == 5
    with pytest.raises(WorkdirError, match="not an empty folder"):
        fetch_and_unpack(store, ref, empty)


def test_upload_twice_writes_once(store: ObjectStore, tmp_path: Path, project: Path,
                                  packed_dir: Path) -> None:
    recording = RecordingStore(store)
    first = pack(project, out_dir=packed_dir)
    second = pack(project, out_dir=packed_dir)
    assert upload(recording, first) == upload(recording, second) == first.ref
    assert recording.puts == [first.key]
    assert list(store.list(WORKDIR_PREFIX)) == [first.key]


def test_upload_refuses_an_archive_changed_after_packing(tmp_path: Path, project: Path,
                                                         packed_dir: Path) -> None:
    store = FileStore(tmp_path / "store")
    packed = pack(project, out_dir=packed_dir)
    packed.path.write_bytes(b"tampered")
    with pytest.raises(WorkdirError, match="changed after it was packed"):
        upload(store, packed)
    assert not store.exists(packed.key)


# --- limits and errors -----------------------------------------------------------


def test_over_the_size_limit_names_the_limit_and_the_largest(tmp_path: Path,
                                                             packed_dir: Path) -> None:
    root = tmp_path / "proj"
    write(root, "train.py", "print(1)\n")
    write(root, "data/weights.bin", os.urandom(300_000))
    write(root, "data/small.bin", os.urandom(20_000))
    write(root, "notes.bin", os.urandom(50_000))
    with pytest.raises(WorkdirError) as info:
        pack(root, max_bytes=100_000, out_dir=packed_dir)
    message = str(info.value)
    assert str(root) in message
    assert "limit of 97.7 KiB" in message
    assert "largest: data/ (312.5 KiB), notes.bin (48.8 KiB)" in message
    assert "largest files: data/weights.bin (293.0 KiB)" in message
    assert ".gitignore" in message and "\n" not in message
    assert list(packed_dir.iterdir()) == []  # the partial archive is gone


def test_the_default_size_limit_is_100_mib() -> None:
    assert MAX_WORKDIR_BYTES == 100 * 1024 * 1024


def test_too_many_files(tmp_path: Path, packed_dir: Path) -> None:
    root = tmp_path / "proj"
    for i in range(12):
        write(root, f"node_modules/m{i:02}.js")
    write(root, "main.py")
    # main.py sorts first, so 10 of node_modules/ are counted when it stops.
    with pytest.raises(WorkdirError, match=r"more than 10 files .*node_modules/ \(10\), main"):
        pack(root, max_files=10, out_dir=packed_dir)
    assert pack(root, max_files=13, out_dir=packed_dir).files == 13
    write(root, ".gitignore", "node_modules/\n")
    assert pack(root, max_files=10, out_dir=packed_dir).files == 2


def test_missing_folder_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(WorkdirError, match="nope does not exist"):
        pack(tmp_path / "nope")
    write(tmp_path, "file.txt")
    with pytest.raises(WorkdirError, match="file.txt is not a folder"):
        pack(tmp_path / "file.txt")


def test_unreadable_file(tmp_path: Path, packed_dir: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    write(root, "secret.txt", mode=0o000)
    if os.geteuid() == 0:  # root reads every file: refuse this one as the OS would
        real_open = os.open

        def refusing_open(path: str | os.PathLike[str], flags: int, *args: int) -> int:
            if os.fspath(path).endswith("secret.txt"):
                raise PermissionError(13, "Permission denied")
            return real_open(path, flags, *args)

        monkeypatch.setattr("gpuscout.workdir.os.open", refusing_open)
    with pytest.raises(WorkdirError, match="cannot read secret.txt"):
        pack(root, out_dir=packed_dir)


def test_symlink_outside_the_folder_is_an_error_unless_ignored(tmp_path: Path,
                                                               packed_dir: Path) -> None:
    outside = write(tmp_path, "elsewhere/data.csv")
    root = tmp_path / "proj"
    write(root, "main.py")
    (root / "data").mkdir()
    (root / "data/link.csv").symlink_to(outside)
    with pytest.raises(WorkdirError, match=r"symlink data/link.csv points outside the folder"):
        pack(root, out_dir=packed_dir)
    (root / "data/link.csv").unlink()
    (root / "data/link.csv").symlink_to("../../elsewhere/data.csv")  # relative, outside
    with pytest.raises(WorkdirError, match="points outside"):
        pack(root, out_dir=packed_dir)
    write(root, ".gitignore", "data/\n")
    assert members(pack(root, out_dir=packed_dir)) == [".gitignore", "main.py"]


def test_symlink_with_dotdot_after_a_name_is_stored_resolved(
        tmp_path: Path, packed_dir: Path) -> None:
    """'self/../x' where self is a link to '.' means '../x', not 'x': the
    packer stores what the link resolves to, in a form that cannot leave."""
    root = tmp_path / "proj"
    write(root, "target.txt", "t")
    (root / "a").mkdir()
    (root / "a/self").symlink_to(".")
    (root / "a/via").symlink_to("self/../target.txt")
    packed = pack(root, out_dir=packed_dir)
    with tarfile.open(packed.path, "r:gz") as tar:
        links = {m.name: m.linkname for m in tar.getmembers() if m.issym()}
    assert links == {"a/self": ".", "a/via": "../target.txt"}
    store = FileStore(tmp_path / "store")
    dest = tmp_path / "job"
    fetch_and_unpack(store, upload(store, packed), dest)
    assert (dest / "a/via").read_text() == "t"


def test_parse_ref_and_key_of() -> None:
    hexdigest = "ab" * 32
    assert parse_ref(f"sha256:{hexdigest}") == hexdigest
    assert key_of(f"sha256:{hexdigest}") == f"code/workdirs/{hexdigest}.tar.gz"
    for bad, why in [(hexdigest, "start with 'sha256:'"), ("sha256:abc", "64 lowercase"),
                     (f"sha256:{hexdigest.upper()}", "64 lowercase"),
                     (f"sha256:{hexdigest}/../x", "64 lowercase"), (None, "string")]:
        with pytest.raises(ValueError, match=why):
            parse_ref(bad)  # type: ignore[arg-type]


def test_missing_archive_raises_object_not_found(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(ObjectNotFound):
        fetch_and_unpack(store, "sha256:" + "0" * 64, tmp_path / "job")
    assert not (tmp_path / "job").exists()
    assert list(tmp_path.glob(".job*")) == []


def test_corrupt_archive_in_the_store(store: ObjectStore, tmp_path: Path, project: Path,
                                      packed_dir: Path) -> None:
    packed = pack(project, out_dir=packed_dir)
    data = bytearray(packed.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.put(packed.key, bytes(data))
    dest = tmp_path / "job"
    with pytest.raises(WorkdirError, match=r"archive sha256:[0-9a-f]{64} is corrupt"):
        fetch_and_unpack(store, packed.ref, dest)
    assert not dest.exists()
    assert list(tmp_path.glob(".job*")) == []


# --- hostile archives ------------------------------------------------------------


def archive(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """A .tar.gz of (name, kind 'file'|'link'|'hard'|'fifo', data or link text)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            assert isinstance(payload, str)
            info.linkname = payload
            tar.addfile(info)
    return buf.getvalue()


def put_archive(store: ObjectStore, data: bytes) -> str:
    ref = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put(key_of(ref), data)
    return ref


@pytest.mark.parametrize(("members_", "why"), [
    ([("../evil", "file", b"x")], "'..'"),
    ([("ok/../../evil", "file", b"x")], "'..'"),
    ([("/tmp/evil", "file", b"x")], "absolute"),
    ([("up", "link", "../.."), ("x", "file", b"")], "lead out"),
    ([("abs", "link", "/etc/passwd")], "lead out"),
    ([("d", "link", "."), ("e", "link", "d/..")], "lead out"),
    ([("d", "link", "sub"), ("d/evil", "file", b"x")], "below a symlink"),
    ([("f", "file", b"x"), ("f", "link", "g")], "twice"),
    ([("h", "hard", "/etc/passwd")], "not a file"),
    ([("p", "fifo", "")], "not a file"),
])
def test_hostile_archive_is_refused(tmp_path: Path, members_: list[tuple[str, str, bytes | str]],
                                    why: str) -> None:
    store = FileStore(tmp_path / "store")
    ref = put_archive(store, archive(members_))
    dest = tmp_path / "area" / "job"
    with pytest.raises(WorkdirError, match=f"is refused: member .*{why}"):
        fetch_and_unpack(store, ref, dest)
    assert not dest.exists()
    assert sorted(p.name for p in (tmp_path / "area").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "area" / "evil").exists()


def test_archive_over_the_limits_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = put_archive(store, archive([(f"f{i}", "file", b"a" * 1000) for i in range(5)]))
    with pytest.raises(WorkdirError, match="over the limit"):
        fetch_and_unpack(store, ref, tmp_path / "job", max_bytes=50)
    with pytest.raises(WorkdirError, match="more than 4 files"):
        fetch_and_unpack(store, ref, tmp_path / "job", max_files=4)
    assert not (tmp_path / "job").exists()
    assert fetch_and_unpack(store, ref, tmp_path / "job") == 5


def test_an_archive_that_is_not_a_tarball(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = put_archive(store, b"not a gzip file at all")
    with pytest.raises(WorkdirError, match="cannot be unpacked"):
        fetch_and_unpack(store, ref, tmp_path / "job")
    assert not (tmp_path / "job").exists()


def test_files_stream_through_in_bounded_memory(tmp_path: Path, packed_dir: Path) -> None:
    root = tmp_path / "proj"
    write(root, "blob.bin", os.urandom(4 * 1024 * 1024))
    tracemalloc.start()
    try:
        packed = pack(root, out_dir=packed_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packed.size > 4 * 1024 * 1024
    assert peak < 1.5 * 1024 * 1024
