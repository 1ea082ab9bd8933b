"""In-memory implementations of the ports of :mod:`chimera.protocol.ports`.

* :class:`SimClock`: a peer's view of the virtual clock, with a fixed offset
  and a drift rate (clock skew); timers run on the :class:`Simulator` heap and
  are deferred while the peer is stalled.
* :class:`SimTransport`: an endpoint of a :class:`SimNetwork`.
* :class:`SimStore` over a :class:`SimDisk`: every write is durable when the
  call returns, so a peer "crashed" (its objects dropped) and restarted with
  the same disk name finds exactly what it wrote.

They pass the same conformance suite as the node's ports
(``tests/port_conformance.py``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Callable, Iterable

from .engine import Simulator
from .network import SimNetwork

WALL_EPOCH_S = 1_700_000_000.0
"""Unix time (seconds) that virtual time 0.0 maps to in :meth:`SimClock.wall_ms`."""

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class SimTimer:
    """Handle of a :meth:`SimClock.call_at` callback."""

    __slots__ = ("cancelled", "done")

    def __init__(self) -> None:
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        self.cancelled = True


class SimClock:
    """Local clock of one simulated peer.

    ``now() = offset_s + t * (1 + drift_ppm * 1e-6)`` for virtual time ``t``.

    Args:
        sim: the engine.
        host: the peer's host name (for stalls).
        network: consulted for stalls of ``host`` (None: never stalled).
        offset_s: constant offset in seconds (any finite value; it shifts
            :meth:`wall_ms` too, which envelopes check against
            ``max_clock_skew_ms``).
        drift_ppm: rate error in parts per million, in (-1e6, 1e6).
    Raises:
        ValueError: a non-finite offset or a drift out of range.
    """

    def __init__(self, sim: Simulator, host: str = "", network: SimNetwork | None = None, *,
                 offset_s: float = 0.0, drift_ppm: float = 0.0) -> None:
        if not math.isfinite(offset_s) or not -1e6 < drift_ppm < 1e6:
            raise ValueError("offset_s must be finite and drift_ppm in (-1e6, 1e6)")
        self.sim = sim
        self.host = host
        self.network = network
        self.offset_s = offset_s
        self.rate = 1.0 + drift_ppm * 1e-6

    def local(self, t: float) -> float:
        """Local clock reading at virtual time ``t``."""
        return self.offset_s + t * self.rate

    def to_virtual(self, local_s: float) -> float:
        """Earliest virtual time at which the local clock reads >= ``local_s``."""
        t = (local_s - self.offset_s) / self.rate
        while self.local(t) < local_s:
            t = math.nextafter(t, math.inf)
        return t

    def now(self) -> float:
        return self.offset_s + self.sim.now * self.rate

    def wall_ms(self) -> int:
        return max(0, int((WALL_EPOCH_S + self.now()) * 1000.0))

    def call_at(self, when_s: float, callback: Callable[[], None]) -> SimTimer:
        handle = SimTimer()
        at = max(self.sim.now, self.to_virtual(when_s))
        self.sim.schedule(at, self._fire, handle, callback)
        return handle

    def _fire(self, handle: SimTimer, callback: Callable[[], None]) -> None:
        if handle.cancelled or handle.done:
            return
        if self.network is not None and self.network.stalls:
            until = self.network.stalled_until(self.host, self.sim.now)
            if until is not None:
                self.sim.schedule(until, self._fire, handle, callback)
                return
        handle.done = True
        callback()


class SimTransport:
    """An endpoint of a :class:`SimNetwork` listening at ``address``.

    Args:
        network: the simulated network.
        host: host name (partitions, regions, stalls, trace).
        address: where other peers send to (unique per live endpoint).
        max_message_bytes: larger frames are refused by :meth:`send`.
    """

    def __init__(self, network: SimNetwork, host: str, address: str, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.network = network
        self.host = host
        self._address = address
        self._max = max_message_bytes
        self._handler: Callable[[bytes], None] | None = None
        self.closed = False
        network.register(self)

    @property
    def address(self) -> str:
        return self._address

    @property
    def max_message_bytes(self) -> int:
        return self._max

    def set_handler(self, handler: Callable[[bytes], None]) -> None:
        self._handler = handler

    def send(self, address: str, frame: bytes, note: object | None = None) -> bool:
        """Queue ``frame``; ``note`` (anything with ``describe()``) labels it in the trace."""
        if self.closed or type(frame) is not bytes:
            return False
        if len(frame) > self._max:
            self.network.stats["drop_oversize"] += 1
            return False
        self.network.transmit(self, address, frame, note)
        return True

    def deliver(self, frame: bytes) -> None:
        if not self.closed and self._handler is not None:
            self._handler(frame)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.network.unregister(self)


class SimDisk:
    """The durable state of every simulated peer, by disk name (survives crashes)."""

    def __init__(self) -> None:
        self.volumes: dict[str, dict[bytes, bytes]] = {}

    def open(self, name: str) -> "SimStore":
        return SimStore(self.volumes.setdefault(name, {}))

    def wipe(self, name: str) -> None:
        """Lose a peer's disk (a replaced machine)."""
        self.volumes.pop(name, None)


def _check(key: object, value: object = b"") -> None:
    if type(key) is not bytes or type(value) is not bytes:
        raise TypeError("store keys and values are bytes")


class SimStore:
    """Key/value store over one :class:`SimDisk` volume; every write is durable at once."""

    def __init__(self, volume: dict[bytes, bytes]) -> None:
        self._data = volume
        self._sorted: list[bytes] | None = None

    def get(self, key: bytes) -> bytes | None:
        _check(key)
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        _check(key, value)
        if key not in self._data:
            self._sorted = None
        self._data[key] = value

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = list(items)
        for key, value in items:  # validate all first: all or nothing
            _check(key, value)
        for key, value in items:
            self.put(key, value)

    def delete(self, key: bytes) -> None:
        _check(key)
        if self._data.pop(key, None) is not None:
            self._sorted = None

    def scan(self, prefix: bytes = b"") -> Iterable[tuple[bytes, bytes]]:
        _check(prefix)
        if self._sorted is None:
            self._sorted = sorted(self._data)
        keys = self._sorted
        out = []
        for i in range(bisect_left(keys, prefix), len(keys)):
            key = keys[i]
            if not key.startswith(prefix):
                break
            value = self._data.get(key)
            if value is not None:
                out.append((key, value))
        return out
