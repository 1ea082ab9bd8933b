"""Reusable conformance suite for the ports of ``chimera.protocol.ports``.

Run it against any implementation by subclassing the test classes below in a
test module and providing one fixture, ``port_harness``, that returns a
:class:`PortHarness` for that implementation::

    from tests.port_conformance import ClockConformance, StoreConformance, TransportConformance

    @pytest.fixture
    def port_harness(tmp_path):
        return MyRealHarness(tmp_path)

    class TestMyClock(ClockConformance): pass
    class TestMyTransport(TransportConformance): pass
    class TestMyStore(StoreConformance): pass

``tests/test_sim_ports.py`` does this for the simulator's in-memory ports; the
node's real ports (asyncio clock, ZeroMQ transport, SQLite store) plug in the
same way, with a harness whose :meth:`PortHarness.run_until` drives the event
loop. The suite never sleeps for a fixed time and asserts on no timing other
than the contracts' orderings; waits are bounded by ``timeout_s`` (virtual
seconds for the simulator, wall seconds for the node).
"""

from __future__ import annotations

from typing import Callable, Protocol

import pytest

from chimera.protocol.ports import Clock, Store, Transport


class PortHarness(Protocol):
    """How the suite creates and drives one implementation's ports."""

    def clock(self) -> Clock:
        """A clock (a fresh one, or the shared one of the implementation)."""

    def transports(self, count: int) -> list[Transport]:
        """``count`` open transports that can reach each other by ``address``."""

    def open_store(self, name: str) -> Store:
        """The store called ``name`` (created empty on first open)."""

    def crash_and_reopen(self, store: Store, name: str) -> Store:
        """Abandon ``store`` without closing it (a crash) and open ``name`` again."""

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Drive the implementation until ``predicate()`` or ``timeout_s``; return ``predicate()``."""

    def settle(self, duration_s: float) -> None:
        """Drive the implementation for ``duration_s`` (to show something does *not* happen)."""


class ClockConformance:
    """Contract of :class:`chimera.protocol.ports.Clock`."""

    def test_is_a_clock(self, port_harness):
        assert isinstance(port_harness.clock(), Clock)

    def test_now_never_decreases_and_wall_ms_is_int(self, port_harness):
        clock = port_harness.clock()
        readings = [clock.now()]
        for _ in range(5):
            port_harness.settle(0.01)
            readings.append(clock.now())
        assert readings == sorted(readings)
        wall = clock.wall_ms()
        assert type(wall) is int and wall >= 0

    def test_callbacks_run_once_in_deadline_order_never_early(self, port_harness):
        clock = port_harness.clock()
        start = clock.now()
        fired: list[tuple[str, float, float]] = []
        deadlines = {"c": start + 0.03, "a": start + 0.01, "b": start + 0.02}
        for name, when in deadlines.items():
            clock.call_at(when, lambda name=name, when=when: fired.append((name, when, clock.now())))
        assert port_harness.run_until(lambda: len(fired) == 3, timeout_s=5.0)
        assert [name for name, _, _ in fired] == ["a", "b", "c"]
        assert all(ran_at >= when for _, when, ran_at in fired)
        port_harness.settle(0.05)
        assert len(fired) == 3  # each ran once

    def test_cancelled_callback_never_runs(self, port_harness):
        clock = port_harness.clock()
        fired: list[str] = []
        handle = clock.call_at(clock.now() + 0.01, lambda: fired.append("cancelled"))
        clock.call_at(clock.now() + 0.02, lambda: fired.append("kept"))
        handle.cancel()
        handle.cancel()  # idempotent
        assert port_harness.run_until(lambda: "kept" in fired, timeout_s=5.0)
        port_harness.settle(0.05)
        assert fired == ["kept"]

    def test_past_deadline_runs_promptly(self, port_harness):
        clock = port_harness.clock()
        fired: list[float] = []
        clock.call_at(clock.now() - 10.0, lambda: fired.append(clock.now()))
        assert port_harness.run_until(lambda: bool(fired), timeout_s=5.0)


class TransportConformance:
    """Contract of :class:`chimera.protocol.ports.Transport`."""

    def test_is_a_transport(self, port_harness):
        (a,) = port_harness.transports(1)
        assert isinstance(a, Transport)
        assert isinstance(a.address, str) and a.address
        assert a.max_message_bytes >= 65536

    def test_frames_arrive_byte_identical(self, port_harness):
        a, b = port_harness.transports(2)
        got: list[bytes] = []
        b.set_handler(got.append)
        frames = [bytes([i]) * (i * 37 + 1) for i in range(20)] + [b"\x00" * 60000]
        for frame in frames:
            assert a.send(b.address, frame) is True
        assert port_harness.run_until(lambda: len(got) >= len(frames), timeout_s=10.0)
        assert sorted(got) == sorted(frames)  # no ordering guarantee, no corruption

    def test_both_directions_and_many_peers(self, port_harness):
        peers = port_harness.transports(4)
        inbox: dict[int, list[bytes]] = {i: [] for i in range(len(peers))}
        for i, t in enumerate(peers):
            t.set_handler(inbox[i].append)
        for i, src in enumerate(peers):
            for j, dst in enumerate(peers):
                if i != j:
                    assert src.send(dst.address, b"%d->%d" % (i, j))
        want = len(peers) - 1
        assert port_harness.run_until(lambda: all(len(v) >= want for v in inbox.values()), timeout_s=10.0)
        for j, frames in inbox.items():
            assert sorted(frames) == sorted(b"%d->%d" % (i, j) for i in range(len(peers)) if i != j)

    def test_oversize_frame_is_refused_and_never_delivered(self, port_harness):
        a, b = port_harness.transports(2)
        got: list[bytes] = []
        b.set_handler(got.append)
        assert a.send(b.address, b"x" * (a.max_message_bytes + 1)) is False
        assert a.send(b.address, b"marker")
        assert port_harness.run_until(lambda: b"marker" in got, timeout_s=10.0)
        assert got == [b"marker"]

    def test_closed_transport_neither_sends_nor_receives(self, port_harness):
        a, b = port_harness.transports(2)
        got: list[bytes] = []
        b.set_handler(got.append)
        b.close()
        b.close()  # idempotent
        a.send(b.address, b"to a closed peer")  # must not raise
        port_harness.settle(0.5)
        assert got == []
        a.close()
        assert a.send(b.address, b"from a closed peer") is False

    def test_unknown_address_does_not_raise(self, port_harness):
        (a,) = port_harness.transports(1)
        a.send("tcp://192.0.2.1:9", b"nobody there")  # TEST-NET-1: never routed
        port_harness.settle(0.05)


class StoreConformance:
    """Contract of :class:`chimera.protocol.ports.Store`."""

    def test_is_a_store(self, port_harness):
        assert isinstance(port_harness.open_store("s0"), Store)

    def test_put_get_delete(self, port_harness):
        store = port_harness.open_store("s1")
        assert store.get(b"missing") is None
        store.put(b"k", b"v1")
        store.put(b"k", b"v2")
        store.put(b"empty", b"")
        assert store.get(b"k") == b"v2" and store.get(b"empty") == b""
        store.delete(b"k")
        store.delete(b"k")  # absent: no error
        assert store.get(b"k") is None

    def test_scan_is_ordered_by_key_within_prefix(self, port_harness):
        store = port_harness.open_store("s2")
        for h in (10, 2, 33, 1):
            store.put(b"commit/%016d" % h, b"%d" % h)
        store.put(b"commits-not", b"x")
        store.put(b"a", b"x")
        assert [v for _, v in store.scan(b"commit/")] == [b"1", b"2", b"10", b"33"]
        keys = [k for k, _ in store.scan()]
        assert keys == sorted(keys) and len(keys) == 6

    def test_writes_survive_a_crash(self, port_harness):
        store = port_harness.open_store("s3")
        store.put(b"sign_state", b"h=5 r=2 precommit")
        store.put_many([(b"commit/1", b"a"), (b"commit/2", b"b")])
        reopened = port_harness.crash_and_reopen(store, "s3")
        assert reopened.get(b"sign_state") == b"h=5 r=2 precommit"
        assert [v for _, v in reopened.scan(b"commit/")] == [b"a", b"b"]

    def test_stores_are_separate(self, port_harness):
        a, b = port_harness.open_store("s4"), port_harness.open_store("s5")
        a.put(b"k", b"a")
        assert b.get(b"k") is None

    def test_put_many_is_all_or_nothing_on_bad_input(self, port_harness):
        store = port_harness.open_store("s6")
        with pytest.raises(TypeError):
            store.put_many([(b"ok", b"1"), ("not bytes", b"2")])  # type: ignore[list-item]
        assert store.get(b"ok") is None
        with pytest.raises(TypeError):
            store.put(b"k", "not bytes")  # type: ignore[arg-type]
