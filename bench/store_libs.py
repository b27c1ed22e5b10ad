"""GPU Scout's S3 transfer code against well-kept S3 transfer libraries.

For each S3 server, side by side in one run, on the same bytes (one file of
``--size-mib`` MiB of random bytes):

- moto's server (``python -m moto.server``, its own process);
- s3rver (the npm package; ``make test-deps`` installs it, and this bench
  runs ``npm install s3rver@3`` itself when node_modules lacks it);

it measures the upload and the download of that file, in MiB/s of its size,
through each client:

- ``gpuscout``: ``S3Store.put_file`` / ``S3Store.get_file``
  (``gpuscout.store.transfer``: streamed from and to the file, sha256 of
  the whole file taken in order while it streams, CRC32 part checksums);
- ``obstore``: ``obstore.put`` of the file's path / ``obstore.get(...)
  .stream()`` written to a file (Rust object_store, its own defaults:
  5 MiB parts, 12 at a time; one GET stream);
- ``s3transfer-crt``: s3transfer's ``CRTTransferManager`` on an AWS CRT S3
  client, ``upload`` / ``download`` of the file's path (CRT defaults:
  8 MiB parts, parallel ranged GETs; a download also waits for the
  manager's rename of its temporary file, which ``result()`` can return
  before). boto3's own ``upload_file`` with
  ``TransferConfig(preferred_transfer_client="crt")`` cannot be pointed at
  these servers: boto3 builds its process-wide CRT client with
  ``endpoint_url=None`` and TLS on, so its requests go to
  ``https://<bucket>.s3.amazonaws.com`` whatever the client's endpoint
  (the bench tries it once per server and prints what happened);
- for torch states (one ``uint8`` tensor holding the same bytes):
  ``gpuscout+torch`` (what ``gpuscout.workload.torch`` does: ``torch.save``
  to a local file, then ``put_file``; ``get_file``, then ``torch.load``)
  against ``s3torchconnector`` (``S3Checkpoint.writer`` / ``reader`` with
  ``torch.save`` / ``torch.load``, straight to and from S3).

Each figure is the median of ``--rounds`` rounds; within a round every
client uploads then downloads once, the clients' order rotating from round
to round. Every download is checked against the source (sha256; for the
torch clients, of the loaded tensor's bytes), and the size each upload
stored is checked too: a client whose upload stored other bytes is shown
as such, and its download is then timed on a reference copy of the file
(put by gpuscout). ``up x`` / ``down x`` = the client's MiB/s / gpuscout's
(``gpuscout+torch``'s for the torch clients): above 1.0 the library is
faster. Everything runs on loopback with a warm page cache; downloads are
not fsynced by any client. A library that is not installed is reported as
"not installed" (``pip install -e '.[bench]'`` installs them all).

    .venv/bin/python bench/store_libs.py [--size-mib 256] [--rounds 3] [--json]
                                         [--part-mib N] [--concurrency N]

``--part-mib`` / ``--concurrency`` give every client that takes them the
same part size (gpuscout's multipart threshold too) and parts in flight;
by default each client runs with its own defaults.

With ``--json`` the last line of the output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import (  # noqa: E402  (bench/store.py, beside this file)
    REPO_ROOT,
    S3RVER_BIN,
    moto_server,
    s3rver_server,
    write_pattern,
)

from gpuscout.store import S3Store  # noqa: E402

MiB = 1024 * 1024
REGION = "us-east-1"
GPUSCOUT, GPUSCOUT_TORCH = "gpuscout", "gpuscout+torch"
TORCH_CLIENTS = (GPUSCOUT_TORCH, "s3torchconnector")
# Per-request timeout given to obstore (its default, 30 s, is shorter than
# one GET of a GiB takes on moto).
OBSTORE_TIMEOUT = "600s"
VERSIONED = ("boto3", "botocore", "s3transfer", "awscrt", "obstore", "s3torchconnector",
             "s3torchconnectorclient", "torch", "moto")


class NotInstalled(Exception):
    """The client's library is missing: the row says so, the bench goes on."""


@dataclass
class Server:
    name: str
    url: str
    secret: str  # access key id and secret key alike
    bucket: str
    session: Any
    s3: S3Store  # gpuscout's store on this server (also puts the reference copy)


@dataclass
class Tuning:
    part: int | None
    concurrency: int | None


@dataclass
class Client:
    """One way to move the file. ``upload(key)`` and ``download(key, dest)``
    are what is timed; ``check(dest, got)`` (untimed) returns the sha256 of
    what came back. ``torch``: it moves a torch state, not the file."""

    name: str
    upload: Callable[[str], None]
    download: Callable[[str, Path], Any]
    check: Callable[[Path, Any], str]
    torch: bool = False
    close: Callable[[], None] = lambda: None
    upload_paths: list[str] | None = None
    notes: Callable[[], str] = lambda: ""


@dataclass
class Row:
    server: str
    client: str
    status: str = "ok"  # ok | not installed | error
    note: str = ""
    up_s: list[float] = field(default_factory=list)
    down_s: list[float] = field(default_factory=list)
    upload_ok: bool = True
    download_ok: bool = True
    torch: bool = False
    upload_paths: list[str] | None = None


# --- clients -------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def gpuscout_client(server: Server, source: Path, tuning: Tuning) -> Client:
    s3 = server.s3
    paths: list[str] = []
    started: list[int] = []
    s3.client.meta.events.register("before-call.s3.CreateMultipartUpload",
                                   lambda **_: started.append(1))

    def upload(key: str) -> None:
        started.clear()
        s3.put_file(key, source)
        paths.append("multipart" if started else "put")

    return Client(GPUSCOUT, upload, lambda key, dest: s3.get_file(key, dest),
                  lambda dest, _: file_sha256(dest), upload_paths=paths)


def obstore_client(server: Server, source: Path, tuning: Tuning) -> Client:
    try:
        import obstore
        from obstore.store import S3Store as ObS3Store
    except ImportError as exc:
        raise NotInstalled(f"not installed ({exc.name})") from None
    store = ObS3Store(server.bucket, endpoint=server.url, access_key_id=server.secret,
                      secret_access_key=server.secret, region=REGION,
                      virtual_hosted_style_request=False,
                      client_options={"allow_http": True, "timeout": OBSTORE_TIMEOUT})
    put_args: dict[str, int] = {}
    if tuning.part:
        put_args["chunk_size"] = tuning.part
    if tuning.concurrency:
        put_args["max_concurrency"] = tuning.concurrency

    def upload(key: str) -> None:
        obstore.put(store, key, source, **put_args)

    def download(key: str, dest: Path) -> None:
        with dest.open("wb") as out:
            for buf in obstore.get(store, key).stream():
                out.write(buf)

    return Client("obstore", upload, download, lambda dest, _: file_sha256(dest))


def crt_client(server: Server, source: Path, tuning: Tuning) -> Client:
    try:
        from s3transfer.crt import (  # type: ignore[import-untyped]
            BotocoreCRTCredentialsWrapper,
            BotocoreCRTRequestSerializer,
            CRTTransferManager,
            create_s3_crt_client,
        )
    except ImportError as exc:
        name = (exc.name or "awscrt").split(".")[0]
        raise NotInstalled(f"not installed ({name}: pip install 'boto3[crt]')") from None
    credentials = server.session._session.get_credentials()
    provider = BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider()
    crt_args: dict[str, Any] = {}
    if tuning.part:
        crt_args["part_size"] = tuning.part
    crt = create_s3_crt_client(REGION, crt_credentials_provider=provider, use_ssl=False,
                               **crt_args)
    serializer = BotocoreCRTRequestSerializer(server.session._session, {
        "region_name": REGION, "endpoint_url": server.url,
        "config": Config(s3={"addressing_style": "path"})})
    config = None
    if tuning.part or tuning.concurrency:
        from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
        options: dict[str, int] = {}
        if tuning.part:
            options["multipart_chunksize"] = options["multipart_threshold"] = tuning.part
        if tuning.concurrency:
            options["max_concurrency"] = tuning.concurrency
        config = TransferConfig(**options)
    manager = CRTTransferManager(crt, serializer, config=config)

    def upload(key: str) -> None:
        manager.upload(str(source), server.bucket, key).result()

    early: list[int] = []

    def download(key: str, dest: Path) -> None:
        future = manager.download(server.bucket, key, str(dest))
        future.result()
        # awscrt resolves a request's future before it runs the request's
        # on_done, where s3transfer renames the temporary file into place:
        # result() can return before ``dest`` exists. Wait for it as
        # CRTTransferManager.shutdown() does, and count how often it bit.
        if not dest.exists():
            early.append(1)
        future._coordinator.wait_until_on_done_callbacks_complete()
        future.result()

    def notes() -> str:
        return (f"download result() returned before the file was in place {len(early)} "
                "time(s) (s3transfer/awscrt race; waited for it)") if early else ""

    return Client("s3transfer-crt", upload, download, lambda dest, _: file_sha256(dest),
                  close=manager.shutdown, notes=notes)


def torch_state(data: bytes) -> dict[str, Any]:
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the given buffer is not writable": it is not written
        return {"w": torch.frombuffer(data, dtype=torch.uint8)}


def tensor_sha256(state: Any) -> str:
    return hashlib.sha256(state["w"].numpy()).hexdigest()


def gpuscout_torch_client(server: Server, source: Path, data: bytes, work: Path) -> Client:
    try:
        import torch
    except ImportError:
        raise NotInstalled("not installed (torch)") from None
    state = torch_state(data)
    saved = work / "state.pt"

    def upload(key: str) -> None:
        torch.save(state, saved)
        server.s3.put_file(key, saved)

    def download(key: str, dest: Path) -> Any:
        server.s3.get_file(key, dest)
        return torch.load(dest, weights_only=True)

    return Client(GPUSCOUT_TORCH, upload, download, lambda _, got: tensor_sha256(got),
                  torch=True, close=lambda: saved.unlink(missing_ok=True))


def s3torch_client(server: Server, data: bytes, tuning: Tuning) -> Client:
    try:
        import torch
        from s3torchconnector import S3Checkpoint, S3ClientConfig
    except ImportError as exc:
        raise NotInstalled(f"not installed ({exc.name})") from None
    # Its client (mountpoint-s3-client on the AWS CRT) takes credentials from
    # the environment's chain only: set for this server while it runs.
    os.environ["AWS_ACCESS_KEY_ID"] = os.environ["AWS_SECRET_ACCESS_KEY"] = server.secret
    config = S3ClientConfig(force_path_style=True,
                            **({"part_size": tuning.part} if tuning.part else {}))
    checkpoint = S3Checkpoint(REGION, endpoint=server.url, s3client_config=config)
    state = torch_state(data)

    def upload(key: str) -> None:
        with checkpoint.writer(f"s3://{server.bucket}/{key}") as writer:
            torch.save(state, writer)

    def download(key: str, dest: Path) -> Any:
        with checkpoint.reader(f"s3://{server.bucket}/{key}") as reader:
            return torch.load(reader, weights_only=True)

    return Client("s3torchconnector", upload, download, lambda _, got: tensor_sha256(got),
                  torch=True)


@contextlib.contextmanager
def credentials_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def boto3_crt_probe(server: Server, work: Path) -> str:
    """What boto3's own ``upload_file`` with the CRT does on this server."""
    try:
        import awscrt  # type: ignore[import-untyped]  # noqa: F401
        from boto3.s3.transfer import (  # type: ignore[import-untyped]
            TransferConfig,
            create_transfer_manager,
        )
    except ImportError:
        return "boto3 upload_file(crt): not installed (awscrt)"
    probe = work / "probe.bin"
    probe.write_bytes(os.urandom(MiB))
    key = "libs/boto3-crt-probe.bin"
    config = TransferConfig(preferred_transfer_client="crt")
    # What upload_file(..., Config=config) itself does first.
    manager = create_transfer_manager(server.s3.client, config)
    kind = type(manager).__name__
    try:
        if kind != "CRTTransferManager":
            return (f"boto3 upload_file(crt) silently falls back to {kind} (classic s3transfer): "
                    "boto3's one CRT client per process is bound to the first credentials "
                    "and region it saw")
        try:
            manager.upload(str(probe), server.bucket, key).result()
        except Exception as exc:  # noqa: BLE001  (reported, whatever it is)
            return (f"boto3 upload_file(crt) failed: {type(exc).__name__}: {exc} (boto3 makes "
                    "its CRT client with endpoint_url=None and TLS on: it sends to "
                    "https://<bucket>.s3.amazonaws.com, whatever the client's endpoint)")
        return f"boto3 upload_file(crt) returned; object on {server.name}: {server.s3.exists(key)}"
    finally:
        manager.shutdown()
        probe.unlink()


# --- measuring -----------------------------------------------------------------


def stored_size(server: Server, key: str) -> int:
    return int(server.s3.client.head_object(Bucket=server.bucket, Key=key)["ContentLength"])


def run_server(server: Server, source: Path, data: bytes, work: Path, rounds: int,
               tuning: Tuning) -> tuple[list[Row], str]:
    size = len(data)
    want = hashlib.sha256(data).hexdigest()
    factories: list[tuple[str, Callable[[], Client]]] = [
        (GPUSCOUT, lambda: gpuscout_client(server, source, tuning)),
        ("obstore", lambda: obstore_client(server, source, tuning)),
        ("s3transfer-crt", lambda: crt_client(server, source, tuning)),
        (GPUSCOUT_TORCH, lambda: gpuscout_torch_client(server, source, data, work)),
        ("s3torchconnector", lambda: s3torch_client(server, data, tuning)),
    ]
    rows: dict[str, Row] = {}
    clients: list[Client] = []
    for name, make in factories:
        row = rows[name] = Row(server.name, name, torch=name in TORCH_CLIENTS)
        try:
            client = make()
        except NotInstalled as exc:
            row.status = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001  (a client that cannot start is reported)
            row.status, row.note = "error", f"setup: {type(exc).__name__}: {exc}"
            continue
        row.upload_paths = client.upload_paths
        clients.append(client)
    reference: str | None = None  # a good copy, for clients whose upload stored other bytes
    for step in range(rounds):
        turn = step % len(clients) if clients else 0
        for client in clients[turn:] + clients[:turn]:
            row = rows[client.name]
            if row.status != "ok":
                continue
            key = f"libs/{client.name}/{step}.bin"
            dest = work / f"down-{client.name}-{step}"
            try:
                start = time.perf_counter()
                client.upload(key)
                row.up_s.append(time.perf_counter() - start)
                read_key = key
                if not client.torch and (stored := stored_size(server, key)) != size:
                    row.upload_ok = False
                    row.note = f"upload stored {stored} bytes for {size}"
                    if reference is None:
                        reference = "libs/reference.bin"
                        server.s3.put_file(reference, source)
                    read_key = reference
                start = time.perf_counter()
                got = client.download(read_key, dest)
                row.down_s.append(time.perf_counter() - start)
                if client.check(dest, got) != want:
                    if client.torch:
                        row.upload_ok = False  # the state is the upload's and download's
                    row.download_ok = False
                del got
            except Exception as exc:  # noqa: BLE001  (reported; the other clients go on)
                row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:300]
            finally:
                dest.unlink(missing_ok=True)
                with contextlib.suppress(Exception):
                    server.s3.client.delete_object(Bucket=server.bucket, Key=key)
    for client in clients:
        row = rows[client.name]
        row.note = "; ".join(n for n in (row.note, client.notes()) if n)
        with contextlib.suppress(Exception):
            client.close()
    return list(rows.values()), boto3_crt_probe(server, work)


def summarize(rows: list[Row], size_mib: float) -> list[dict[str, Any]]:
    def rate(times: list[float]) -> float | None:
        return round(size_mib / statistics.median(times), 1) if times else None

    out = []
    base = {(r.server, r.torch): r for r in rows if r.client in (GPUSCOUT, GPUSCOUT_TORCH)}
    for row in rows:
        up, down = rate(row.up_s), rate(row.down_s)
        ref = base.get((row.server, row.torch))
        ref_up = rate(ref.up_s) if ref else None
        ref_down = rate(ref.down_s) if ref else None
        check = ("ok" if row.upload_ok and row.download_ok else
                 "upload corrupt" if not row.upload_ok else "MISMATCH")
        out.append({
            "server": row.server, "client": row.client, "status": row.status,
            "upload_mib_s": up, "download_mib_s": down,
            "upload_vs_gpuscout": round(up / ref_up, 2) if up and ref_up else None,
            "download_vs_gpuscout": round(down / ref_down, 2) if down and ref_down else None,
            "check": check if row.status == "ok" else None,
            "upload_s": [round(t, 3) for t in row.up_s],
            "download_s": [round(t, 3) for t in row.down_s],
            "upload_paths": row.upload_paths, "note": row.note,
        })
    return out


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        package = REPO_ROOT / "node_modules" / "s3rver" / "package.json"
        found["s3rver"] = json.loads(package.read_text())["version"]
    return found


def ensure_s3rver() -> None:
    if not S3RVER_BIN.exists():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "s3rver@3"],
                       cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--part-mib", type=int, default=None,
                        help="part size for every client that takes one (default: each's own)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="parts in flight for every client that takes it (default: each's)")
    args = parser.parse_args(argv)
    tuning = Tuning(args.part_mib * MiB if args.part_mib else None, args.concurrency)
    ensure_s3rver()
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpuscout-bench-libs-") as tmp, credentials_env():
        work = Path(tmp)
        source = work / "source.bin"
        data = write_pattern(source, args.size_mib * MiB)
        for name, start in (("moto", moto_server), ("s3rver", s3rver_server)):
            with start() as (url, secret):
                session = boto3.session.Session(aws_access_key_id=secret,
                                                 aws_secret_access_key=secret, region_name=REGION)
                store_tuning: dict[str, int] = {}
                if tuning.part:
                    store_tuning["multipart_chunksize"] = store_tuning["multipart_threshold"] = (
                        tuning.part)
                if tuning.concurrency:
                    store_tuning["max_concurrency"] = tuning.concurrency
                bucket = f"bench-{uuid.uuid4().hex[:12]}"
                s3 = S3Store(f"s3://{bucket}", endpoint_url=url, session=session,
                             create_bucket=True, **store_tuning)
                server = Server(name, url, secret, bucket, session, s3)
                got, probe = run_server(server, source, data, work, args.rounds, tuning)
                rows += got
                notes.append(f"{name}: {probe}")
    results = summarize(rows, args.size_mib)
    settings = {"size_mib": args.size_mib, "rounds": args.rounds, "part_mib": args.part_mib,
                "concurrency": args.concurrency, "cpus": os.cpu_count(), "versions": versions()}
    print(f"{args.size_mib} MiB, median of {args.rounds} rounds, {settings['cpus']} CPUs; "
          f"parts: {f'{args.part_mib} MiB' if args.part_mib else 'each client its own'}, "
          f"in flight: {args.concurrency or 'each client its own'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items() if v))
    header = (f"{'server':<8}{'client':<18}{'up MiB/s':>10}{'up x':>7}"
              f"{'down MiB/s':>12}{'down x':>8}  check")
    print(header)
    print("-" * len(header))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['server']:<8}{r['client']:<18}  {r['status']}"
                  + (f": {r['note']}" if r["note"] else ""))
            continue

        def show(value: float | None, width: int) -> str:
            return f"{value if value is not None else '-':>{width}}"

        print(f"{r['server']:<8}{r['client']:<18}{show(r['upload_mib_s'], 10)}"
              f"{show(r['upload_vs_gpuscout'], 7)}{show(r['download_mib_s'], 12)}"
              f"{show(r['download_vs_gpuscout'], 8)}  {r['check']}")
    print("(x = the client's MiB/s / gpuscout's; gpuscout+torch's for s3torchconnector)")
    for r in results:
        if r["status"] == "ok" and r["note"]:
            print(f"{r['server']} {r['client']}: {r['note']}")
        if r["upload_paths"]:
            print(f"{r['server']} {r['client']} upload paths by round: "
                  + ", ".join(r["upload_paths"]))
    if any(r["check"] == "upload corrupt" and r["client"] == "s3transfer-crt" for r in results):
        notes.append("s3transfer-crt on s3rver: the CRT sends every part aws-chunked with a "
                     "trailing CRC32 (s3transfer always asks for it); s3rver 3 does not decode "
                     "aws-chunked and stores the framing with the bytes; its download was timed "
                     "on a reference copy")
    for note in notes:
        print(note)
    if args.json:
        print(json.dumps({"settings": settings, "results": results, "notes": notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
