"""What every simulated peer has, whatever core it drives: identity, ports, envelopes.

A :class:`PeerHost` owns the in-memory ports (clock, transport, store), seals
outgoing messages into real signed envelopes
(:class:`~chimera.protocol.envelope.EnvelopeSealer`) and opens incoming frames
with the real strict :class:`~chimera.protocol.envelope.EnvelopeOpener`
(size, schema, recipient, clock skew, replay and signature checks), exactly as
the node does. A frame the opener rejects becomes a traced, counted drop.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from chimera.protocol.envelope import Envelope, EnvelopeOpener, EnvelopeSealer
from chimera.protocol.errors import RemoteProtocolError
from chimera.protocol.identity import SigningIdentity

from .behaviours import Behaviour, Outgoing, sybil_identity
from .engine import Simulator
from .network import SimNetwork
from .ports import SimClock, SimDisk, SimStore, SimTimer, SimTransport
from .signatures import SharedVerifier

SEQ_BLOCK = 1 << 20  # sequence numbers reserved per start (as node.store)
NETWORK_ID = hashlib.sha256(b"chimera-sim/network").digest()[:16]


def identity_for(index: int, salt: bytes = b"") -> SigningIdentity:
    """Deterministic signing identity of simulated peer ``index``."""
    return SigningIdentity(hashlib.sha256(b"chimera-sim/peer/" + salt + b"/%d" % index).digest())


def address_for(index: int) -> str:
    """The ``tcp://`` address of simulated peer ``index`` (10.0.0.0/8, port 7420)."""
    return f"tcp://10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}:7420"


@dataclass(frozen=True, slots=True)
class SkewSpec:
    """Per-peer clock error: offsets uniform in ``[-max_offset_s, max_offset_s]``,
    drift uniform in ``[-max_drift_ppm, max_drift_ppm]``."""

    max_offset_s: float = 0.0
    max_drift_ppm: float = 0.0


class World:
    """Shared state of one run: engine, network, disks, verifier, counters."""

    def __init__(self, sim: Simulator, network: SimNetwork, *, skew: SkewSpec | None = None) -> None:
        self.sim = sim
        self.network = network
        self.disk = SimDisk()
        self.verifier = SharedVerifier()
        self.network_id = NETWORK_ID
        self.skew = skew or SkewSpec()
        self.counters: Counter[str] = Counter()

    by_id: dict  # peer id -> peer (PeerHost), set by each world

    def address_of(self, peer_id: str) -> str | None:
        """The simulated address of a peer of this run, None for an unknown peer id."""
        peer = self.by_id.get(peer_id)
        return None if peer is None else address_for(peer.index)

    def make_clock(self, host: str) -> SimClock:
        rng = self.sim.rng
        offset = rng.uniform(-self.skew.max_offset_s, self.skew.max_offset_s) if self.skew.max_offset_s else 0.0
        drift = rng.uniform(-self.skew.max_drift_ppm, self.skew.max_drift_ppm) if self.skew.max_drift_ppm else 0.0
        return SimClock(self.sim, host, self.network, offset_s=offset, drift_ppm=drift)


class PeerHost:
    """Ports and envelopes of one simulated peer (subclasses add a core).

    Args:
        world: the run.
        index: peer number (names ``p<index>``, address, identity).
        behaviour: honest or a byzantine strategy.
    """

    def __init__(self, world: World, index: int, behaviour: Behaviour | None = None, *,
                 name: str | None = None, identity: SigningIdentity | None = None) -> None:
        self.world = world
        self.sim = world.sim
        self.index = index
        self.name = name or f"p{index}"
        self.identity = identity or identity_for(index)
        self.peer_id = self.identity.peer_id
        self.address = address_for(index)
        self.behaviour = behaviour or Behaviour()
        self.network_id = world.network_id
        self.clock = world.make_clock(self.name)
        self.rng = world.sim.rng  # the run's one RNG (behaviours draw from it)
        self.up = False
        self.transport: SimTransport | None = None
        self.store: SimStore | None = None
        self._sealers: dict[str, EnvelopeSealer] = {}
        self._opener: EnvelopeOpener | None = None
        self._timer: SimTimer | None = None
        self._timer_at = math.inf
        self._sybils = [sybil_identity(self.name, i) for i in range(self.behaviour.sybils)]
        self.counters: Counter[str] = Counter()

    # ---------------------------------------------------------- lifecycle

    def boot(self) -> None:
        """Open the store and transport (a fresh process on the same disk)."""
        self.store = self.world.disk.open(self.name)
        floor = int.from_bytes(self.store.get(b"seq_floor") or b"\x00", "big")
        first = max(floor, 1)
        self.store.put(b"seq_floor", (first + SEQ_BLOCK).to_bytes(8, "big"))
        self._sealers = {self.peer_id: EnvelopeSealer(self.identity, self.network_id, first_seq=first)}
        self._opener = EnvelopeOpener(self.peer_id, self.network_id)
        self._opener._verifier = self.world.verifier  # shared memo keyed by exact bytes
        self.transport = SimTransport(self.world.network, self.name, self.address)
        self.transport.set_handler(self._on_frame)
        self.up = True

    def crash(self) -> None:
        """Stop at once: nothing in memory survives, the store does."""
        self.up = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self.transport is not None:
            self.transport.close()
        self.transport = None
        self._opener = None
        self.sim.log(f"crash {self.name}")

    # ---------------------------------------------------------- timers

    def wake_at(self, deadline_local: float) -> None:
        """Call :meth:`on_wake` when the local clock reaches ``deadline_local``."""
        if deadline_local == self._timer_at and self._timer is not None and not self._timer.done:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline_local
        if deadline_local == math.inf:
            self._timer = None
            return
        self._timer = self.clock.call_at(deadline_local, self._wake)

    def _wake(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self.up:
            self.on_wake(self.clock.now())

    def on_wake(self, now: float) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------- messages

    def _sealer(self, identity: SigningIdentity) -> EnvelopeSealer:
        sealer = self._sealers.get(identity.peer_id)
        if sealer is None:
            sealer = self._sealers[identity.peer_id] = EnvelopeSealer(identity, self.network_id)
        return sealer

    def send_to(self, address: str, message: object, *, sender: SigningIdentity | None = None,
                corrupt: bool = False, recipient: str | None = None) -> bool:
        """Seal ``message`` (as ``sender``, default ourselves) and queue it for ``address``."""
        if not self.up or self.transport is None:
            return False
        frame = self._sealer(sender or self.identity).seal(message, sent_at_ms=self.clock.wall_ms(),
                                                          recipient=recipient)
        if corrupt:
            frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
        self.counters["sent"] += 1
        return self.transport.send(address, frame, message)

    def emit(self, outgoing: Sequence[Outgoing], address_of) -> None:
        """Seal and send each :class:`Outgoing` (one frame per destination)."""
        for out in outgoing:
            sealer = self._sealer(out.sender or self.identity)
            frame = sealer.seal(out.message, sent_at_ms=self.clock.wall_ms())
            if out.corrupt_envelope:
                frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
            for target in out.targets:
                address = address_of(target)
                if address is not None and self.transport is not None:
                    self.counters["sent"] += 1
                    self.transport.send(address, frame, out.message)

    def _on_frame(self, frame: bytes) -> None:
        if not self.up or self._opener is None:
            return
        try:
            envelope = self._opener.open(frame, self.clock.wall_ms())
        except RemoteProtocolError as exc:
            self.counters[f"drop_{exc.reason}"] += 1
            self.world.counters[f"envelope_drop_{exc.reason}"] += 1
            self.sim.log(f"reject {self.name}: {exc.reason}")
            return
        self.on_envelope(envelope)

    def on_envelope(self, envelope: Envelope) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------- behaviour context

    def sybil_identities(self) -> Sequence[SigningIdentity]:
        return self._sybils

    def honest_peer_ids(self) -> Sequence[str]:
        return ()
