"""The port conformance suite (tests/port_conformance.py) against the node's real ports:
the asyncio clock, ZeroMQ transports with CURVE on loopback and SQLite files
(tests/test_sim_ports.py runs the same suite against the simulator's)."""

from __future__ import annotations

import asyncio

import pytest

from chimera.node.ports import AsyncioClock, KeyDirectory, SqliteStore, ZmqPortTransport
from chimera.protocol.network import Network
from tests.port_conformance import ClockConformance, StoreConformance, TransportConformance


class NodeHarness:
    """Real ports on a private event loop; ``timeout_s`` is wall seconds."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.network = Network.create(name="ports")
        self.directory = KeyDirectory()
        self.opened: list[ZmqPortTransport] = []
        self.stores: list[SqliteStore] = []

    def clock(self):
        return AsyncioClock(self.loop)

    def transports(self, count):
        out = []
        for _ in range(count):
            t = self.loop.run_until_complete(ZmqPortTransport.open(self.network, self.directory))
            out.append(t)
            self.opened.append(t)
        return out

    def open_store(self, name):
        store = SqliteStore(self.tmp_path / f"{name}.sqlite3")
        self.stores.append(store)
        return store

    def crash_and_reopen(self, store, name):
        # a crash: the connection is abandoned as it is (no close, no checkpoint)
        return self.open_store(name)

    def run_until(self, predicate, timeout_s):
        async def wait() -> bool:
            deadline = self.loop.time() + timeout_s
            while not predicate():
                if self.loop.time() >= deadline:
                    return predicate()
                await asyncio.sleep(0.005)
            return True
        return self.loop.run_until_complete(wait())

    def settle(self, duration_s):
        self.loop.run_until_complete(asyncio.sleep(duration_s))

    def close(self) -> None:
        for t in self.opened:
            if not t.closed:
                t.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))  # let the socket closes run
        for store in self.stores:
            store.close()
        self.loop.close()


@pytest.fixture
def port_harness(tmp_path):
    harness = NodeHarness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


class TestNodeClock(ClockConformance):
    pass


class TestNodeTransport(TransportConformance):
    pass


class TestNodeStore(StoreConformance):
    pass


def test_a_transport_outside_the_network_is_refused(port_harness):
    """Beyond the port contract: the real transport's CURVE/ZAP admission (a frame from a
    transport of another network never reaches the handler)."""
    (member,) = port_harness.transports(1)
    got: list[bytes] = []
    member.set_handler(got.append)
    outsider = port_harness.loop.run_until_complete(
        ZmqPortTransport.open(Network.create(name="other"), port_harness.directory))
    port_harness.opened.append(outsider)
    assert outsider.send(member.address, b"let me in")  # queued: the handshake fails later
    (peer,) = port_harness.transports(1)
    assert peer.send(member.address, b"member frame")
    assert port_harness.run_until(lambda: b"member frame" in got, timeout_s=10.0)
    port_harness.settle(0.3)
    assert got == [b"member frame"]
    assert member.counters["handshakes_refused"] >= 1
