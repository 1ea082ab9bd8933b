"""Many SWIM/Lifeguard membership cores (:mod:`chimera.protocol.membership`) on a simulated network.

The driver does what ``node/runtime.py`` does with the core's actions, with
the in-memory ports: ``Send`` becomes a sealed envelope to the route learned
from ``Connect`` (a candidate only ever gets a ``Hello``, through its
contact), ``MemberEvent`` is recorded, the incarnation is persisted before a
refutation goes out and bumped at every start.

Metrics (see :meth:`MembershipWorld.metrics`): time from a crash to the first
suspicion of the crashed peer by anyone (SWIM's "detection time"), to its
``peer_failed`` at every live member, false suspicions and false failures of
live peers, and probes started.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from dataclasses import dataclass

from chimera.protocol.envelope import Envelope
from chimera.protocol.membership import (
    Connect,
    Member,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    PeerContact,
    Send,
)

from .behaviours import Behaviour
from .world import PeerHost, World


@dataclass(slots=True)
class EventRecord:
    at: float  # virtual seconds
    observer: str  # host name
    kind: str
    target: str  # host name
    incarnation: int
    local: bool  # raised by the observer's own timer (a failed probe / suspicion timeout)


class MembershipPeer(PeerHost):
    """A peer running the membership core (and, if byzantine, a behaviour)."""

    def __init__(self, world: "MembershipWorld", index: int, behaviour: Behaviour | None = None, **kw) -> None:
        super().__init__(world, index, behaviour, **kw)
        self.mworld = world
        self.contact = PeerContact(peer_id=self.peer_id,
                                   transport_key=hashlib.sha256(b"tk" + self.peer_id.encode()).digest(),
                                   addresses=(self.address,))
        self.core: Membership | None = None
        self.routes: dict[str, PeerContact] = {}
        self._incarnation = 0
        self._last_probe: object | None = None
        self.probes = 0

    def start(self, bootstrap: list[PeerContact]) -> None:
        self.boot()
        raw = self.store.get(b"incarnation")
        self._incarnation = (int.from_bytes(raw, "big") if raw else 0) + 1
        self.store.put(b"incarnation", self._incarnation.to_bytes(8, "big"))
        now = self.clock.now()
        self.core = Membership(self.contact, self._incarnation, self.mworld.config,
                               random.Random(self.sim.rng.getrandbits(64)), now)
        self.routes = {}
        for contact in bootstrap:
            if contact.peer_id != self.peer_id:
                self.core.add_candidate(contact, now, static=True)
        self.sim.log(f"start {self.name} inc={self._incarnation}")
        self.flush(False)

    def crash(self) -> None:
        super().crash()
        self.core = None

    def leave(self) -> None:
        """Graceful leave: announce, then stop."""
        if self.core is not None and self.up:
            self.core.leave(self.clock.now())
            self.flush(False)
        super().crash()
        self.core = None

    def on_envelope(self, envelope: Envelope) -> None:
        if self.core is None:
            return
        self.core.on_message(envelope.sender, envelope.message, self.clock.now())
        self.flush(False)

    def on_wake(self, now: float) -> None:
        if self.core is None:
            return
        self.core.tick(now)
        probe = self.core._probe  # read-only, for the probes-started metric
        if probe is not None and probe is not self._last_probe:
            self._last_probe = probe
            self.probes += 1
        self.flush(True)

    def flush(self, from_timer: bool) -> None:
        core = self.core
        if core is None:
            return
        if core.incarnation > self._incarnation:  # refuted: persist before it is sent
            self._incarnation = core.incarnation
            self.store.put(b"incarnation", self._incarnation.to_bytes(8, "big"))
        for action in core.take_actions():
            if isinstance(action, Send):
                if action.via is not None:
                    address = action.via.addresses[0]
                else:
                    route = self.routes.get(action.peer_id)
                    if route is None:
                        continue
                    address = route.addresses[0]
                if not self.behaviour.byzantine:
                    self.send_to(address, action.message, recipient=action.peer_id)
                    continue
                for out in self.behaviour.outgoing(self, action.message, (action.peer_id,)):
                    self.send_to(address, out.message, recipient=action.peer_id, sender=out.sender,
                                 corrupt=out.corrupt_envelope)
            elif isinstance(action, Connect):
                self.routes[action.contact.peer_id] = action.contact
            elif isinstance(action, MemberEvent):
                self.mworld.on_member_event(self, action, from_timer)
        self.wake_at(core.next_deadline())


class MembershipWorld(World):
    """A membership run: ``n`` peers, optional warm start, crashes, joins, restarts.

    Args:
        sim, network: engine and network.
        config: the membership core's timers (:class:`MembershipConfig`).
        warm_start: start from a converged membership (every peer's member table
            filled as if every signed Hello had been exchanged, at no message
            cost); otherwise peers join through ``bootstrap`` contacts.
    """

    def __init__(self, sim, network, config: MembershipConfig, *, skew=None) -> None:
        super().__init__(sim, network, skew=skew)
        self.config = config
        self.peers: list[MembershipPeer] = []
        self.by_id: dict[str, MembershipPeer] = {}
        self.events: list[EventRecord] = []
        self.crashed_at: dict[str, float] = {}  # host -> virtual time of its (last) crash
        self.down_since: dict[str, float] = {}
        self.restarted_at: dict[str, float] = {}

    def add_peer(self, behaviour: Behaviour | None = None) -> MembershipPeer:
        peer = MembershipPeer(self, len(self.peers), behaviour)
        self.peers.append(peer)
        self.by_id[peer.peer_id] = peer
        return peer

    def start_all(self, *, warm_start: bool, bootstrap_count: int = 1) -> None:
        seeds = [p.contact for p in self.peers[:bootstrap_count]]
        for peer in self.peers:
            peer.start([] if warm_start else seeds)
        if warm_start:
            now_by_peer = {p.name: p.clock.now() for p in self.peers}
            for peer in self.peers:
                now = now_by_peer[peer.name]
                members = peer.core.members
                for other in self.peers:
                    if other is not peer:
                        members[other.peer_id] = Member(contact=other.contact, incarnation=1,
                                                        state=MemberState.ALIVE, state_since=now,
                                                        last_seen=now, hello_incarnation=1)
                        peer.routes[other.peer_id] = other.contact
                peer.wake_at(peer.core.next_deadline())

    # ---------------------------------------------------------- churn

    def crash(self, peer: MembershipPeer) -> None:
        if peer.up:
            peer.crash()
            self.crashed_at[peer.name] = self.sim.now
            self.down_since[peer.name] = self.sim.now

    def restart(self, peer: MembershipPeer) -> None:
        if not peer.up:
            live = [p.contact for p in self.peers if p.up and p is not peer]
            boot = [self.sim.rng.choice(live)] if live else []
            peer.start(boot)
            self.down_since.pop(peer.name, None)
            self.restarted_at[peer.name] = self.sim.now

    def join(self, behaviour: Behaviour | None = None) -> MembershipPeer:
        live = [p.contact for p in self.peers if p.up]
        peer = self.add_peer(behaviour)
        peer.start([self.sim.rng.choice(live)] if live else [])
        return peer

    def leave(self, peer: MembershipPeer) -> None:
        if peer.up:
            peer.leave()
            self.down_since[peer.name] = self.sim.now

    # ---------------------------------------------------------- observation

    def on_member_event(self, observer: MembershipPeer, event: MemberEvent, local: bool) -> None:
        target = self.by_id.get(event.peer_id)
        name = target.name if target is not None else event.peer_id[:10]
        self.events.append(EventRecord(self.sim.now, observer.name, event.kind, name, event.incarnation, local))
        self.sim.log(f"event@{observer.name} {event.kind} {name} inc={event.incarnation}")

    def was_down(self, host: str, at: float) -> bool:
        since = self.down_since.get(host)
        return since is not None and since <= at

    def live_view_ok(self) -> bool:
        """Every live peer sees every other live peer alive or suspect."""
        live = [p for p in self.peers if p.up and p.core is not None]
        ok_states = (MemberState.ALIVE, MemberState.SUSPECT)
        for a in live:
            for b in live:
                if a is not b:
                    m = a.core.members.get(b.peer_id)
                    if m is None or m.state not in ok_states:
                        return False
        return True

    def metrics(self, duration_s: float) -> dict:
        """Detection and accuracy figures of the run (times in virtual seconds)."""
        first_suspect, all_failed, failed_mean = [], [], []
        for host, crash_t in sorted(self.crashed_at.items()):
            if host not in self.down_since:
                continue  # restarted: its detection still counts below if it happened
            sus = [e.at for e in self.events if e.target == host and e.kind == "peer_suspected"
                   and e.at >= crash_t]
            if sus:
                first_suspect.append(min(sus) - crash_t)
            observers = [p.name for p in self.peers if p.up and p.name != host]
            fails = {}
            for e in self.events:
                if e.target == host and e.kind == "peer_failed" and e.at >= crash_t and e.observer not in fails:
                    fails[e.observer] = e.at - crash_t
            if observers and all(o in fails for o in observers):
                all_failed.append(max(fails[o] for o in observers))
            if fails:
                failed_mean.append(statistics.fmean(fails.values()))
        false_suspect = [e for e in self.events if e.kind == "peer_suspected" and not self.was_down(e.target, e.at)]
        false_failed = [e for e in self.events if e.kind == "peer_failed" and not self.was_down(e.target, e.at)]
        local_false_suspect = [e for e in false_suspect if e.local]
        probes = sum(p.probes for p in self.peers)
        live_peer_seconds = sum(duration_s for _ in self.peers)
        out = {
            "peers": len(self.peers),
            "crashed": len(self.crashed_at),
            "detect_first_suspect_s": _mean(first_suspect),
            "detect_first_suspect_p95_s": _quantile(first_suspect, 0.95),
            "detect_all_failed_s": _mean(all_failed),
            "detect_failed_mean_s": _mean(failed_mean),
            "detected_by_all": len(all_failed),
            "probes": probes,
            "false_suspicions": len(false_suspect),
            "false_suspicions_local": len(local_false_suspect),
            "false_suspect_per_probe": (len(local_false_suspect) / probes) if probes else math.nan,
            "false_failures": len(false_failed),
            "false_failures_per_peer_hour": len(false_failed) / (live_peer_seconds / 3600.0) if live_peer_seconds else 0,
            "views_consistent": self.live_view_ok(),
        }
        return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
