"""Many SWIM/Lifeguard membership cores (:mod:`chimera.protocol.membership`) on a simulated network.

The driver does what ``node/runtime.py`` does with the core's actions, with
the in-memory ports: ``Send`` becomes a sealed envelope to the route learned
from ``Connect`` (a candidate only ever gets a ``Hello``, through its
contact), ``MemberEvent`` is recorded, the incarnation is persisted before a
refutation goes out and bumped at every start. Each peer signs its alive claims
with its identity key (PROTOCOL s10.3); signatures are checked through the
world's shared verifier (one real check per exact signed bytes).

Metrics (see :meth:`MembershipWorld.metrics`): time from a crash to the first
suspicion of the crashed peer by anyone (SWIM's "detection time"), to its
``peer_failed`` at every live member, false suspicions and false failures of
live peers, and probes started.

Scale: a warm start of ``n`` peers holds ``n * (n - 1)`` member rows (about
130 bytes each); the rows are built with the garbage collector paused and then
frozen out of its view (:func:`gc.freeze`) once there are many of them, so it
never walks them. Peers of a warm start share one route table instead of
holding ``n`` routes each.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import math
import operator
import random
import statistics
from dataclasses import dataclass

from chimera.protocol.envelope import Envelope
from chimera.protocol.membership import (
    ALIVE_PROOF_CAPABILITY,
    AliveProofs,
    Connect,
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
                                   addresses=(self.address,), capabilities=(ALIVE_PROOF_CAPABILITY,))
        # signs our alive claims; checks others' through the world's shared memo (PROTOCOL s10.3)
        self.proofs = AliveProofs(world.network_id, self.identity.sign, world.verifier.verify)
        self.core: Membership | None = None
        self.routes: dict[str, PeerContact] = {}
        # a warm start's routes (every peer's contact), shared by the peers of that start;
        # self.routes (learned from Connect) comes first. A restart drops both.
        self.warm_routes: dict[str, PeerContact] | None = None
        self._incarnation = 0
        self._last_probe: object | None = None
        self.probes = 0
        self._next_flood = math.inf  # a byzantine behaviour's extra traffic (Behaviour.flood)

    def start(self, bootstrap: list[PeerContact]) -> None:
        self.boot()
        raw = self.store.get(b"incarnation")
        self._incarnation = (int.from_bytes(raw, "big") if raw else 0) + 1
        self.store.put(b"incarnation", self._incarnation.to_bytes(8, "big"))
        now = self.clock.now()
        self.core = Membership(self.contact, self._incarnation, self.mworld.config,
                               random.Random(self.sim.rng.getrandbits(64)), now, proofs=self.proofs)
        self.routes = {}
        self.warm_routes = None
        interval = self.behaviour.flood_interval_s
        self._next_flood = now + interval if interval else math.inf
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
        if now >= self._next_flood:
            self._next_flood = now + self.behaviour.flood_interval_s
            alive = tuple(pid for pid, m in self.core.members.items() if m.state is MemberState.ALIVE)
            self.emit(self.behaviour.flood(self, alive), self._address_of)
        self.flush(True)

    def _address_of(self, peer_id: str) -> str | None:
        route = self.routes.get(peer_id)
        if route is None and self.warm_routes is not None:
            route = self.warm_routes.get(peer_id)
        return route.addresses[0] if route is not None else None

    def flush(self, from_timer: bool) -> None:
        core = self.core
        if core is None:
            return
        if core.incarnation > self._incarnation:  # refuted: persist before it is sent
            self._incarnation = core.incarnation
            self.store.put(b"incarnation", self._incarnation.to_bytes(8, "big"))
        for action in core.take_actions():
            if isinstance(action, Send):
                address = action.via.addresses[0] if action.via is not None else self._address_of(action.peer_id)
                if address is None:
                    continue
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
        self.wake_at(min(core.next_deadline(), self._next_flood))


class MembershipWorld(World):
    """A membership run: ``n`` peers, optional warm start, crashes, joins, restarts.

    Args:
        sim, network: engine and network.
        config: the membership core's timers (:class:`MembershipConfig`).
        warm_start: start from a converged membership (every peer's member table
            filled as if every signed Hello had been exchanged, at no message
            cost); otherwise peers join through ``bootstrap`` contacts.
    """

    # a warm start with at least this many member rows freezes them out of the GC's view
    GC_FREEZE_ROWS = 250_000

    def __init__(self, sim, network, config: MembershipConfig, *, skew=None) -> None:
        super().__init__(sim, network, skew=skew)
        self.config = config
        self.peers: list[MembershipPeer] = []
        self.by_id: dict[str, MembershipPeer] = {}
        self.events: list[EventRecord] = []
        self.sybil_hosts: set[str] = set()
        # host -> its runs: (virtual start time, first incarnation), in order
        self.runs: dict[str, list[tuple[float, int]]] = {}
        # host -> its down intervals [start, end] (end inf while down) with how each began
        self.down_intervals: dict[str, list[list]] = {}  # [start_s, end_s, "crash" | "leave"]

    def add_peer(self, behaviour: Behaviour | None = None, *, sybil: bool = False) -> MembershipPeer:
        """A new (not yet started) peer; ``sybil``: an extra identity of a byzantine
        operator (it behaves honestly but is not counted as an honest peer in metrics)."""
        peer = MembershipPeer(self, len(self.peers), behaviour)
        self.peers.append(peer)
        self.by_id[peer.peer_id] = peer
        if sybil:
            self.sybil_hosts.add(peer.name)
        return peer

    def add_sybil_identities(self) -> list[MembershipPeer]:
        """The extra identities of every peer whose behaviour has ``sybils`` (honest
        behaviour, marked as sybils); call after adding the ordinary peers."""
        return [self.add_peer(Behaviour(), sybil=True)
                for peer in list(self.peers) for _ in range(peer.behaviour.sybils)]

    def start_all(self, *, warm_start: bool, bootstrap_count: int = 1) -> None:
        """Start every peer.

        Raises:
            ValueError: a warm start of more than ``max_members + 1`` peers (a core's
                member table holds at most ``max_members`` others).
        """
        if warm_start and len(self.peers) - 1 > self.config.max_members:
            raise ValueError(
                f"a warm start of {len(self.peers)} peers needs max_members >= {len(self.peers) - 1} "
                f"(it is {self.config.max_members}): a member table holds at most max_members peers; "
                f"raise [membership.config] max_members or set warm_start = false")
        seeds = [p.contact for p in self.peers[:bootstrap_count]]
        for peer in self.peers:
            self._start(peer, [] if warm_start else seeds)
        if not warm_start:
            return
        contacts = [p.contact for p in self.peers]
        routes = {p.peer_id: p.contact for p in self.peers}
        # n * (n - 1) long-lived rows: with the collector running, every generation-2
        # pass would walk all rows built so far (most of the setup time at 1000+ peers),
        # and the first passes after the build would walk them all again (3.4 s at 3000
        # peers). Many rows are frozen: no pass ever walks them.
        big = len(self.peers) * (len(self.peers) - 1) >= self.GC_FREEZE_ROWS
        was_enabled = gc.isenabled()
        if big:
            # an earlier large run of this process (a sweep) froze its world, which may be
            # garbage by now (a world and its peers refer to each other): reclaim it first
            gc.unfreeze()
            gc.collect()
        gc.disable()
        try:
            for peer in self.peers:
                peer.core.preload_members(contacts, peer.clock.now())
                peer.warm_routes = routes
                peer.wake_at(peer.core.next_deadline())
        finally:
            if big:
                gc.freeze()
            if was_enabled:
                gc.enable()

    def _start(self, peer: MembershipPeer, bootstrap: list[PeerContact]) -> None:
        peer.start(bootstrap)
        self.runs.setdefault(peer.name, []).append((self.sim.now, peer.core.incarnation))

    # ---------------------------------------------------------- churn

    def crash(self, peer: MembershipPeer) -> None:
        if peer.up:
            peer.crash()
            self.down_intervals.setdefault(peer.name, []).append([self.sim.now, math.inf, "crash"])

    def restart(self, peer: MembershipPeer) -> None:
        if not peer.up:
            live = [p.contact for p in self.peers if p.up and p is not peer]
            boot = [self.sim.rng.choice(live)] if live else []
            self._start(peer, boot)
            intervals = self.down_intervals.get(peer.name)
            if intervals and intervals[-1][1] == math.inf:
                intervals[-1][1] = self.sim.now

    def join(self, behaviour: Behaviour | None = None) -> MembershipPeer:
        live = [p.contact for p in self.peers if p.up]
        peer = self.add_peer(behaviour)
        self._start(peer, [self.sim.rng.choice(live)] if live else [])
        return peer

    def leave(self, peer: MembershipPeer) -> None:
        if peer.up:
            peer.leave()
            self.down_intervals.setdefault(peer.name, []).append([self.sim.now, math.inf, "leave"])

    # ---------------------------------------------------------- observation

    def on_member_event(self, observer: MembershipPeer, event: MemberEvent, local: bool) -> None:
        target = self.by_id.get(event.peer_id)
        name = target.name if target is not None else event.peer_id[:10]
        self.events.append(EventRecord(self.sim.now, observer.name, event.kind, name, event.incarnation, local))
        self.sim.log(f"event@{observer.name} {event.kind} {name} inc={event.incarnation}")

    def was_down(self, host: str, at: float) -> bool:
        """``host`` was crashed or gone at virtual time ``at`` (the ends of a down
        interval included: nothing said at a restart's instant can know of it)."""
        return any(start <= at <= end for start, end, _ in self.down_intervals.get(host, ()))

    def honest_hosts(self) -> set[str]:
        """Peers of the run that are neither byzantine nor sybil identities."""
        return {p.name for p in self.peers if not p.behaviour.byzantine and p.name not in self.sybil_hosts}

    def _run_ended(self, host: str, incarnation: int, at: float) -> tuple[int, float | None]:
        """The run of ``host`` that ``incarnation`` belongs to, and when it ended (a crash
        or leave at or before ``at``; None: it was still running at ``at``)."""
        runs = self.runs.get(host, [])
        k = max(0, bisect.bisect_right([inc for _, inc in runs], incarnation) - 1)
        next_start = runs[k + 1][0] if k + 1 < len(runs) else math.inf
        run_start = runs[k][0] if runs else -math.inf
        for start, _end, _kind in self.down_intervals.get(host, ()):
            if run_start <= start <= next_start and start <= at:
                return k, start
        return k, None

    def live_view_ok(self) -> bool:
        """Every live peer sees every other live peer alive or suspect."""
        live = [p for p in self.peers if p.up and p.core is not None]
        ids = [p.peer_id for p in live]
        ok_states = {MemberState.ALIVE, MemberState.SUSPECT}
        state_of = operator.attrgetter("state")
        for a in live:  # n^2 lookups, done by map/filter/set rather than a Python loop
            rows = list(filter(None, map(a.core.members.get, ids)))
            if len(rows) != len(ids) - 1:  # only a itself may be missing (no table holds its owner)
                return False
            if not set(map(state_of, rows)) <= ok_states:
                return False
        return True

    def live_seconds(self, host: str, duration_s: float) -> float:
        """Seconds of [0, duration_s] during which ``host`` ran."""
        total = 0.0
        runs = self.runs.get(host, [])
        downs = sorted(iv[0] for iv in self.down_intervals.get(host, ()))
        for start, _inc in runs:
            ends = [d for d in downs if d >= start]
            end = min(ends[0] if ends else math.inf, duration_s)
            total += max(0.0, end - min(start, duration_s))
        return total

    def metrics(self, duration_s: float) -> dict:
        """Detection and accuracy figures of the run (times in virtual seconds).

        Each suspicion or failure of a peer is about one run of that peer (its
        incarnation says which: every start bumps it). It is a true detection if that
        run had ended (crash or leave) when the event happened, else a false one;
        events about byzantine peers and sybil identities are not counted as false.
        Detection times are measured per crash: from the crash to the first suspicion
        of that run by anyone, and to its ``peer_failed`` at each observer; "by all"
        means every peer that ran from the crash to the end of the run without a
        crash or leave of its own. ``false_failures_per_peer_hour`` divides by the
        seconds honest peers (not byzantine, not sybils) were up.
        """
        names = {p.name for p in self.peers}
        honest = self.honest_hosts()
        by_target: dict[str, list[EventRecord]] = {}
        for e in self.events:
            if e.kind in ("peer_suspected", "peer_failed"):
                by_target.setdefault(e.target, []).append(e)
        false_suspect, false_failed = [], []
        # (host, run index) -> events about that run after it ended
        detections: dict[tuple[str, int], list[EventRecord]] = {}
        for host, events in by_target.items():
            if host not in names:
                continue
            for e in events:
                k, ended = self._run_ended(host, e.incarnation, e.at)
                if ended is not None:
                    detections.setdefault((host, k), []).append(e)
                elif host in honest:
                    (false_suspect if e.kind == "peer_suspected" else false_failed).append(e)
        first_suspect, all_failed, failed_mean = [], [], []
        crashes = 0
        for host in sorted(self.down_intervals):
            runs = self.runs.get(host, [])
            for start, _end, kind in self.down_intervals[host]:
                if kind != "crash":
                    continue
                crashes += 1
                k = max(0, bisect.bisect_right([t for t, _ in runs], start) - 1)
                events = detections.get((host, k), [])
                sus = [e.at for e in events if e.kind == "peer_suspected"]
                if sus:
                    first_suspect.append(min(sus) - start)
                fails: dict[str, float] = {}
                for e in events:
                    if e.kind == "peer_failed" and e.observer not in fails:
                        fails[e.observer] = e.at - start
                observers = [p.name for p in self.peers if p.up and p.name != host
                             and self._up_since(p.name) <= start]
                if observers and all(o in fails for o in observers):
                    all_failed.append(max(fails[o] for o in observers))
                if fails:
                    failed_mean.append(statistics.fmean(fails.values()))
        local_false_suspect = [e for e in false_suspect if e.local]
        probes = sum(p.probes for p in self.peers)
        live_peer_seconds = sum(self.live_seconds(h, duration_s) for h in sorted(honest))
        out = {
            "peers": len(self.peers),
            "crashed": crashes,
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
            # alive claims refused (PROTOCOL s10.3), summed over the peers up at the end
            "alive_unsigned": sum(p.core.alive_unsigned for p in self.peers if p.core is not None),
            "alive_bad_signatures": sum(p.core.alive_bad_signatures for p in self.peers if p.core is not None),
        }
        return out

    def _up_since(self, host: str) -> float:
        """Start of the host's current run (inf if it is down)."""
        runs = self.runs.get(host)
        return runs[-1][0] if runs else math.inf


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
