"""Serving a control plane: uvicorn for the app, plus the plane's loops.

``run_server`` is what ``gpuscout up`` runs, in the foreground: it binds the
port first (so a busy port fails before any loop acts on the cloud), starts
the control plane loops, serves until SIGINT/SIGTERM, then stops the loops.

``ServerThread`` serves the same app from a background thread on a free
port, for tests and embedding: ``start()`` returns once the server accepts
connections, ``stop()`` once it has shut down (and the loops, if it started
them, have stopped).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn

from gpuscout.api import create_app
from gpuscout.service import Service


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (0: a free port).

    Raises OSError (e.g. EADDRINUSE) with the address in its message.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(service: Service, log_level: str, access_log: bool) -> uvicorn.Server:
    config = uvicorn.Config(create_app(service), log_level=log_level, access_log=access_log,
                            lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run_server(
    service: Service, host: str, port: int, *, log_level: str = "info",
    access_log: bool = True, on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until interrupted; the plane's loops run
    meanwhile. ``on_started(url)`` is called (in another thread) once the
    server accepts connections. A KeyboardInterrupt from the Ctrl-C that
    stopped the server propagates after the loops have stopped."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(service, log_level, access_log)
    if on_started is not None:
        url = base_url(sock)

        def notify() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                on_started(url)

        threading.Thread(target=notify, name="gpuscout-on-started", daemon=True).start()
    service.plane.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.plane.stop()
        sock.close()


class ServerThread:
    """uvicorn in a background thread. Use as a context manager, or call
    ``start()`` and ``stop()``. ``url`` is known from construction on."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, *,
                 start_plane: bool = False, log_level: str = "warning") -> None:
        self.service = service
        self.start_plane = start_plane
        self._sock = bind_socket(host, port)
        self.url = base_url(self._sock)
        self._server = _uvicorn_server(service, log_level, access_log=False)
        self._thread: threading.Thread | None = None
        self._plane_started = False

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        if self.start_plane:
            self.service.plane.start()
            self._plane_started = True
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="gpuscout-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down (idempotent): uvicorn first, so no request reaches a
        stopped plane, then the loops."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # a request that will not finish
                self._server.force_exit = True
                self._thread.join(timeout_s)
            self._thread = None
        if self._plane_started:
            self.service.plane.stop()
            self._plane_started = False
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
