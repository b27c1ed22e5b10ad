"""The route table: atomic switch, leases, and draining before terminate."""

import threading
import time

import pytest

from gpuscout.routing.router import NoRoute, Router


def test_switch_and_resolve() -> None:
    router = Router()
    with pytest.raises(NoRoute):
        router.resolve("job")
    router.switch("job", "a:1")
    assert router.resolve("job") == "a:1"
    router.switch("job", None)
    with pytest.raises(NoRoute):
        router.resolve("job")


def test_a_request_keeps_its_address_across_a_switch_and_drain_waits_for_it() -> None:
    router = Router()
    router.switch("job", "old:1")
    released = threading.Event()

    def request() -> None:
        with router.lease("job") as address:
            assert address == "old:1"
            released.wait(5)

    thread = threading.Thread(target=request)
    thread.start()
    while router.inflight("old:1") == 0:
        time.sleep(0.001)
    router.switch("job", "new:1")
    assert router.resolve("job") == "new:1"
    assert router.drain("old:1", timeout_s=0.05) is False  # still serving
    threading.Timer(0.05, released.set).start()
    assert router.drain("old:1", timeout_s=5) is True
    thread.join()
    assert router.inflight("old:1") == 0
