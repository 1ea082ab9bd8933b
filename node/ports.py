"""The node's real implementations of the ports of :mod:`chimera.protocol.ports`.

DESIGN.md, "Pure cores, two drivers": the simulator's in-memory ports
(``chimera.simulations.ports``) and these are checked by the same conformance
suite (``tests/port_conformance.py``; ``tests/test_node_ports.py`` runs it
here), so what the simulator assumes of a clock, a transport and a store is
what the node's asyncio loop, ZeroMQ sockets and SQLite file provide.

* :class:`AsyncioClock`: the event loop's monotonic clock and its timers.
* :class:`ZmqPortTransport`: frames over the node's CURVE-encrypted ZeroMQ
  transport (:class:`chimera.node.transport.Transport`). A ZeroMQ peer is
  reached with its address *and* its CURVE server key; the node learns keys
  from signed hellos, this adapter from a shared :class:`KeyDirectory`.
* :class:`SqliteStore`: a key/value table in SQLite (WAL, ``synchronous=FULL``:
  a write is durable when the call returns; ``put_many`` is one transaction).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from chimera.protocol.network import Network
from chimera.protocol.ports import FrameHandler

from .transport import Transport


class _Timer:
    __slots__ = ("handle", "cancelled")

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class AsyncioClock:
    """:class:`~chimera.protocol.ports.Clock` on an asyncio event loop.

    ``now()`` is ``loop.time()`` (monotonic seconds). asyncio may run a timer up
    to its clock resolution early; the contract says never before ``when_s``,
    so an early callback is re-armed for the remainder.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def now(self) -> float:
        return self.loop.time()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, when_s: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer()

        def fire() -> None:
            if timer.cancelled:
                return
            if self.loop.time() < when_s:  # asyncio ran it within its clock resolution: wait the rest
                timer.handle = self.loop.call_at(when_s, fire)
                return
            timer.cancelled = True  # at most once
            callback()

        timer.handle = self.loop.call_at(when_s, fire)
        return timer


class KeyDirectory(dict):
    """``address -> CURVE server public key`` (32 raw bytes) of reachable transports."""


class ZmqPortTransport:
    """:class:`~chimera.protocol.ports.Transport` over the node's ZeroMQ transport.

    Create with :meth:`open` (binds a ROUTER on ``host``, registers the address
    and key in ``directory``). ``send`` returns False for a frame over
    ``max_message_bytes``, an address without a known key, a full queue, or
    after :meth:`close`; True means queued.
    """

    def __init__(self, transport: Transport, address: str, directory: KeyDirectory) -> None:
        self._transport = transport
        self._address = address
        self._directory = directory
        self._handler: FrameHandler | None = None
        self.closed = False
        self.counters = transport.counters
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(cls, network: Network, directory: KeyDirectory, *, host: str = "127.0.0.1",
                   max_message_bytes: int = 1 << 20) -> "ZmqPortTransport":
        import zmq

        public, secret = zmq.curve_keypair()
        from zmq.utils import z85

        server_public, server_secret = z85.decode(public), z85.decode(secret)
        holder: list[ZmqPortTransport] = []
        counters: Counter = Counter()
        transport = Transport(network, server_secret, server_public,
                              on_frames=lambda batch: holder[0]._deliver(batch), counters=counters,
                              on_drop=lambda reason, who, detail: counters.update([f"drop_{reason}"]),
                              max_message_bytes=max_message_bytes, send_hwm=1000, recv_hwm=10000)
        port = await transport.start(host, 0)
        address = f"tcp://{host}:{port}"
        self = cls(transport, address, directory)
        self._loop = asyncio.get_running_loop()
        holder.append(self)
        directory[address] = server_public
        return self

    @property
    def address(self) -> str:
        return self._address

    @property
    def max_message_bytes(self) -> int:
        return self._transport.max_message_bytes

    def set_handler(self, handler: FrameHandler) -> None:
        self._handler = handler

    def send(self, address: str, frame: bytes) -> bool:
        if self.closed or len(frame) > self.max_message_bytes:
            return False
        key = self._directory.get(address)
        if key is None:
            return False
        return self._transport.send(key, address, frame)

    def _deliver(self, batch: list[tuple[bytes, bytes]]) -> None:
        if self.closed or self._handler is None:
            return
        for _conn, frame in batch:
            self._handler(frame)

    def close(self) -> None:
        """Stop sending and delivering at once; the sockets close on the event loop."""
        if self.closed:
            return
        self.closed = True
        self._directory.pop(self._address, None)
        loop = self._loop or asyncio.get_event_loop()
        loop.create_task(self._transport.close())


def _check(*items: object) -> None:
    for item in items:
        if type(item) is not bytes:
            raise TypeError(f"keys and values are bytes, not {type(item).__name__}")


class SqliteStore:
    """:class:`~chimera.protocol.ports.Store` as one SQLite table (WAL, ``synchronous=FULL``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL)")

    def get(self, key: bytes) -> bytes | None:
        _check(key)
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: bytes, value: bytes) -> None:
        _check(key, value)
        self.db.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, value))

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = list(items)
        for key, value in items:  # all checked before anything is written: all or nothing
            _check(key, value)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT INTO kv(key, value) VALUES(?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value=excluded.value", items)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def delete(self, key: bytes) -> None:
        _check(key)
        self.db.execute("DELETE FROM kv WHERE key=?", (key,))

    def scan(self, prefix: bytes = b"") -> Iterable[tuple[bytes, bytes]]:
        """BLOB keys compare bytewise (memcmp) in SQLite, so ``ORDER BY key`` is byte order."""
        _check(prefix)
        rows = self.db.execute("SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,))
        for key, value in rows:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            yield key, bytes(value)

    def close(self) -> None:
        self.db.close()
