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

Signed alive claims (PROTOCOL s10.3): only a peer itself raises its incarnation, so an
``alive`` update that raises a member's incarnation must carry that member's Ed25519
signature over :func:`alive_statement` (or come from the member itself) when the
member's verified contact lists :data:`ALIVE_PROOF_CAPABILITY`; receivers keep the
latest signature per member and re-gossip it, so refutations still spread
epidemically, while a byzantine member can no longer keep a dead peer "alive" by
gossip. The core signs and verifies through the callables of :class:`AliveProofs`.

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
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Annotated

import msgpack

from .errors import LocalProtocolError
from .identity import SIGNATURE_BYTES, public_key_from_peer_id, verify_signature
from .messages import Len, MaxItems, MaxLen, OmitNone, PeerId, Range, message, record
from .network import valid_endpoint

MEMBERSHIP_ACTOR = "membership"
PeerIdStr = PeerId
# Incarnations only grow by one per refutation; a claim near 2**62 is forged.
MAX_INCARNATION = 2**62
# We refute only claims about ourselves below this (so a refutation never goes past it):
# the 2**20 left above it are the headroom for restarts (+1 each), so a forged claim
# cannot push us to an incarnation that no Hello can encode (PROTOCOL s10.4).
REFUTE_LIMIT = MAX_INCARNATION - 2**20
# Gossip about another peer may raise its incarnation by at most this much above the
# highest one we know for it (its own Hello may jump any distance; PROTOCOL s10.3).
GOSSIP_INCARNATION_STEP = 2**16
# A peer whose contact lists this capability signs every alive claim about itself: an alive
# update that raises its incarnation is taken only with its signature (PROTOCOL s10.3).
ALIVE_PROOF_CAPABILITY = "signed_alive"
# Domain of the signed alive statement (NUL-terminated like the other signing domains).
ALIVE_DOMAIN = b"chimera-mesh/member/v1\x00"
Incarnation = Annotated[int, Range(0, MAX_INCARNATION)]
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
            if not valid_endpoint(address):  # (ZeroMQ syntax such as "h1;h2" must not reach connect)
                raise ValueError(f"address {address[:40]!r} is not a tcp://HOST:PORT endpoint")

    def describe(self) -> str:
        return f"{self.peer_id[:10]}@{','.join(self.addresses) or '-'}"


def alive_statement(network_id: bytes, peer_id: str, incarnation: int) -> bytes:
    """The exact bytes a peer signs to claim "``peer_id`` is alive at ``incarnation``"
    (PROTOCOL s10.3): ``ALIVE_DOMAIN || msgpack(["alive", network_id, peer_id, incarnation])``,
    canonically encoded (``network_id`` bin, 16 bytes; ``peer_id`` str; ``incarnation``
    int in 0 .. 2**62)."""
    return ALIVE_DOMAIN + msgpack.packb(["alive", network_id, peer_id, incarnation], use_bin_type=True)


@record
class MemberUpdate:
    """One gossiped fact: ``peer_id`` is in ``state`` at ``incarnation``.

    ``contact`` is an unverified hint used only to send a Hello. ``signature``: only
    with state ``alive``: the peer's own Ed25519 signature (64 bytes) over
    :func:`alive_statement` of this incarnation; left out of the wire map when None
    (peers without :data:`ALIVE_PROOF_CAPABILITY` reject unknown fields and are
    never sent it).
    """

    peer_id: PeerIdStr
    state: Annotated[str, MaxLen(8)]
    incarnation: Incarnation
    contact: PeerContact | None = None
    signature: Annotated[bytes | None, Len(SIGNATURE_BYTES), OmitNone()] = None

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise ValueError(f"unknown member state {self.state[:8]!r}")
        if self.signature is not None and self.state != "alive":
            raise ValueError(f"a signature only goes with state alive, not {self.state[:8]!r}")

    def describe(self) -> str:
        return f"{self.peer_id[:10]}={self.state}/{self.incarnation}" + ("+sig" if self.signature else "")


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


@dataclass(frozen=True, slots=True)
class AliveProofs:
    """How a core signs its own alive claims and checks other peers' (no keys held here).

    Args:
        network_id: the 16-byte network id (PROTOCOL s3.1) bound into every statement.
        sign: signs a message with our identity key: bytes -> 64-byte Ed25519 signature
            (``SigningIdentity.sign``).
        verify: ``(public_key, signature, message) -> bool`` by the rules of PROTOCOL
            s6.2 (``verify_signature``, or a memoizing drop-in such as the simulator's).
    """

    network_id: bytes
    sign: Callable[[bytes], bytes]
    verify: Callable[[bytes, bytes, bytes], bool] = verify_signature

    def __post_init__(self) -> None:
        if type(self.network_id) is not bytes or len(self.network_id) != 16:
            raise LocalProtocolError("AliveProofs.network_id must be 16 bytes")


# ------------------------------------------------------------------------ state


class ConfigError(LocalProtocolError, ValueError):
    """An invalid :class:`MembershipConfig` field (the message names it)."""


_CONFIG_INTERVALS = ("probe_interval_s", "probe_timeout_s", "sync_interval_s", "hello_retry_min_s",
                     "hello_retry_max_s", "candidate_ttl_s", "reconnect_interval_s", "dead_retention_s")


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
    # a full member list is sent to one peer at most once per this interval when it asks
    # (member_list reply_requested, or a Hello while we hold it suspect/dead/left);
    # None: sync_interval_s / 4
    member_list_interval_s: float | None = None

    def __post_init__(self) -> None:
        # A zero, negative, NaN or infinite timer would busy-loop the driver (a deadline
        # that is always due) or never fire; every interval must be a positive finite time.
        for name in _CONFIG_INTERVALS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"{name} must be a finite number of seconds > 0 (got {value!r})")
        value = self.member_list_interval_s
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ConfigError(f"member_list_interval_s must be None or a finite number of seconds > 0 "
                              f"(got {value!r})")
        for name in ("suspicion_alpha", "suspicion_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"{name} must be finite and > 0 (got {value!r})")
        for name in ("indirect_checks", "max_local_health", "gossip_mult", "max_piggyback",
                     "max_members", "max_candidates"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)!r})")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError("probe_timeout_s must be below probe_interval_s")
        if self.hello_retry_min_s > self.hello_retry_max_s:
            raise ConfigError("hello_retry_min_s must be at most hello_retry_max_s")

    @property
    def member_list_min_interval_s(self) -> float:
        """Per-peer minimum time between the full member lists it can make us send."""
        value = self.member_list_interval_s
        return self.sync_interval_s / 4 if value is None else value

    @property
    def relay_quota(self) -> int:
        """Pending ``ping_req`` relays one requester may hold (of the 256 in all)."""
        return 2 * max(1, self.indirect_checks)


_NO_CONFIRMATIONS: frozenset[str] = frozenset()
_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_GONE = (MemberState.DEAD, MemberState.LEFT)
_STATE_OF = {s.value: s for s in MemberState}


@dataclass(slots=True)
class Member:
    """One row of the member table (a simulator holds n of these per peer: keep it small).

    ``confirmations`` is a shared empty frozenset until a first confirmation of a
    suspicion arrives; then a set of the confirming peer ids.
    """

    contact: PeerContact
    incarnation: int
    state: MemberState
    state_since: float
    last_seen: float
    hello_incarnation: int = 0  # from the peer's own signed Hello only (gossip cannot raise it)
    rtt_s: float | None = None
    suspect_deadline: float | None = None
    suspect_started: float | None = None
    confirmations: set[str] | frozenset[str] = _NO_CONFIRMATIONS
    # the peer's verified signature over its alive statement at proof_incarnation (re-gossiped
    # with "alive" updates while proof_incarnation == incarnation)
    proof: bytes | None = None
    proof_incarnation: int = 0
    # while dead/left: the highest incarnation a third party claimed it alive at (we sent it a
    # Hello to check); its row keeps the incarnation it was seen failing at
    alive_claim_incarnation: int = 0

    @property
    def peer_id(self) -> str:
        return self.contact.peer_id


class MemberTable(dict):
    """``peer id -> Member`` that keeps its counts of live (alive or suspect) and
    dead members as rows come and go, so the core's ``n`` is O(1).

    Rows may be added or removed with any dict operation (the node's revoke pops
    one); a row's ``state`` must change only through :class:`Membership` (which
    reports each change to :meth:`moved`).
    """

    __slots__ = ("live", "dead")

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.dead = 0

    def _count(self, member: Member, sign: int) -> None:
        state = member.state
        if state is MemberState.ALIVE or state is MemberState.SUSPECT:
            self.live += sign
        elif state is MemberState.DEAD:
            self.dead += sign

    def moved(self, previous: MemberState, state: MemberState) -> None:
        """A row in the table went from ``previous`` to ``state``."""
        if previous is MemberState.ALIVE or previous is MemberState.SUSPECT:
            self.live -= 1
        elif previous is MemberState.DEAD:
            self.dead -= 1
        if state is MemberState.ALIVE or state is MemberState.SUSPECT:
            self.live += 1
        elif state is MemberState.DEAD:
            self.dead += 1

    def __setitem__(self, peer_id: str, member: Member) -> None:
        old = dict.get(self, peer_id)
        if old is not None:
            self._count(old, -1)
        dict.__setitem__(self, peer_id, member)
        self._count(member, +1)

    def __delitem__(self, peer_id: str) -> None:
        member = dict.pop(self, peer_id)
        self._count(member, -1)

    _MISSING = object()

    def pop(self, peer_id: str, default: object = _MISSING):  # type: ignore[override]
        if peer_id in self:
            member = dict.pop(self, peer_id)
            self._count(member, -1)
            return member
        if default is MemberTable._MISSING:
            raise KeyError(peer_id)
        return default

    def popitem(self) -> tuple[str, Member]:
        peer_id, member = dict.popitem(self)
        self._count(member, -1)
        return peer_id, member

    def setdefault(self, peer_id: str, default: Member) -> Member:  # type: ignore[override]
        if peer_id not in self:
            self[peer_id] = default
        return dict.__getitem__(self, peer_id)

    def update(self, *args, **kwargs) -> None:  # type: ignore[override]
        for peer_id, member in dict(*args, **kwargs).items():
            self[peer_id] = member

    def __ior__(self, other):  # type: ignore[override]
        self.update(other)
        return self

    def clear(self) -> None:
        dict.clear(self)
        self.live = self.dead = 0


@dataclass(slots=True)
class _Candidate:
    contact: PeerContact
    next_hello: float
    backoff_s: float
    expires: float | None  # None: static bootstrap, never expires
    hellos_sent: int = 0


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


def _shuffle(rng: random.Random, items: list) -> None:
    """``rng.shuffle(items)``: the same permutation and the same draws from ``rng``.

    For a plain :class:`random.Random` this is CPython's own algorithm (Fisher-Yates
    from the end, ``_randbelow`` by rejection on ``getrandbits``) without its
    per-element method call: the simulator shuffles every peer's member list once per
    probe pass (n^2 elements per pass for n peers). ``tests/test_membership.py``
    checks it against ``random.Random.shuffle``.
    """
    if type(rng) is not random.Random:
        rng.shuffle(items)
        return
    getrandbits = rng.getrandbits
    for i in range(len(items) - 1, 0, -1):
        n = i + 1
        k = n.bit_length()
        j = getrandbits(k)
        while j >= n:
            j = getrandbits(k)
        items[i], items[j] = items[j], items[i]


class Membership:
    """The SWIM/Lifeguard state machine of one peer.

    Args:
        self_contact: our own contact (peer id, transport key, addresses).
        incarnation: our incarnation, >= 1; the node persists and bumps it at
            every start so a restarted peer overrides stale dead claims.
        config: timers and limits.
        rng: the only randomness used (target order, probe ids, helpers).
        now: monotonic seconds at construction.
        proofs: signs our alive claims and checks others' (PROTOCOL s10.3); None: we
            sign nothing and check nothing (then our contact must not list
            :data:`ALIVE_PROOF_CAPABILITY`, and alive claims about members that list
            it are taken only from the member itself).

    Raises:
        LocalProtocolError: ``incarnation`` outside 1 .. 2**62, or a contact that lists
            :data:`ALIVE_PROOF_CAPABILITY` without ``proofs``.
    """

    def __init__(
        self,
        self_contact: PeerContact,
        incarnation: int,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        *,
        proofs: AliveProofs | None = None,
    ) -> None:
        if incarnation < 1:
            raise LocalProtocolError("incarnation starts at 1")
        if incarnation > MAX_INCARNATION:
            raise LocalProtocolError(f"incarnation {incarnation} is above 2**62: no Hello can carry it")
        if proofs is None and ALIVE_PROOF_CAPABILITY in self_contact.capabilities:
            raise LocalProtocolError(f"a contact listing {ALIVE_PROOF_CAPABILITY!r} needs AliveProofs "
                                     "to sign its alive claims")
        self.proofs = proofs
        self._self_proof: bytes | None = None  # our signature over our alive statement at...
        self._self_proof_incarnation = 0  # ...this incarnation (signed when first needed after a change)
        self.contact = self_contact
        self.peer_id = self_contact.peer_id
        self.incarnation = incarnation
        self.config = config
        self.rng = rng
        self.members = MemberTable()
        self.candidates: dict[str, dict[bytes, _Candidate]] = {}
        # expiring candidates, oldest first (lazily cleaned): when the table is full the oldest
        # one that was already sent a Hello and did not answer makes room for a new hint
        self._candidate_order: deque[_Candidate] = deque()
        self.candidates_evicted = 0  # made room for a newer hint
        self.candidates_refused = 0  # table full of hints not yet tried: the new one dropped
        self.member_lists_refused = 0  # a peer asked for our full list again within the interval
        self.hellos_refused = 0  # a Hello listing no address: the sender could never be reached
        self.incarnations_refused = 0  # gossip about us at >= REFUTE_LIMIT, or about another
        #                                peer more than GOSSIP_INCARNATION_STEP above what we know
        self.relays_refused = 0  # ping_req over the requester's quota, a repeat, or table full
        self.alive_unsigned = 0  # an alive claim raising a signing member's incarnation, unsigned,
        #                          from a third party: ignored
        self.alive_bad_signatures = 0  # an alive claim whose signature does not verify (or a
        #                                signed claim after one in the same message, unchecked)
        self._bad_proof_in_message = False
        # peer id -> when we last sent it a full member list it asked for (pruned at each sync)
        self._list_sent: dict[str, float] = {}
        # Timer heaps, lazily cleaned (an entry is acted on only if it still matches the
        # row it names), so tick() and next_deadline() cost O(log n) per timer, not O(n):
        #   suspicion timeouts: (suspect_deadline, seq, member)
        #   dead/left retention: (state_since + dead_retention_s, seq, member, state_since)
        #   candidates: (next_hello, seq, candidate) and (expires, seq, candidate); a
        #   candidate always has an entry at or before its next_hello (and its expiry).
        self._suspect_timers: list[tuple[float, int, Member]] = []
        self._retention_timers: list[tuple[float, int, Member, float]] = []
        self._hello_timers: list[tuple[float, int, _Candidate]] = []
        self._expiry_timers: list[tuple[float, int, _Candidate]] = []
        self._timer_seq = itertools.count()
        self.local_health = 0
        self._actions: list[Action] = []
        # peer_id -> [MemberUpdate, sends_left, recipients]: a send is spent only on a
        # recipient that did not get the update yet (recipients: a set of peer ids)
        self._gossip: dict[str, list] = {}
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._next_probe_at = now + config.probe_interval_s * rng.random()
        self._relays: dict[int, _Relay] = {}
        self._relays_by: dict[str, int] = {}  # requester -> relays pending for it
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
                if expires < existing.expires:
                    heapq.heappush(self._expiry_timers, (expires, next(self._timer_seq), existing))
                existing.expires = expires
            if addresses[:HELLO_ADDRESSES] != old[:HELLO_ADDRESSES]:  # a new place to try: at once
                existing.next_hello = now
                existing.backoff_s = self.config.hello_retry_min_s
                heapq.heappush(self._hello_timers, (now, next(self._timer_seq), existing))
            return
        if not static and sum(len(v) for v in self.candidates.values()) >= self.config.max_candidates \
                and not self._evict_candidate():
            self.candidates_refused += 1
            return  # bounded: a flood of hints cannot grow memory (static contacts still go in)
        cand = _Candidate(contact=contact, next_hello=now, backoff_s=self.config.hello_retry_min_s,
                          expires=expires)
        self.candidates.setdefault(pid, {})[contact.transport_key] = cand
        if not static:
            order = self._candidate_order
            order.append(cand)
            if len(order) > 2 * self.config.max_candidates + 64:  # drop the entries no longer listed
                self._candidate_order = deque(c for c in order if c.expires is not None
                                              and self._candidate_listed(c))
        heapq.heappush(self._hello_timers, (now, next(self._timer_seq), cand))
        if expires is not None:
            heapq.heappush(self._expiry_timers, (expires, next(self._timer_seq), cand))

    def preload_members(self, contacts: Iterable[PeerContact], now: float, *, incarnation: int = 1) -> int:
        """Start from a converged table: each contact becomes an alive member at
        ``incarnation``, as if its signed Hello had been accepted, with no actions
        (no Connect, event, gossip or message: the driver routes to these contacts
        itself). For a driver's warm start (the simulator's); the node never calls it.

        Our own contact and peers already in the table are skipped. Returns how many
        members were added.

        Raises:
            LocalProtocolError: the table would exceed ``max_members`` (nothing added).
        """
        table = self.members
        fresh = {c.peer_id: c for c in contacts}
        fresh.pop(self.peer_id, None)
        for pid in [p for p in fresh if p in table] if table else ():
            del fresh[pid]
        if len(table) + len(fresh) > self.config.max_members:
            raise LocalProtocolError(
                f"preload_members: {len(table) + len(fresh)} members exceed max_members "
                f"({self.config.max_members})")
        same = itertools.repeat
        rows = map(Member, fresh.values(), same(incarnation), same(MemberState.ALIVE), same(now),
                   same(now), same(incarnation))
        dict.update(table, zip(fresh, rows))  # counted in bulk: all alive
        table.live += len(fresh)
        return len(fresh)

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
            if msg.reply_requested and self._may_send_list(sender, now):
                self._send_member_list(sender, reply_requested=False)

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        if self._left:
            return
        cfg = self.config
        self._tick_candidates(now)
        # suspicion timeouts (in member-table order, as a scan of the table would meet them)
        due = self._due_suspects(now)
        if len(due) > 1:
            rank = {pid: i for i, pid in enumerate(self.members)}
            due.sort(key=lambda m: rank[m.peer_id])
        for member in due:
            self._set_state(member, MemberState.DEAD, member.incarnation, now)
            self._queue_gossip(member)
        self._expire_gone(now)
        # the running probe
        probe = self._probe
        if probe is not None and not probe.acked:
            if not probe.indirect_sent and now >= probe.ack_deadline:
                probe.indirect_sent = True
                helpers = [p for p in self._alive_ids() if p != probe.target]
                _shuffle(self.rng, helpers)
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
        if self._relays:
            for probe_id in [k for k, r in self._relays.items() if now >= r.expires]:
                self._drop_relay(probe_id)
        if now >= self._next_sync_at:
            self._next_sync_at = now + cfg.sync_interval_s
            if self._list_sent:
                horizon = now - cfg.member_list_min_interval_s
                self._list_sent = {p: t for p, t in self._list_sent.items() if t > horizon}
            alive = self._alive_ids()
            if alive:
                self._send_member_list(self.rng.choice(alive), reply_requested=True)
        if now >= self._next_reconnect_at:
            self._next_reconnect_at = now + cfg.reconnect_interval_s
            gone = [m for m in self.members.values() if m.state is MemberState.DEAD] \
                if self.members.dead else []
            if gone:
                self._actions.append(Send(self.rng.choice(gone).peer_id,
                                          self._hello(reply_requested=True)))

    def next_deadline(self) -> float:
        """Monotonic time of the next timer (call :meth:`tick` then); inf after leave."""
        if self._left:
            return math.inf
        deadlines = [self._next_probe_at, self._next_sync_at, self._next_reconnect_at,
                     self._next_suspect_deadline(), self._next_hello_at()]
        if self._probe is not None:
            deadlines.append(self._probe.period_end)
            if not self._probe.indirect_sent and not self._probe.acked:
                deadlines.append(self._probe.ack_deadline)
        deadlines.extend(r.expires for r in self._relays.values())  # at most 256
        return min(deadlines)

    def change_contact(self, contact: PeerContact, now: float) -> bool:
        """Our addresses changed (a DHCP lease, an interface that came up): from now on
        ``contact`` is ours. Members take a contact only from a Hello of a newer incarnation
        (§9.2), so the incarnation rises by one (unless it is at :data:`REFUTE_LIMIT`, where
        members keep dialling the old contact until our next start), a Hello goes to every
        live member and our update is gossiped. Returns False when nothing changed.

        Raises:
            LocalProtocolError: ``contact`` names another peer or transport key.
        """
        if contact.peer_id != self.peer_id or contact.transport_key != self.contact.transport_key:
            raise LocalProtocolError("change_contact: our own peer id and transport key only")
        if contact == self.contact or self._left:
            return False
        self.contact = contact
        if self.incarnation < REFUTE_LIMIT:
            self.incarnation += 1
        for pid in self._alive_ids():
            self._send(pid, self._hello(reply_requested=False))
        self._queue_gossip(None)
        return True

    def leave(self, now: float) -> None:
        """Announce a graceful leave to every live member and stop reacting."""
        for pid in self._alive_ids():
            self._send(pid, Leave(incarnation=self.incarnation))
        self._left = True

    # ------------------------------------------------------------- views

    def member_count(self) -> int:
        """Live members including ourselves (the n of the SWIM formulas)."""
        return 1 + self.members.live

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

    def _evict_candidate(self) -> bool:
        """Make room in a full candidate table: forget the oldest expiring candidate that was
        sent a Hello and has not answered (an answer makes it a member). Anyone on the LAN
        can forge well-formed DNS-SD records (the network id in them is public): refusing
        every new hint once 1024 forged ones were held blocked discovery for their 10-minute
        lifetime, renewed by each re-announcement. A real peer answers its first Hello
        within a round trip, and it is the newest entry, so a flood must insert the whole
        table's worth of hints after it before it can be evicted. False when every expiring
        candidate is still waiting for its first Hello (the new hint is then dropped)."""
        order = self._candidate_order
        while order:
            cand = order[0]
            if cand.expires is None or not self._candidate_listed(cand):
                order.popleft()
                continue
            if cand.hellos_sent == 0:
                return False
            order.popleft()
            per_peer = self.candidates[cand.contact.peer_id]
            del per_peer[cand.contact.transport_key]
            if not per_peer:
                del self.candidates[cand.contact.peer_id]
            self.candidates_evicted += 1
            return True
        return False

    def _tick_candidates(self, now: float) -> None:
        if self._next_hello_at() > now and self._next_expiry_at() > now:
            return  # nothing due: the scan below would change nothing
        for pid in list(self.candidates):
            per_peer = self.candidates[pid]
            for key in list(per_peer):
                cand = per_peer[key]
                if cand.expires is not None and now >= cand.expires:
                    del per_peer[key]
                elif now >= cand.next_hello:
                    self._actions.append(Send(pid, self._hello(True), via=cand.contact))
                    cand.hellos_sent += 1
                    cand.next_hello = now + cand.backoff_s * (0.5 + self.rng.random())
                    cand.backoff_s = min(self.config.hello_retry_max_s, cand.backoff_s * 2)
            if not per_peer:
                del self.candidates[pid]

    def _on_hello(self, sender: str, msg: Hello, now: float) -> None:
        contact = msg.contact
        if contact.peer_id != sender or sender == self.peer_id:
            return  # a Hello speaks only for its signer
        if not contact.addresses:  # unroutable: adding it only made it fail its probes
            self.hellos_refused += 1
            return
        member = self.members.get(sender)
        if member is None and len(self.members) >= self.config.max_members:
            return  # not added: its candidate entries stay (a static one is retried)
        static = self.candidates.pop(sender, None)
        if static:  # keep static bootstrap contacts for later reconnects
            for cand in static.values():
                if cand.expires is None and cand.contact.transport_key != contact.transport_key:
                    self.candidates.setdefault(sender, {})[cand.contact.transport_key] = cand
        if member is None:
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
        else:
            member.incarnation = incarnation
        # our Hello first: a restarted peer that lost us takes a member list only from a member,
        # so a list sent before it ignored it, and its own request then fell in our interval
        if msg.reply_requested:
            self._send(sender, self._hello(reply_requested=False))
        if was is not MemberState.ALIVE and self._may_send_list(sender, now):
            self._send_member_list(sender, reply_requested=True)

    def _set_state(self, member: Member, state: MemberState, incarnation: int, now: float,
                   emit: bool = True) -> None:
        previous = member.state
        member.incarnation = incarnation
        member.alive_claim_incarnation = 0  # (claims count only while it is dead or left)
        if state is not MemberState.SUSPECT:
            member.suspect_deadline = member.suspect_started = None
            member.confirmations = _NO_CONFIRMATIONS
        if state is previous:
            return
        member.state = state
        member.state_since = now
        if self.members.get(member.peer_id) is member:
            self.members.moved(previous, state)
            if state is MemberState.DEAD or state is MemberState.LEFT:
                heapq.heappush(self._retention_timers, (now + self.config.dead_retention_s,
                                                        next(self._timer_seq), member, now))
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
            self._confirm(member, by)
        else:
            started = member.suspect_started
            # A suspicion at a higher incarnation replaces the one running: only reports
            # about the new incarnation confirm it (PROTOCOL s10.2). Its timer restarts only
            # if the peer was heard from since the old one began; otherwise gossip alone
            # (anyone can claim "suspect at inc + 1") could postpone a dead peer forever.
            keep = member.state is MemberState.SUSPECT and started is not None \
                and member.last_seen <= started
            self._set_state(member, MemberState.SUSPECT, incarnation, now)
            member.confirmations = _NO_CONFIRMATIONS
            member.suspect_started = started if keep else now
            if by != self.peer_id:
                self._confirm(member, by)
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
        member.suspect_deadline = deadline = member.suspect_started + timeout
        heapq.heappush(self._suspect_timers, (deadline, next(self._timer_seq), member))

    @staticmethod
    def _confirm(member: Member, by: str) -> None:
        if member.confirmations is _NO_CONFIRMATIONS:
            member.confirmations = {by}
        else:
            member.confirmations.add(by)  # type: ignore[union-attr]

    # ------------------------------------------------------------- timers

    def _due_suspects(self, now: float) -> list[Member]:
        """Suspects whose suspicion timed out at ``now`` (each once), popped from the heap."""
        timers, due = self._suspect_timers, []
        while timers and timers[0][0] <= now:
            deadline, _, member = heapq.heappop(timers)
            if member.suspect_deadline == deadline and member.state is MemberState.SUSPECT \
                    and self.members.get(member.peer_id) is member \
                    and not any(m is member for m in due):
                due.append(member)
        return due

    def _next_suspect_deadline(self) -> float:
        timers = self._suspect_timers
        while timers:
            deadline, _, member = timers[0]
            if member.suspect_deadline == deadline and member.state is MemberState.SUSPECT \
                    and self.members.get(member.peer_id) is member:
                return deadline
            heapq.heappop(timers)
        return math.inf

    def _expire_gone(self, now: float) -> None:
        """Forget dead and left members after ``dead_retention_s`` (not a deadline of its
        own: done at the first tick after, as a scan of the table would)."""
        timers, retention = self._retention_timers, self.config.dead_retention_s
        if not timers:
            return
        # the heap key is state_since + retention; the rule is now - state_since > retention:
        # look a rounding error ahead and decide with the rule itself
        horizon = now + 1e-9 * (abs(now) + retention + 1.0)
        if timers[0][0] > horizon:
            return
        later = []
        while timers and timers[0][0] <= horizon:
            entry = heapq.heappop(timers)
            member, since = entry[2], entry[3]
            if member.state_since != since or member.state not in _GONE \
                    or self.members.get(member.peer_id) is not member:
                continue
            if now - since > retention:
                del self.members[member.peer_id]
            else:
                later.append(entry)
        for entry in later:
            heapq.heappush(timers, entry)

    def _candidate_listed(self, cand: _Candidate) -> bool:
        per_peer = self.candidates.get(cand.contact.peer_id)
        return per_peer is not None and per_peer.get(cand.contact.transport_key) is cand

    def _next_hello_at(self) -> float:
        """Earliest ``next_hello`` of any candidate (inf if none)."""
        timers = self._hello_timers
        while timers:
            at, _, cand = timers[0]
            if not self._candidate_listed(cand):
                heapq.heappop(timers)
            elif cand.next_hello != at:  # moved since: re-file at its current time
                heapq.heapreplace(timers, (cand.next_hello, next(self._timer_seq), cand))
            else:
                return at
        return math.inf

    def _next_expiry_at(self) -> float:
        """Earliest expiry of any expiring candidate (inf if none)."""
        timers = self._expiry_timers
        while timers:
            at, _, cand = timers[0]
            if cand.expires is None or not self._candidate_listed(cand):
                heapq.heappop(timers)
            elif cand.expires != at:
                heapq.heapreplace(timers, (cand.expires, next(self._timer_seq), cand))
            else:
                return at
        return math.inf

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
            table = self.members
            order = list(table) if table.live == len(table) else \
                [p for p, m in table.items() if m.state in _LIVE]
            if not order:
                return
            _shuffle(self.rng, order)
            self._probe_order = order
            target = self._probe_order.pop()
        probe_id = self.rng.getrandbits(63)
        self._probe = _Probe(probe_id=probe_id, target=target, sent_at=now,
                             ack_deadline=now + cfg.probe_timeout_s * scale,
                             period_end=now + cfg.probe_interval_s * scale)
        self._send(target, Ping(probe_id=probe_id, updates=self._piggyback(target)))

    def _on_ack(self, sender: str, msg: Ack, now: float) -> None:
        relay = self._relays.get(msg.probe_id)
        if relay is not None and relay.target == sender:
            self._drop_relay(msg.probe_id)
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
        if target is None or target.state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return
        # 256 relays in all, at most relay_quota per requester and one per (requester,
        # probe id): one member cannot fill the table and make us refuse everyone else.
        held = self._relays_by.get(sender, 0)
        if len(self._relays) >= 256 or held >= self.config.relay_quota or (held and any(
                r.requester == sender and r.requester_probe_id == msg.probe_id
                for r in self._relays.values())):
            self.relays_refused += 1
            return
        probe_id = self.rng.getrandbits(63)
        self._relays[probe_id] = _Relay(requester=sender, requester_probe_id=msg.probe_id,
                                        target=msg.target,
                                        expires=now + self.config.probe_interval_s * 2)
        self._relays_by[sender] = held + 1
        self._send(msg.target, Ping(probe_id=probe_id, updates=self._piggyback(msg.target)))

    def _drop_relay(self, probe_id: int) -> None:
        relay = self._relays.pop(probe_id)
        left = self._relays_by[relay.requester] - 1
        if left:
            self._relays_by[relay.requester] = left
        else:
            del self._relays_by[relay.requester]

    def _may_send_list(self, to: str, now: float) -> bool:
        """Whether ``to`` may make us send our full member list now (at most once per
        ``member_list_min_interval_s``: it costs ~290 bytes and a signature share per member)."""
        last = self._list_sent.get(to)
        if last is not None and now - last < self.config.member_list_min_interval_s:
            self.member_lists_refused += 1
            return False
        self._list_sent[to] = now
        return True

    # ------------------------------------------------------- dissemination

    def _update_of(self, member: Member) -> MemberUpdate:
        state = member.state
        signature = member.proof if state is MemberState.ALIVE \
            and member.proof_incarnation == member.incarnation else None
        return MemberUpdate(peer_id=member.peer_id, state=state.value,
                            incarnation=member.incarnation, contact=member.contact, signature=signature)

    def _self_update(self) -> MemberUpdate:
        return MemberUpdate(peer_id=self.peer_id, state=MemberState.ALIVE.value,
                            incarnation=self.incarnation, contact=self.contact, signature=self._own_proof())

    def _own_proof(self) -> bytes | None:
        """Our signature over our alive statement at our current incarnation (signed once
        per incarnation: at start, refutation or contact change, when first gossiped)."""
        proofs = self.proofs
        if proofs is None:
            return None
        if self._self_proof is None or self._self_proof_incarnation != self.incarnation:
            signature = proofs.sign(alive_statement(proofs.network_id, self.peer_id, self.incarnation))
            if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
                raise LocalProtocolError("AliveProofs.sign must return a 64-byte signature")
            self._self_proof, self._self_proof_incarnation = signature, self.incarnation
        return self._self_proof

    def _for_recipient(self, to: str, updates: tuple[MemberUpdate, ...]) -> tuple[MemberUpdate, ...]:
        """``updates`` as ``to`` may receive them: without signatures unless its verified
        contact lists :data:`ALIVE_PROOF_CAPABILITY` (an older peer rejects the unknown
        field, and with it the whole message, PROTOCOL s7)."""
        member = self.members.get(to)
        if member is not None and ALIVE_PROOF_CAPABILITY in member.contact.capabilities:
            return updates
        if not any(u.signature is not None for u in updates):
            return updates
        return tuple(u if u.signature is None else replace(u, signature=None) for u in updates)

    def _queue_gossip(self, member: Member | None) -> None:
        update = self._self_update() if member is None else self._update_of(member)
        sends = self.config.gossip_mult * math.ceil(math.log10(self.member_count() + 1))
        self._gossip[update.peer_id] = [update, max(1, sends), set()]

    def _piggyback(self, to: str) -> tuple[MemberUpdate, ...]:
        if not self._gossip:
            return ()
        # A pending update about the recipient always goes first: a suspected
        # member must hear the suspicion to refute it (SWIM s4.2).
        about_to = self._gossip.get(to)
        # The others: only those the recipient has not been sent yet, most sends left first.
        # A send is spent only on a new recipient, so one peer's pings (each answered with
        # an Ack) cannot use up an update, such as our refutation, that others still need.
        rest = sorted((item for pid, item in self._gossip.items() if pid != to and to not in item[2]),
                      key=lambda item: -item[1])
        chosen = ([about_to] if about_to else []) + rest
        chosen = chosen[: self.config.max_piggyback]
        if not chosen:
            return ()
        live = self.members.live
        for item in chosen:
            recipients = item[2]
            if to in recipients:
                continue
            item[1] -= 1
            if item[1] <= 0:
                self._gossip.pop(item[0].peer_id, None)
            elif len(recipients) + 1 >= live:
                recipients.clear()  # every live member has it: a new round may repeat it to each
            else:
                recipients.add(to)
        return self._for_recipient(to, tuple(item[0] for item in chosen))

    def _send_member_list(self, to: str, *, reply_requested: bool) -> None:
        updates = self._for_recipient(
            to, (self._self_update(),) + tuple(self._update_of(m) for m in self.members.values()))
        for start in range(0, len(updates), 256):
            self._send(to, MemberList(members=updates[start:start + 256],
                                      reply_requested=reply_requested and start == 0))

    def _apply_updates(self, sender: str, updates: tuple[MemberUpdate, ...], now: float) -> None:
        self._bad_proof_in_message = False
        for update in updates:
            self._apply_update(sender, update, now)

    def _proof_ok(self, peer_id: str, incarnation: int, signature: bytes) -> bool:
        """Whether ``signature`` is ``peer_id``'s over its alive statement at ``incarnation``.
        After one bad signature in a message the others in it are refused unchecked: an
        honest member only relays signatures it verified, so one message costs a forger at
        most one check. Counts ``alive_bad_signatures``."""
        proofs = self.proofs
        if proofs is not None and not self._bad_proof_in_message:
            if proofs.verify(public_key_from_peer_id(peer_id), signature,
                             alive_statement(proofs.network_id, peer_id, incarnation)):
                return True
            self._bad_proof_in_message = True
        self.alive_bad_signatures += 1
        return False

    def _keep_proof(self, member: Member, incarnation: int, signature: bytes) -> None:
        """Hold ``member``'s verified signature at ``incarnation``; a queued "alive" update
        about it at that incarnation, built before we had it, now carries it."""
        member.proof, member.proof_incarnation = signature, incarnation
        item = self._gossip.get(member.peer_id)
        if item is not None:
            queued = item[0]
            if queued.state == "alive" and queued.incarnation == incarnation and queued.signature is None:
                item[0] = replace(queued, signature=signature)

    def _apply_update(self, sender: str, update: MemberUpdate, now: float) -> None:
        state = _STATE_OF[update.state]
        pid = update.peer_id
        if pid == self.peer_id:
            if update.incarnation >= REFUTE_LIMIT \
                    or update.incarnation > self.incarnation + GOSSIP_INCARNATION_STEP:
                # Only a forger names us this high (we never go past REFUTE_LIMIT by
                # refuting, and restarts add one each): refuting would take us to an
                # incarnation that our next start could no longer encode. Nobody holds us
                # far above our own incarnation either: without the step bound one forged
                # "suspect at REFUTE_LIMIT - 1" pushed us to the cap, where we could never
                # refute again (PROTOCOL s10.4).
                self.incarnations_refused += 1
            elif state in (MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT) \
                    and self.incarnation <= update.incarnation:
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
        if update.incarnation > inc + GOSSIP_INCARNATION_STEP:
            # A peer's incarnation grows by one per refutation or start; a jump this large
            # in gossip is forged (it would pin the peer near 2**62). Its own Hello may jump.
            self.incarnations_refused += 1
            return
        if state is MemberState.ALIVE:
            if update.incarnation < inc:
                return
            signature = update.signature
            signs = ALIVE_PROOF_CAPABILITY in member.contact.capabilities
            if update.incarnation == inc:
                # The claim we hold: keep its signature if we have none yet (one check per
                # member and incarnation), to re-gossip it (a Hello raised the incarnation).
                if signs and signature is not None \
                        and (member.proof is None or member.proof_incarnation != inc) \
                        and self._proof_ok(pid, inc, signature):
                    self._keep_proof(member, inc, signature)
                return
            if member.state in (MemberState.DEAD, MemberState.LEFT) \
                    and update.incarnation <= member.alive_claim_incarnation:
                return  # asked about already: no second signature check, no second Hello
            if signs:
                # Only the peer raises its own incarnation: a third party's claim must carry
                # its signature; its own envelope speaks for it (PROTOCOL s10.3).
                if signature is not None and self._proof_ok(pid, update.incarnation, signature):
                    self._keep_proof(member, update.incarnation, signature)
                elif pid != sender:
                    if signature is None:
                        self.alive_unsigned += 1
                    return
            if member.state in (MemberState.DEAD, MemberState.LEFT):
                # Someone heard from it; verify ourselves before believing (one Hello per higher
                # claim). The row keeps the incarnation it failed at: "dead at U.inc" in our
                # gossip and member lists would kill it at an incarnation nobody saw fail.
                # (A claim at or below alive_claim_incarnation returned above.)
                member.alive_claim_incarnation = update.incarnation
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
