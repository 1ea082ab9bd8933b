"""Simulated network: per-link latency distributions, bandwidth, loss, duplication,
reordering, partitions that heal, and peers that stall (slow processing).

Units: seconds (virtual) for every delay, bytes for sizes, bytes/s for
bandwidth, probabilities in [0, 1].

A frame sent at virtual time ``t`` from host A to host B:

1. is dropped at once if A and B are on different sides of an active
   :class:`Partition` (trace ``drop partition``);
2. occupies A's uplink for ``size / bandwidth`` seconds after the previous
   frame from A finished (serialization delay; infinite bandwidth: none);
3. is lost with the link's ``loss`` probability (trace ``drop loss``);
4. otherwise arrives after the link latency (sampled from its distribution),
   plus, with probability ``reorder``, an extra uniform delay in
   ``[0, reorder_delay_s]``; with probability ``duplicate`` a second copy
   with its own latency is delivered too;
5. a *slow* destination (overloaded CPU) handles it ``slow[host]`` seconds
   later (inbound processing delay);
6. at arrival, a closed transport (crashed peer) drops it (``drop down``); a
   stalled peer receives it when its stall ends.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from dataclasses import dataclass, field

from .engine import Simulator

LATENCY_KINDS = ("constant", "uniform", "lognormal")


@dataclass(frozen=True, slots=True)
class Latency:
    """A one-way latency distribution in seconds.

    * ``constant``: always ``a``;
    * ``uniform``: uniform in ``[a, b]``;
    * ``lognormal``: median ``a`` and shape ``sigma = b`` (``a * exp(sigma * N(0,1))``),
      the usual model of heavy-tailed internet delays.

    Raises:
        ValueError: unknown kind, negative values, ``b < a`` for uniform, or
            a non-positive median for lognormal.
    """

    kind: str
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LATENCY_KINDS:
            raise ValueError(f"latency kind must be one of {', '.join(LATENCY_KINDS)}, not {self.kind!r}")
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a < 0 or self.b < 0:
            raise ValueError("latency parameters must be finite and >= 0")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError("uniform latency needs max >= min")
        if self.kind == "lognormal" and self.a <= 0:
            raise ValueError("lognormal latency needs a median > 0")

    @classmethod
    def constant(cls, seconds: float) -> "Latency":
        return cls("constant", seconds)

    @classmethod
    def uniform(cls, lo_s: float, hi_s: float) -> "Latency":
        return cls("uniform", lo_s, hi_s)

    @classmethod
    def lognormal(cls, median_s: float, sigma: float) -> "Latency":
        return cls("lognormal", median_s, sigma)

    def sample(self, rng: random.Random) -> float:
        """One latency draw in seconds (>= 0)."""
        if self.kind == "constant":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return self.a * math.exp(self.b * rng.gauss(0.0, 1.0))

    def mean(self) -> float:
        """Expected value in seconds."""
        if self.kind == "constant":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a * math.exp(self.b * self.b / 2)

    def describe(self) -> str:
        if self.kind == "constant":
            return f"constant {self.a * 1e3:g} ms"
        if self.kind == "uniform":
            return f"uniform {self.a * 1e3:g}..{self.b * 1e3:g} ms"
        return f"lognormal median {self.a * 1e3:g} ms sigma {self.b:g}"


def _probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], not {value!r}")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Behaviour of the directed links between two regions (or the default link).

    Args:
        latency: one-way latency distribution.
        loss: probability a frame is lost, in [0, 1].
        duplicate: probability a delivered frame arrives twice, in [0, 1].
        reorder: probability a frame gets an extra delay, in [0, 1].
        reorder_delay_s: the extra delay is uniform in ``[0, reorder_delay_s]`` seconds.
    Raises:
        ValueError: a probability outside [0, 1] or a negative delay.
    """

    latency: Latency = field(default_factory=lambda: Latency.constant(0.005))
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay_s: float = 0.0

    def __post_init__(self) -> None:
        _probability("loss", self.loss)
        _probability("duplicate", self.duplicate)
        _probability("reorder", self.reorder)
        if not (math.isfinite(self.reorder_delay_s) and self.reorder_delay_s >= 0):
            raise ValueError("reorder_delay_s must be finite and >= 0")


@dataclass(frozen=True, slots=True)
class Partition:
    """Between ``start_s`` and ``end_s`` (virtual seconds; the heal), hosts in
    different ``groups`` cannot reach each other. Hosts in no group form one
    more group of their own."""

    start_s: float
    end_s: float
    groups: tuple[frozenset[str], ...]

    def __post_init__(self) -> None:
        if not (0 <= self.start_s < self.end_s):
            raise ValueError("a partition needs 0 <= start_s < end_s")

    def active(self, now: float) -> bool:
        return self.start_s <= now < self.end_s

    def separates(self, a: str, b: str) -> bool:
        ga = next((i for i, g in enumerate(self.groups) if a in g), -1)
        gb = next((i for i, g in enumerate(self.groups) if b in g), -1)
        return ga != gb

    def cuts(self, a: str, b: str, now: float) -> bool:
        """``a`` and ``b`` cannot reach each other at ``now``."""
        return self.start_s <= now < self.end_s and self.separates(a, b)


class FlappingPartition:
    """Between ``start_s`` and ``end_s``, alternate windows of ``flap_s`` seconds:
    window ``k = floor((now - start_s) / flap_s)`` is cut when ``k`` is even
    (side A: ``side_size`` of ``hosts``, a fresh random pick per cut window)
    and healed when it is odd.

    Windows are made when first needed, so a partition costs O(1) per frame
    whatever the number of windows. Each cut window's side is drawn from its
    own :class:`random.Random` seeded with ``(seed, window)``: the same seed
    gives the same sides in any process, whatever frames asked first.

    Raises:
        ValueError: ``0 <= start_s < end_s`` does not hold, ``flap_s`` is not
            > 0, or ``side_size`` is not in ``1..len(hosts) - 1``.
    """

    __slots__ = ("start_s", "end_s", "flap_s", "hosts", "side_size", "seed", "_window", "_side")

    def __init__(self, start_s: float, end_s: float, flap_s: float, hosts: list[str], side_size: int,
                 seed: int) -> None:
        if not (0 <= start_s < end_s):
            raise ValueError("a partition needs 0 <= start_s < end_s")
        if not (flap_s > 0 and math.isfinite(flap_s)):
            raise ValueError("flap_s must be finite and > 0")
        if not 1 <= side_size < len(hosts):
            raise ValueError("side_size must leave at least one host on each side")
        self.start_s, self.end_s, self.flap_s = start_s, end_s, flap_s
        self.hosts, self.side_size, self.seed = list(hosts), side_size, seed
        self._window = -1
        self._side: frozenset[str] = frozenset()

    def side(self, window: int) -> frozenset[str]:
        """Side A of cut window ``window`` (an even window index)."""
        if window != self._window:
            rng = random.Random((self.seed << 32) + window)
            self._window, self._side = window, frozenset(rng.sample(self.hosts, self.side_size))
        return self._side

    def cuts(self, a: str, b: str, now: float) -> bool:
        if not self.start_s <= now < self.end_s:
            return False
        window = int((now - self.start_s) // self.flap_s)
        if window % 2:
            return False
        side = self.side(window)
        return (a in side) != (b in side)


class SimNetwork:
    """Routes frames between :class:`~chimera.simulations.ports.SimTransport` endpoints.

    Args:
        sim: the engine (its RNG draws every loss, latency and duplicate).
        default: link used between hosts with no region-specific link.
        bandwidth_bytes_per_s: uplink rate of every host (None: infinite).
    Raises:
        ValueError: a bandwidth that is not > 0.
    """

    def __init__(self, sim: Simulator, default: LinkSpec | None = None, *,
                 bandwidth_bytes_per_s: float | None = None) -> None:
        if bandwidth_bytes_per_s is not None and not bandwidth_bytes_per_s > 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 (or None for infinite)")
        self.sim = sim
        self.default = default or LinkSpec()
        self.bandwidth = bandwidth_bytes_per_s
        self.region_of: dict[str, str] = {}
        self.links: dict[tuple[str, str], LinkSpec] = {}
        self.partitions: list[Partition | FlappingPartition] = []
        self.stalls: dict[str, list[tuple[float, float]]] = {}  # host -> sorted, disjoint spans
        self.slow: dict[str, float] = {}  # host -> inbound processing delay (s)
        self.endpoints: dict[str, object] = {}  # address -> SimTransport
        self.stats: Counter[str] = Counter()
        self._uplink_free: dict[str, float] = {}

    # ------------------------------------------------------------ topology

    def set_link(self, region_a: str, region_b: str, spec: LinkSpec, *, both_ways: bool = True) -> None:
        """Use ``spec`` for frames from region ``region_a`` to ``region_b``."""
        self.links[(region_a, region_b)] = spec
        if both_ways:
            self.links[(region_b, region_a)] = spec

    def link(self, src_host: str, dst_host: str) -> LinkSpec:
        if self.links:
            key = (self.region_of.get(src_host, ""), self.region_of.get(dst_host, ""))
            spec = self.links.get(key)
            if spec is not None:
                return spec
        return self.default

    def add_partition(self, partition: Partition | FlappingPartition) -> None:
        self.partitions.append(partition)

    def partitioned(self, a: str, b: str, now: float) -> bool:
        for p in self.partitions:
            if p.cuts(a, b, now):
                return True
        return False

    def add_stall(self, host: str, start_s: float, end_s: float) -> None:
        """``host`` processes nothing (frames, timers) in ``[start_s, end_s)``.

        Overlapping stalls merge. Adding in time order costs O(1);
        :meth:`stalled_until` is O(log stalls).
        """
        if not 0 <= start_s < end_s:
            raise ValueError("a stall needs 0 <= start_s < end_s")
        spans = self.stalls.setdefault(host, [])
        if not spans or spans[-1][0] <= start_s:
            i = len(spans)
        else:
            i = bisect.bisect_right(spans, (start_s, math.inf))
        # merge with the span before (if it reaches past start_s) and every span starting before end_s
        if i and spans[i - 1][1] > start_s:
            i -= 1
            start_s, end_s = spans[i][0], max(end_s, spans[i][1])
            del spans[i]
        while i < len(spans) and spans[i][0] < end_s:
            end_s = max(end_s, spans[i][1])
            del spans[i]
        spans.insert(i, (start_s, end_s))

    def stalled_until(self, host: str, now: float) -> float | None:
        """End of the stall ``host`` is in at ``now``, or None."""
        spans = self.stalls.get(host)
        if spans:
            i = bisect.bisect_right(spans, (now, math.inf)) - 1
            if i >= 0 and now < spans[i][1]:
                return spans[i][1]
        return None

    # ------------------------------------------------------------ delivery

    def register(self, transport) -> None:
        self.endpoints[transport.address] = transport

    def unregister(self, transport) -> None:
        if self.endpoints.get(transport.address) is transport:
            del self.endpoints[transport.address]

    def transmit(self, src, address: str, frame: bytes, note: object | None = None) -> None:
        """Carry ``frame`` from transport ``src`` to whatever listens at ``address``."""
        sim, rng, stats = self.sim, self.sim.rng, self.stats
        dst = self.endpoints.get(address)
        dst_host = dst.host if dst is not None else address
        size = len(frame)
        stats["frames_sent"] += 1
        stats["bytes_sent"] += size
        now = sim.now
        if self.partitions and self.partitioned(src.host, dst_host, now):
            stats["drop_partition"] += 1
            if sim.trace is not None:
                sim.log(f"drop partition {src.host}->{dst_host} {_label(note, size)}")
            return
        start = now
        if self.bandwidth is not None:
            start = max(now, self._uplink_free.get(src.host, 0.0))
            start += size / self.bandwidth
            self._uplink_free[src.host] = start
        spec = self.link(src.host, dst_host)
        if spec.loss and rng.random() < spec.loss:
            stats["drop_loss"] += 1
            if sim.trace is not None:
                sim.log(f"drop loss {src.host}->{dst_host} {_label(note, size)}")
            return
        copies = 2 if spec.duplicate and rng.random() < spec.duplicate else 1
        if copies == 2:
            stats["duplicated"] += 1
        extra = self.slow.get(dst_host, 0.0) if self.slow else 0.0
        for _ in range(copies):
            at = start + spec.latency.sample(rng) + extra
            if spec.reorder and rng.random() < spec.reorder:
                at += rng.uniform(0.0, spec.reorder_delay_s)
                stats["reordered"] += 1
            sim.schedule(at, self._arrive, src.host, address, frame, note)

    def _arrive(self, src_host: str, address: str, frame: bytes, note: object | None) -> None:
        sim = self.sim
        dst = self.endpoints.get(address)
        if dst is None or dst.closed:
            self.stats["drop_down"] += 1
            if sim.trace is not None:
                sim.log(f"drop down {src_host}->{address if dst is None else dst.host} "
                        f"{_label(note, len(frame))}")
            return
        if self.stalls:
            until = self.stalled_until(dst.host, sim.now)
            if until is not None:
                sim.schedule(until, self._arrive, src_host, address, frame, note)
                return
        self.stats["frames_delivered"] += 1
        if sim.trace is not None:
            sim.log(f"deliver {src_host}->{dst.host} {_label(note, len(frame))}")
        dst.deliver(frame)


def _label(note: object | None, size: int) -> str:
    describe = getattr(note, "describe", None)
    text = describe() if describe is not None else "frame"
    return f"{text} ({size} B)"
