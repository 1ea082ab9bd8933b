"""Ports: the three small interfaces a driver gives the pure cores (pure; no I/O here).

DESIGN.md, "Pure cores, two drivers": ``node/`` (asyncio + ZeroMQ + SQLite)
and ``simulations/`` (virtual clock + simulated network + in-memory disk)
drive the same cores and differ only in these ports. Each port is a
:class:`typing.Protocol`; a conformance suite (``tests/port_conformance.py``)
checks any implementation against the contracts written here.

Units: seconds as floats (monotonic, from :meth:`Clock.now`), wall time in
integer milliseconds (:meth:`Clock.wall_ms`, what goes into ``sent_at_ms``),
sizes in bytes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, runtime_checkable

FrameHandler = Callable[[bytes], None]
"""Called with each received frame (the exact bytes that were sent)."""


@runtime_checkable
class TimerHandle(Protocol):
    """A pending :meth:`Clock.call_at` callback."""

    def cancel(self) -> None:
        """Stop the callback from running; no effect if it already ran or was cancelled."""


@runtime_checkable
class Clock(Protocol):
    """Monotonic time and timers of one peer.

    Contract:
        * :meth:`now` never decreases (monotonic seconds; the origin is arbitrary).
        * a callback scheduled with :meth:`call_at` runs at most once, never
          before ``when_s`` (``now() >= when_s`` inside it), and callbacks with
          distinct deadlines run in deadline order; a cancelled one never runs.
        * :meth:`wall_ms` is the peer's idea of Unix time in integer ms (it may be
          skewed against other peers; envelopes tolerate
          ``DEFAULT_MAX_CLOCK_SKEW_MS``).
    """

    def now(self) -> float:
        """Monotonic seconds."""

    def wall_ms(self) -> int:
        """Unix time in milliseconds (int >= 0)."""

    def call_at(self, when_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` once at monotonic time ``when_s`` (at once if already past)."""


@runtime_checkable
class Transport(Protocol):
    """Unreliable datagram-like delivery of signed frames between peers.

    Contract:
        * :meth:`send` never raises for a well-formed call; it returns False
          (and the frame is never delivered) when the frame is larger than
          :attr:`max_message_bytes` or the transport is closed; True means
          "queued", not "delivered".
        * a delivered frame is byte-identical to the frame sent; there is no
          ordering guarantee and, on a lossy network, no delivery guarantee
          (the envelope layer drops duplicates and replays).
        * on a healthy link every queued frame is delivered to the handler set
          with :meth:`set_handler` at the destination address (eventually).
        * after :meth:`close` no frame is delivered to this transport's handler
          and :meth:`send` returns False.
    """

    @property
    def address(self) -> str:
        """The address other peers send to (``tcp://HOST:PORT`` for the node)."""

    @property
    def max_message_bytes(self) -> int:
        """Largest frame :meth:`send` accepts (bytes)."""

    def set_handler(self, handler: FrameHandler) -> None:
        """Receive every delivered frame with ``handler(frame)``."""

    def send(self, address: str, frame: bytes) -> bool:
        """Queue ``frame`` for the peer listening at ``address``."""

    def close(self) -> None:
        """Stop sending and receiving (idempotent)."""


@runtime_checkable
class Store(Protocol):
    """Durable key/value state of one peer (sign state, committed log, tables).

    Contract:
        * keys and values are bytes; :meth:`get` returns exactly what the last
          :meth:`put` or :meth:`put_many` stored, or None.
        * a write is durable when the call returns: the same store reopened
          after a crash (no close) returns it (DESIGN.md, "commit before
          acknowledging").
        * :meth:`put_many` is atomic: after a crash either all or none of its
          items are visible.
        * :meth:`scan` yields ``(key, value)`` for keys starting with ``prefix``
          in ascending byte order.
    Raises:
        TypeError: a key or value that is not bytes.
    """

    def get(self, key: bytes) -> bytes | None:
        """The value stored at ``key`` or None."""

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` at ``key`` durably."""

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Store several items atomically."""

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (no error if absent)."""

    def scan(self, prefix: bytes = b"") -> Iterable[tuple[bytes, bytes]]:
        """Items whose key starts with ``prefix``, ascending by key."""
