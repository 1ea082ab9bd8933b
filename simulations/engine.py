"""Deterministic discrete-event engine: virtual clock, event heap, one seeded RNG, trace.

Every source of randomness in a simulation is drawn from :attr:`Simulator.rng`
(a :class:`random.Random` seeded once), including the order of events that
fall at the same virtual time: each event gets a random tie-break key when it
is scheduled. Nothing reads the wall clock and no set of strings is ever
iterated, so the same seed gives the same run, and the same :class:`Trace`
byte for byte, in any process (``PYTHONHASHSEED`` does not matter).

Time is virtual seconds (float) from 0.0.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from pathlib import Path
from typing import Callable


class SimulationError(Exception):
    """Misuse of the engine (e.g. scheduling into the past)."""


class Trace:
    """One line per delivered or dropped message and per core event.

    Lines are ``"<virtual seconds, 6 decimals> <text>"``; ``text`` comes from
    the messages' and actions' ``describe()``.
    """

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[str] = []

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def digest(self) -> str:
        """SHA-256 hex of :meth:`text` (UTF-8)."""
        h = hashlib.sha256()
        for line in self.lines:
            h.update(line.encode())
            h.update(b"\n")
        return h.hexdigest()

    def write(self, path: Path) -> None:
        Path(path).write_text(self.text(), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.lines)


class Simulator:
    """The event loop of one simulation run.

    Args:
        seed: seeds :attr:`rng`, the only randomness of the run (any int).
        trace: keep a :class:`Trace` (False for large benchmark runs: tracing
            formats a line per message).
    """

    def __init__(self, seed: int, *, trace: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.trace: Trace | None = Trace() if trace else None
        self.events_processed = 0
        self._heap: list[tuple[float, float, int, Callable, tuple]] = []
        self._seq = 0

    def schedule(self, at: float, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` at virtual time ``at`` (seconds, >= :attr:`now`).

        Events at equal times run in an order drawn from :attr:`rng`.
        Raises:
            SimulationError: ``at`` is before :attr:`now` or not finite.
        """
        if not at >= self.now or at == float("inf"):
            raise SimulationError(f"cannot schedule at {at!r} (now {self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (at, self.rng.random(), self._seq, fn, args))

    def log(self, text: str) -> None:
        """Append a trace line stamped with the current virtual time."""
        if self.trace is not None:
            self.trace.lines.append(f"{self.now:.6f} {text}")

    @property
    def pending(self) -> int:
        return len(self._heap)

    def next_time(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def run(self, until: float, stop: Callable[[], bool] | None = None,
            progress: Callable[[float], None] | None = None, progress_every: int = 5000) -> bool:
        """Process events up to virtual time ``until`` (inclusive).

        Args:
            until: virtual seconds.
            stop: checked after each event; the run returns True as soon as it is.
            progress: called with the virtual time every ``progress_every`` events.
        Returns:
            True if ``stop`` fired, else False (then :attr:`now` is ``until``).
        """
        heap = self._heap
        pop = heapq.heappop
        count = 0
        while heap and heap[0][0] <= until:
            at, _, _, fn, args = pop(heap)
            self.now = at
            fn(*args)
            count += 1
            if stop is not None and stop():
                self.events_processed += count
                return True
            if progress is not None and count % progress_every == 0:
                progress(at)
        self.events_processed += count
        if until > self.now:
            self.now = until
        return False
