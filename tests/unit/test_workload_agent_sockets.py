"""Where the agent listens: the control plane's address, and always loopback
for the workload (gpuscout.agent.server.bind_sockets)."""

from __future__ import annotations

import socket

import pytest

from gpuscout.agent.server import bind_sockets


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_loopback_or_wildcard_needs_one_socket(host: str) -> None:
    sockets, port, url = bind_sockets(host, 0)
    try:
        assert len(sockets) == 1 and port > 0
        assert url == f"http://127.0.0.1:{port}"
    finally:
        _close(sockets)


def test_ipv6_loopback_gives_an_ipv6_url() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        sockets, port, url = bind_sockets("::1", 0)
    except OSError:
        pytest.skip("::1 cannot be bound here")
    try:
        assert url == f"http://[::1]:{port}"
    finally:
        _close(sockets)


def _own_address() -> str | None:
    """A non-loopback address of this machine, if it has one (no traffic is
    sent: connecting a UDP socket only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_specific_address_also_binds_loopback_for_the_workload() -> None:
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    sockets, port, url = bind_sockets(address, 0)
    try:
        assert [s.getsockname() for s in sockets] == [(address, port), ("127.0.0.1", port)]
        assert url == f"http://127.0.0.1:{port}"
    finally:
        _close(sockets)
