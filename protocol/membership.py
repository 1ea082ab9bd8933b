"""Membership core: SWIM failure detection with Lifeguard refinements (pure).

References: Das, Gupta, Motivala, "SWIM: Scalable Weakly-consistent
Infection-style Process Group Membership Protocol" (DSN 2002); Dadgar, Phillips,
Currey, "Lifeguard: Local Health Awareness for More Accurate Failure Detection"
(2018). Implemented here:

* randomized round-robin probing (every member is probed once per pass),
  direct ``Ping``/``Ack``, then ``PingReq`` through ``indirect_checks`` helpers;
* alive / suspect / dead / left states ordered by incarnation numbers, with
  refutation (a peer that hears itself suspected bumps its incarnation);
* Lifeguard *local health multiplier* (LHM, 0..``max_local_health``): probe
  interval and timeouts scale with ``LHM + 1``; a failed probe or a refutation
  raises it, a successful probe lowers it;
* Lifeguard *dynamic suspicion timeout*: starts at ``max_s`` and shrinks towards
  ``min_s`` with log(C+1)/log(K+1) as independent confirmations C arrive, where
  ``min_s = suspicion_alpha * max(1, log10(n)) * probe_interval_s``,
  ``max_s = suspicion_beta * min_s`` and ``K = min(indirect_checks, n - 2)``;
* infection-style dissemination: updates piggyback on probes, each sent
  ``gossip_mult * ceil(log10(n + 1))`` times; plus a full ``MemberList``
  exchange with a new member and an anti-entropy exchange every
  ``sync_interval_s`` with a random member (peer exchange).

Trust rule (DESIGN.md, "discovery is a hint"): the member table only holds
peers that sent *us* a signed ``Hello``; the transport key and addresses used to
reach a member come only from that peer's own signed ``Hello``. Contacts heard
from discovery, bootstrap or gossip are *candidates*: we send them our (public)
``Hello`` and nothing else until they answer with theirs.

The core never reads a clock or does I/O: the driver passes ``now`` (monotonic
seconds), calls :meth:`Membership.tick` at :meth:`Membership.next_deadline`,
delivers verified envelopes to :meth:`Membership.on_message` and executes the
actions returned by :meth:`Membership.take_actions` in order.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field, replace
from typing import Annotated

from .errors import LocalProtocolError
from .messages import Len, MaxItems, MaxLen, PeerId, Range, message, record

MEMBERSHIP_ACTOR = "membership"
PeerIdStr = PeerId
# Incarnations only grow by one per refutation; a claim near 2**62 is forged.
MAX_INCARNATION = 2**62
Incarnation = Annotated[int, Range(0, MAX_INCARNATION)]
ADDRESS_SCHEMES = ("tcp://",)
MAX_CONTACT_ADDRESSES = 8
HELLO_ADDRESSES = 2  # a Hello to an unverified contact goes to its first two addresses


class MemberState(str, enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


# ------------------------------------------------------------------- wire types


@record
class PeerContact:
    """How to reach a peer: what its signed Hello (and its TXT record) states.

    ``addresses`` are ZeroMQ endpoints (``tcp://HOST:PORT``), best first;
    ``transport_key`` is its raw 32-byte CURVE server public key.
    """

    peer_id: PeerIdStr
    transport_key: Annotated[bytes, Len(32)]
    addresses: Annotated[tuple[Annotated[str, MaxLen(128)], ...], MaxItems(MAX_CONTACT_ADDRESSES)]
    capabilities: Annotated[tuple[Annotated[str, MaxLen(64)], ...], MaxItems(32)] = ()
    profile: Annotated[str, MaxLen(32)] = "default"

    def __post_init__(self) -> None:
        for address in self.addresses:
            if not address.startswith(ADDRESS_SCHEMES):
                raise ValueError(f"address {address[:40]!r} is not a tcp:// endpoint")

    def describe(self) -> str:
        return f"{self.peer_id[:10]}@{','.join(self.addresses) or '-'}"


@record
class MemberUpdate:
    """One gossiped fact: ``peer_id`` is in ``state`` at ``incarnation``.

    ``contact`` is an unverified hint used only to send a Hello.
    """

    peer_id: PeerIdStr
    state: Annotated[str, MaxLen(8)]
    incarnation: Incarnation
    contact: PeerContact | None = None

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise ValueError(f"unknown member state {self.state[:8]!r}")

    def describe(self) -> str:
        return f"{self.peer_id[:10]}={self.state}/{self.incarnation}"


_STATES = frozenset(s.value for s in MemberState)
Updates = Annotated[tuple[MemberUpdate, ...], MaxItems(16)]


@message("hello", actor=MEMBERSHIP_ACTOR)
class Hello:
    """A peer introduces itself; binds its peer id to its transport key."""

    contact: PeerContact
    incarnation: Incarnation
    reply_requested: bool = True

    def describe(self) -> str:
        return f"hello {self.contact.describe()} inc={self.incarnation}" + (
            " (reply requested)" if self.reply_requested else ""
        )


@message("ping", actor=MEMBERSHIP_ACTOR)
class Ping:
    probe_id: int
    updates: Updates = ()

    def describe(self) -> str:
        return f"ping {self.probe_id:x} +{len(self.updates)} updates"


@message("ping_req", actor=MEMBERSHIP_ACTOR)
class PingReq:
    """Ask the recipient to probe ``target`` on our behalf (SWIM indirect probe)."""

    probe_id: int
    target: PeerIdStr
    updates: Updates = ()

    def describe(self) -> str:
        return f"ping-req {self.probe_id:x} for {self.target[:10]}"


@message("ack", actor=MEMBERSHIP_ACTOR)
class Ack:
    """Answer to a Ping; ``of`` names the probed peer when relayed for a PingReq."""

    probe_id: int
    of: PeerIdStr | None = None
    updates: Updates = ()

    def describe(self) -> str:
        via = f" of {self.of[:10]}" if self.of else ""
        return f"ack {self.probe_id:x}{via} +{len(self.updates)} updates"


@message("member_list", actor=MEMBERSHIP_ACTOR)
class MemberList:
    """Full state exchange (join and anti-entropy); answered once if ``reply_requested``."""

    members: Annotated[tuple[MemberUpdate, ...], MaxItems(256)]
    reply_requested: bool = False

    def describe(self) -> str:
        return f"member-list of {len(self.members)}"


@message("leave", actor=MEMBERSHIP_ACTOR)
class Leave:
    """The sender is shutting down gracefully."""

    incarnation: Incarnation

    def describe(self) -> str:
        return f"leave inc={self.incarnation}"


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``peer_id``. When ``via`` is set the peer is an
    unverified candidate: reach it through that contact, and only with a Hello."""

    peer_id: str
    message: object
    via: PeerContact | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    """``contact`` was verified by its own signed Hello: route the peer's traffic there."""

    contact: PeerContact


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """``kind``: peer_joined | peer_alive | peer_suspected | peer_failed | peer_left."""

    kind: str
    peer_id: str
    incarnation: int
    at: float

    def describe(self) -> str:
        return f"{self.kind} {self.peer_id[:10]} inc={self.incarnation}"


Action = Send | Connect | MemberEvent


# ------------------------------------------------------------------------ state


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Timers in seconds; see the module docstring for the formulas."""

    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_alpha: float = 4.0
    suspicion_beta: float = 6.0
    max_local_health: int = 8
    gossip_mult: int = 4
    max_piggyback: int = 8
    sync_interval_s: float = 30.0
    hello_retry_min_s: float = 0.5
    hello_retry_max_s: float = 30.0
    candidate_ttl_s: float = 600.0
    reconnect_interval_s: float = 10.0
    dead_retention_s: float = 3600.0
    max_members: int = 4096
    max_candidates: int = 1024

    def __post_init__(self) -> None:
        if self.probe_timeout_s >= self.probe_interval_s:
            raise LocalProtocolError("probe_timeout_s must be below probe_interval_s")
        if self.probe_interval_s <= 0 or self.indirect_checks < 0:
            raise LocalProtocolError("probe_interval_s > 0 and indirect_checks >= 0 required")


@dataclass(slots=True)
class Member:
    contact: PeerContact
    incarnation: int
    state: MemberState
    state_since: float
    last_seen: float
    hello_incarnation: int = 0  # from the peer's own signed Hello only (gossip cannot raise it)
    rtt_s: float | None = None
    suspect_deadline: float | None = None
    suspect_started: float | None = None
    confirmations: set[str] = field(default_factory=set)

    @property
    def peer_id(self) -> str:
        return self.contact.peer_id


@dataclass(slots=True)
class _Candidate:
    contact: PeerContact
    next_hello: float
    backoff_s: float
    expires: float | None  # None: static bootstrap, never expires


@dataclass(slots=True)
class _Probe:
    probe_id: int
    target: str
    sent_at: float
    ack_deadline: float
    period_end: float
    indirect_sent: bool = False
    acked: bool = False
    helpers: tuple[str, ...] = ()


@dataclass(slots=True)
class _Relay:
    requester: str
    requester_probe_id: int
    target: str
    expires: float


class Membership:
    """The SWIM/Lifeguard state machine of one peer.

    Args:
        self_contact: our own contact (peer id, transport key, addresses).
        incarnation: our incarnation, >= 1; the node persists and bumps it at
            every start so a restarted peer overrides stale dead claims.
        config: timers and limits.
        rng: the only randomness used (target order, probe ids, helpers).
        now: monotonic seconds at construction.
    """

    def __init__(
        self,
        self_contact: PeerContact,
        incarnation: int,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
    ) -> None:
        if incarnation < 1:
            raise LocalProtocolError("incarnation starts at 1")
        self.contact = self_contact
        self.peer_id = self_contact.peer_id
        self.incarnation = incarnation
        self.config = config
        self.rng = rng
        self.members: dict[str, Member] = {}
        self.candidates: dict[str, dict[bytes, _Candidate]] = {}
        self.local_health = 0
        self._actions: list[Action] = []
        self._gossip: dict[str, list] = {}  # peer_id -> [MemberUpdate, sends_left]
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._next_probe_at = now + config.probe_interval_s * rng.random()
        self._relays: dict[int, _Relay] = {}
        self._next_sync_at = now + config.sync_interval_s
        self._next_reconnect_at = now + config.reconnect_interval_s
        self._left = False

    # ----------------------------------------------------------- public inputs

    def take_actions(self) -> list[Action]:
        """Actions produced since the last call, in the order they must run."""
        out, self._actions = self._actions, []
        return out

    def add_candidate(self, contact: PeerContact, now: float, *, static: bool = False) -> None:
        """A hint (discovery, bootstrap, gossip) that a peer may be at ``contact``.

        Known alive members are not re-verified; otherwise a Hello is sent
        promptly and retried with exponential backoff until answered.
        """
        pid = contact.peer_id
        if pid == self.peer_id or self._left:
            return
        member = self.members.get(pid)
        if member and member.state in (MemberState.ALIVE, MemberState.SUSPECT) \
                and member.contact.transport_key == contact.transport_key \
                and member.contact.addresses == contact.addresses:
            return
        expires = None if static else now + self.config.candidate_ttl_s
        existing = self.candidates.get(pid, {}).get(contact.transport_key)
        if existing is not None:
            # Hints for one key accumulate addresses instead of replacing them: a stale one
            # (a stored contact from before the peer restarted on another port) must not push
            # out a fresh one (a bootstrap contact); a static contact's addresses stay in front.
            old = existing.contact.addresses
            front, back = (old, contact.addresses) if existing.expires is None and not static \
                else (contact.addresses, old)
            addresses = tuple(dict.fromkeys(front + back))[:MAX_CONTACT_ADDRESSES]
            existing.contact = replace(contact, addresses=addresses)
            if static:
                existing.expires = None
            elif existing.expires is not None:
                existing.expires = expires
            if addresses[:HELLO_ADDRESSES] != old[:HELLO_ADDRESSES]:  # a new place to try: at once
                existing.next_hello = now
                existing.backoff_s = self.config.hello_retry_min_s
            return
        if not static and sum(len(v) for v in self.candidates.values()) >= self.config.max_candidates:
            return  # bounded: a flood of hints cannot grow memory (static contacts still go in)
        self.candidates.setdefault(pid, {})[contact.transport_key] = _Candidate(
            contact=contact, next_hello=now, backoff_s=self.config.hello_retry_min_s, expires=expires
        )

    def on_message(self, sender: str, msg: object, now: float) -> None:
        """Deliver a verified envelope's message from ``sender`` (a peer id)."""
        if self._left:
            return
        if isinstance(msg, Hello):
            self._on_hello(sender, msg, now)
            return
        member = self.members.get(sender)
        if member is None:
            return  # not verified yet: only a Hello may introduce a peer
        member.last_seen = now
        if isinstance(msg, Leave):
            self._set_state(member, MemberState.LEFT, max(member.incarnation, msg.incarnation), now)
            self._queue_gossip(member)
            return
        if member.state in (MemberState.DEAD, MemberState.LEFT):
            # A verified envelope from a "dead" peer: it lives; get its Hello.
            self._actions.append(Send(sender, self._hello(reply_requested=True)))
            return
        if isinstance(msg, Ping):
            self._apply_updates(sender, msg.updates, now)
            self._send(sender, Ack(probe_id=msg.probe_id, updates=self._piggyback(sender)))
        elif isinstance(msg, Ack):
            self._apply_updates(sender, msg.updates, now)
            self._on_ack(sender, msg, now)
        elif isinstance(msg, PingReq):
            self._apply_updates(sender, msg.updates, now)
            self._on_ping_req(sender, msg, now)
        elif isinstance(msg, MemberList):
            self._apply_updates(sender, msg.members, now)
            if msg.reply_requested:
                self._send_member_list(sender, reply_requested=False)

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        if self._left:
            return
        cfg = self.config
        self._tick_candidates(now)
        # suspicion timeouts
        for member in list(self.members.values()):
            if member.state is MemberState.SUSPECT and member.suspect_deadline is not None \
                    and now >= member.suspect_deadline:
                self._set_state(member, MemberState.DEAD, member.incarnation, now)
                self._queue_gossip(member)
            elif member.state in (MemberState.DEAD, MemberState.LEFT) \
                    and now - member.state_since > cfg.dead_retention_s:
                del self.members[member.peer_id]
        # the running probe
        probe = self._probe
        if probe is not None and not probe.acked:
            if not probe.indirect_sent and now >= probe.ack_deadline:
                probe.indirect_sent = True
                helpers = [p for p in self._alive_ids() if p != probe.target]
                self.rng.shuffle(helpers)
                probe.helpers = tuple(helpers[: cfg.indirect_checks])
                for helper in probe.helpers:
                    self._send(helper, PingReq(probe_id=probe.probe_id, target=probe.target,
                                               updates=self._piggyback(helper)))
            if now >= probe.period_end:
                self._probe = None
                self._adjust_health(+1)
                target = self.members.get(probe.target)
                if target is not None and target.state is MemberState.ALIVE:
                    self._suspect(target, target.incarnation, self.peer_id, now)
        elif probe is not None and now >= probe.period_end:
            self._probe = None
        if self._probe is None and now >= self._next_probe_at:
            self._start_probe(now)
        for probe_id in [k for k, r in self._relays.items() if now >= r.expires]:
            del self._relays[probe_id]
        if now >= self._next_sync_at:
            self._next_sync_at = now + cfg.sync_interval_s
            alive = self._alive_ids()
            if alive:
                self._send_member_list(self.rng.choice(alive), reply_requested=True)
        if now >= self._next_reconnect_at:
            self._next_reconnect_at = now + cfg.reconnect_interval_s
            gone = [m for m in self.members.values() if m.state is MemberState.DEAD]
            if gone:
                self._actions.append(Send(self.rng.choice(gone).peer_id,
                                          self._hello(reply_requested=True)))

    def next_deadline(self) -> float:
        """Monotonic time of the next timer (call :meth:`tick` then); inf after leave."""
        if self._left:
            return math.inf
        deadlines = [self._next_probe_at, self._next_sync_at, self._next_reconnect_at]
        if self._probe is not None:
            deadlines.append(self._probe.period_end)
            if not self._probe.indirect_sent and not self._probe.acked:
                deadlines.append(self._probe.ack_deadline)
        deadlines.extend(m.suspect_deadline for m in self.members.values()
                         if m.suspect_deadline is not None)
        for per_peer in self.candidates.values():
            deadlines.extend(c.next_hello for c in per_peer.values())
        deadlines.extend(r.expires for r in self._relays.values())
        return min(deadlines)

    def leave(self, now: float) -> None:
        """Announce a graceful leave to every live member and stop reacting."""
        for pid in self._alive_ids():
            self._send(pid, Leave(incarnation=self.incarnation))
        self._left = True

    # ------------------------------------------------------------- views

    def member_count(self) -> int:
        """Live members including ourselves (the n of the SWIM formulas)."""
        return 1 + sum(1 for m in self.members.values()
                       if m.state in (MemberState.ALIVE, MemberState.SUSPECT))

    def suspicion_bounds_s(self) -> tuple[float, float]:
        n = self.member_count()
        min_s = self.config.suspicion_alpha * max(1.0, math.log10(n)) * self.config.probe_interval_s
        return min_s, self.config.suspicion_beta * min_s

    # ------------------------------------------------------------- internals

    def _alive_ids(self) -> list[str]:
        return [p for p, m in self.members.items() if m.state is MemberState.ALIVE]

    def _hello(self, reply_requested: bool) -> Hello:
        return Hello(contact=self.contact, incarnation=self.incarnation,
                     reply_requested=reply_requested)

    def _send(self, peer_id: str, msg: object) -> None:
        self._actions.append(Send(peer_id, msg))

    def _emit(self, kind: str, member: Member, now: float) -> None:
        self._actions.append(MemberEvent(kind, member.peer_id, member.incarnation, now))

    def _adjust_health(self, delta: int) -> None:
        self.local_health = min(self.config.max_local_health, max(0, self.local_health + delta))

    def _tick_candidates(self, now: float) -> None:
        for pid in list(self.candidates):
            per_peer = self.candidates[pid]
            for key in list(per_peer):
                cand = per_peer[key]
                if cand.expires is not None and now >= cand.expires:
                    del per_peer[key]
                elif now >= cand.next_hello:
                    self._actions.append(Send(pid, self._hello(True), via=cand.contact))
                    cand.next_hello = now + cand.backoff_s * (0.5 + self.rng.random())
                    cand.backoff_s = min(self.config.hello_retry_max_s, cand.backoff_s * 2)
            if not per_peer:
                del self.candidates[pid]

    def _on_hello(self, sender: str, msg: Hello, now: float) -> None:
        contact = msg.contact
        if contact.peer_id != sender or sender == self.peer_id:
            return  # a Hello speaks only for its signer
        member = self.members.get(sender)
        static = self.candidates.pop(sender, None)
        if static:  # keep static bootstrap contacts for later reconnects
            for cand in static.values():
                if cand.expires is None and cand.contact.transport_key != contact.transport_key:
                    self.candidates.setdefault(sender, {})[cand.contact.transport_key] = cand
        if member is None:
            if len(self.members) >= self.config.max_members:
                return
            member = Member(contact=contact, incarnation=msg.incarnation, state=MemberState.ALIVE,
                            state_since=now, last_seen=now, hello_incarnation=msg.incarnation)
            self.members[sender] = member
            self._actions.append(Connect(contact))
            self._emit("peer_joined", member, now)
            self._queue_gossip(member)
            self._send(sender, self._hello(reply_requested=False))
            self._send_member_list(sender, reply_requested=True)
            return
        member.last_seen = now
        if member.contact != contact:
            # A contact changes only with a newer incarnation of the peer (it binds
            # once per run): an older Hello replayed by a member cannot roll the
            # route back. A peer we had lost may come back at any incarnation.
            newer = msg.incarnation > member.hello_incarnation
            if not (newer or member.state in (MemberState.DEAD, MemberState.LEFT)):
                return
            member.contact = contact
            self._actions.append(Connect(contact))
        member.hello_incarnation = max(member.hello_incarnation, msg.incarnation)
        was = member.state
        incarnation = max(member.incarnation, msg.incarnation)
        if was is not MemberState.ALIVE:
            # Direct signed evidence of life beats any gossip about it. A peer back
            # from dead/left rejoins (one peer_joined event); a suspect is just alive.
            rejoined = was in (MemberState.DEAD, MemberState.LEFT)
            self._set_state(member, MemberState.ALIVE, incarnation, now, emit=not rejoined)
            if rejoined:
                self._emit("peer_joined", member, now)
            self._queue_gossip(member)
            self._send_member_list(sender, reply_requested=True)
        else:
            member.incarnation = incarnation
        if msg.reply_requested:
            self._send(sender, self._hello(reply_requested=False))

    def _set_state(self, member: Member, state: MemberState, incarnation: int, now: float,
                   emit: bool = True) -> None:
        previous = member.state
        member.incarnation = incarnation
        if state is not MemberState.SUSPECT:
            member.suspect_deadline = member.suspect_started = None
            member.confirmations.clear()
        if state is previous:
            return
        member.state = state
        member.state_since = now
        if not emit:
            return
        kind = {
            MemberState.ALIVE: "peer_alive",
            MemberState.SUSPECT: "peer_suspected",
            MemberState.DEAD: "peer_failed",
            MemberState.LEFT: "peer_left",
        }[state]
        self._emit(kind, member, now)

    def _suspect(self, member: Member, incarnation: int, by: str, now: float) -> None:
        min_s, max_s = self.suspicion_bounds_s()
        if member.state is MemberState.SUSPECT and incarnation == member.incarnation:
            if by in member.confirmations or by == self.peer_id:
                return
            member.confirmations.add(by)
        else:
            self._set_state(member, MemberState.SUSPECT, incarnation, now)
            member.suspect_started = now
            if by != self.peer_id:
                member.confirmations.add(by)
            self._queue_gossip(member)
            if by == self.peer_id:
                # Tell the suspect directly too (the suspicion about it rides
                # first): if it is alive it can refute before the timeout.
                self._send(member.peer_id, Ping(probe_id=self.rng.getrandbits(63),
                                                updates=self._piggyback(member.peer_id)))
        k = min(self.config.indirect_checks, self.member_count() - 2)
        if k < 1:
            timeout = min_s
        else:
            frac = math.log(len(member.confirmations) + 1) / math.log(k + 1)
            timeout = max(min_s, max_s - (max_s - min_s) * frac)
        member.suspect_deadline = member.suspect_started + timeout

    def _start_probe(self, now: float) -> None:
        cfg = self.config
        scale = self.local_health + 1
        self._next_probe_at = now + cfg.probe_interval_s * scale
        while self._probe_order:
            target = self._probe_order.pop()
            m = self.members.get(target)
            if m is not None and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                break
        else:
            order = [p for p, m in self.members.items()
                     if m.state in (MemberState.ALIVE, MemberState.SUSPECT)]
            if not order:
                return
            self.rng.shuffle(order)
            self._probe_order = order
            target = self._probe_order.pop()
        probe_id = self.rng.getrandbits(63)
        self._probe = _Probe(probe_id=probe_id, target=target, sent_at=now,
                             ack_deadline=now + cfg.probe_timeout_s * scale,
                             period_end=now + cfg.probe_interval_s * scale)
        self._send(target, Ping(probe_id=probe_id, updates=self._piggyback(target)))

    def _on_ack(self, sender: str, msg: Ack, now: float) -> None:
        relay = self._relays.pop(msg.probe_id, None)
        if relay is not None and relay.target == sender:
            self._send(relay.requester, Ack(probe_id=relay.requester_probe_id, of=sender,
                                            updates=self._piggyback(relay.requester)))
            return
        probe = self._probe
        if probe is None or probe.acked or msg.probe_id != probe.probe_id:
            return
        direct = msg.of is None and sender == probe.target
        indirect = msg.of == probe.target and sender in probe.helpers
        if not (direct or indirect):
            return
        probe.acked = True
        self._adjust_health(-1)
        target = self.members.get(probe.target)
        if target is None:
            return
        if direct:  # an ack never clears a suspicion: only the peer's own refutation does
            rtt = now - probe.sent_at
            target.rtt_s = rtt if target.rtt_s is None else 0.8 * target.rtt_s + 0.2 * rtt

    def _on_ping_req(self, sender: str, msg: PingReq, now: float) -> None:
        target = self.members.get(msg.target)
        if target is None or target.state not in (MemberState.ALIVE, MemberState.SUSPECT) \
                or len(self._relays) >= 256:
            return
        probe_id = self.rng.getrandbits(63)
        self._relays[probe_id] = _Relay(requester=sender, requester_probe_id=msg.probe_id,
                                        target=msg.target,
                                        expires=now + self.config.probe_interval_s * 2)
        self._send(msg.target, Ping(probe_id=probe_id, updates=self._piggyback(msg.target)))

    # ------------------------------------------------------- dissemination

    def _update_of(self, member: Member) -> MemberUpdate:
        return MemberUpdate(peer_id=member.peer_id, state=member.state.value,
                            incarnation=member.incarnation, contact=member.contact)

    def _self_update(self) -> MemberUpdate:
        return MemberUpdate(peer_id=self.peer_id, state=MemberState.ALIVE.value,
                            incarnation=self.incarnation, contact=self.contact)

    def _queue_gossip(self, member: Member | None) -> None:
        update = self._self_update() if member is None else self._update_of(member)
        sends = self.config.gossip_mult * math.ceil(math.log10(self.member_count() + 1))
        self._gossip[update.peer_id] = [update, max(1, sends)]

    def _piggyback(self, to: str) -> tuple[MemberUpdate, ...]:
        if not self._gossip:
            return ()
        # A pending update about the recipient always goes first: a suspected
        # member must hear the suspicion to refute it (SWIM s4.2).
        about_to = self._gossip.get(to)
        rest = sorted((item for pid, item in self._gossip.items() if pid != to),
                      key=lambda item: -item[1])
        chosen = ([about_to] if about_to else []) + rest
        chosen = chosen[: self.config.max_piggyback]
        for item in chosen:
            item[1] -= 1
            if item[1] <= 0:
                self._gossip.pop(item[0].peer_id, None)
        return tuple(item[0] for item in chosen)

    def _send_member_list(self, to: str, *, reply_requested: bool) -> None:
        updates = [self._self_update()] + [self._update_of(m) for m in self.members.values()]
        for start in range(0, len(updates), 256):
            self._send(to, MemberList(members=tuple(updates[start:start + 256]),
                                      reply_requested=reply_requested and start == 0))

    def _apply_updates(self, sender: str, updates: tuple[MemberUpdate, ...], now: float) -> None:
        for update in updates:
            self._apply_update(sender, update, now)

    def _apply_update(self, sender: str, update: MemberUpdate, now: float) -> None:
        state = MemberState(update.state)
        pid = update.peer_id
        if pid == self.peer_id:
            if state in (MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT) \
                    and self.incarnation <= update.incarnation < MAX_INCARNATION:
                self.incarnation = update.incarnation + 1  # refute (SWIM s4.2)
                self._adjust_health(+1)
                self._queue_gossip(None)
            return
        member = self.members.get(pid)
        if member is None:
            if state in (MemberState.ALIVE, MemberState.SUSPECT) and update.contact is not None \
                    and update.contact.peer_id == pid:
                self.add_candidate(update.contact, now)
            return
        if pid == sender and state is not MemberState.ALIVE:
            return  # a peer does not declare itself suspect or dead
        inc = member.incarnation
        if state is MemberState.ALIVE:
            if update.incarnation > inc:
                if member.state in (MemberState.DEAD, MemberState.LEFT):
                    # Someone heard from it; verify ourselves before believing.
                    member.incarnation = update.incarnation
                    self._actions.append(Send(pid, self._hello(reply_requested=True)))
                else:
                    self._set_state(member, MemberState.ALIVE, update.incarnation, now)
                    self._queue_gossip(member)
        elif state is MemberState.SUSPECT:
            if member.state is MemberState.ALIVE and update.incarnation >= inc:
                self._suspect(member, update.incarnation, sender, now)
            elif member.state is MemberState.SUSPECT and update.incarnation >= inc:
                self._suspect(member, update.incarnation, sender, now)
        elif state in (MemberState.DEAD, MemberState.LEFT):
            if update.incarnation >= inc and member.state not in (MemberState.DEAD, MemberState.LEFT):
                self._set_state(member, state, update.incarnation, now)
                self._queue_gossip(member)
