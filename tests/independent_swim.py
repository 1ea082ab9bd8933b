"""A clean-room SWIM + Lifeguard member written from docs/PROTOCOL.md §9-§10 alone.

It builds on the clean-room peer of §1-§9 (``tests/independent_peer.py``: tokens,
envelopes, the strict codec, the transport) and imports nothing from ``chimera``.
What it adds, each by the section that states it:

* a member table with states and incarnations (§10.1), filled only by Hellos (§9.1,
  §9.2), candidates from gossip with the Hello backoff of §9.1, member lists (§9.3);
* probing: shuffled round robin, ``ping``, ``ping_req`` to helpers after the probe
  timeout, suspicion at the end of the period, the acceptable-ack rule, the local health
  multiplier (LHM), relaying other members' ``ping_req`` with the §10.2 limits (§10.2);
* Lifeguard suspicion timeouts from the number of independent confirmations (§10.2);
* dissemination: per-update send budgets and rounds, piggybacking on ``ping``/``ack``/
  ``ping_req`` (the recipient's own update first), the precedence table of §10.3, signed
  alive claims (it lists ``signed_alive`` and signs every incarnation it takes);
* refutation (§10.4), leave, dead/left members, reconnect and anti-entropy (§9.3, §10.5).

Times: monotonic float seconds inside (``*_s``), wall-clock ms on the wire (§1).
Test hooks (``answer_pings``, ``relaying``, ``refuting``, ``probing``, ``answer_hellos``)
switch single behaviours off so that a test can make a path fail; they default to the
behaviour the spec asks for.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import nacl.exceptions
import nacl.signing
import zmq

from tests import independent_peer as ip

REFUTE_LIMIT = 2**62 - 2**20          # §10.1, §10.4
MAX_INCARNATION_JUMP = 2**16          # §10.3: a larger jump is forged
MAX_PENDING_RELAYS = 256              # §10.2
MAX_UPDATES_PER_MESSAGE = 16          # §8.2: ping/ping_req/ack updates
MEMBER_LIST_CHUNK = 256               # §9.3
LIVE = ("alive", "suspect")
GONE = ("dead", "left")


@dataclass(frozen=True)
class SwimConfig:
    """§10.6 defaults. All times in seconds. Raises ValueError on an impossible setting."""

    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_alpha: float = 4.0
    suspicion_beta: float = 6.0
    sync_interval_s: float = 30.0
    reconnect_interval_s: float = 10.0
    max_local_health: int = 8
    gossip_mult: int = 4
    max_piggyback: int = 8
    hello_retry_min_s: float = 0.5
    hello_retry_max_s: float = 30.0
    candidate_ttl_s: float = 600.0
    dead_retention_s: float = 3600.0
    max_members: int = 4096
    max_candidates: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout_s < self.probe_interval_s:
            raise ValueError("probe_timeout_s must be in (0, probe_interval_s)")
        if self.indirect_checks < 0 or self.max_local_health < 0 or self.max_piggyback < 1:
            raise ValueError("indirect_checks, max_local_health >= 0 and max_piggyback >= 1")
        if self.suspicion_alpha <= 0 or self.suspicion_beta < 1:
            raise ValueError("suspicion_alpha > 0 and suspicion_beta >= 1")

    @property
    def member_list_interval_s(self) -> float:
        return self.sync_interval_s / 4


def suspicion_bounds_s(n: int, cfg: SwimConfig) -> tuple[float, float]:
    """§10.2: (min_s, max_s) for ``n`` live members including self (n >= 1)."""
    min_s = cfg.suspicion_alpha * max(1.0, math.log10(max(1, n))) * cfg.probe_interval_s
    return min_s, cfg.suspicion_beta * min_s


def suspicion_timeout_s(n: int, confirmations: int, cfg: SwimConfig) -> float:
    """§10.2 Lifeguard timeout for ``n`` live members (self included) and ``confirmations``
    distinct other peers' suspect reports; in seconds, between min_s and max_s."""
    min_s, max_s = suspicion_bounds_s(n, cfg)
    k = min(cfg.indirect_checks, n - 2)
    if k < 1:
        return min_s
    return max(min_s, max_s - (max_s - min_s) * math.log(confirmations + 1) / math.log(k + 1))


def gossip_sends(n: int, gossip_mult: int) -> int:
    """§10.3: how many times one update is sent, ``max(1, gossip_mult·ceil(log10(n+1)))``."""
    return max(1, gossip_mult * math.ceil(math.log10(n + 1)))


def sign_alive(signing_key: nacl.signing.SigningKey, network_id: bytes, incarnation: int) -> bytes:
    """§10.3: the 64-byte signature of the key's peer over its alive statement."""
    peer_id = ip.peer_id_of(bytes(signing_key.verify_key))
    return signing_key.sign(ip.alive_statement(network_id, peer_id, incarnation)).signature


def verify_alive(network_id: bytes, peer_id: str, incarnation: int, signature: bytes) -> bool:
    """§10.3 with the receiver's network id; False for any invalid signature or key."""
    try:
        nacl.signing.VerifyKey(ip.public_key_of(peer_id)).verify(
            ip.alive_statement(network_id, peer_id, incarnation), signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, ip.ProtocolError):
        return False


@dataclass
class SwimMember:
    """Our view of one member. ``contact`` comes only from its own hello (§9.1)."""

    peer_id: str
    contact: dict
    incarnation: int
    state: str = "alive"
    last_hello_incarnation: int = 0
    signature: bytes | None = None        # its alive signature for signature_incarnation
    signature_incarnation: int = -1
    suspect_started_s: float = 0.0
    suspect_origin: str | None = None
    confirmations: set[str] = field(default_factory=set)
    last_heard_s: float = 0.0             # its last verified envelope
    changed_s: float = 0.0
    member_list_sent_s: float = -math.inf
    rtt_s: float | None = None

    @property
    def signs(self) -> bool:
        return "signed_alive" in self.contact.get("capabilities", ())


@dataclass
class _Pending:
    update: dict                          # MemberUpdate without its signature
    signature: bytes | None
    sends_left: int
    sent_to: set[str] = field(default_factory=set)


@dataclass
class _Probe:
    target: str
    probe_id: int
    started_s: float
    scale: int
    helpers: set[str] = field(default_factory=set)
    indirect_sent: bool = False


@dataclass
class _Relay:
    requester: str
    requester_probe_id: int
    target: str
    expires_s: float


@dataclass
class _Candidate:
    peer_id: str
    transport_key: bytes
    addresses: list[str]
    static: bool
    next_s: float
    delay_s: float
    expires_s: float
    hellos_sent: int = 0


class SwimPeer(ip.IndependentPeer):
    """A full SWIM member. Threads: the receive and ZAP threads of the base peer and a
    ticker (probes, suspicion deadlines, candidates, reconnect, anti-entropy).

    ``signing_key`` lets a restarted peer keep its identity; sequence numbers start at
    wall-clock ms × 2^20 (§6.3) so a restart never reuses one."""

    CAPABILITIES = ["membership", "echo", "signed_alive"]
    TICK_S = 0.02

    def __init__(self, network: ip.Network, host: str = "127.0.0.1", incarnation: int = 1,
                 config: SwimConfig | None = None, signing_key: nacl.signing.SigningKey | None = None,
                 rng: random.Random | None = None) -> None:
        if not 1 <= incarnation <= 2**62:
            raise ValueError("incarnation must be 1 .. 2^62")
        self.cfg = config or SwimConfig()
        self.rng = rng or random.Random(secrets.randbits(64))
        self.core: Counter = Counter()            # §10.6 core counters and our own tallies
        self.transitions: list[tuple[float, str, str, int]] = []   # (mono s, peer, state, inc)
        self.suspicions_of_us: list[tuple[float, str, str, int]] = []  # (mono s, sender, state, inc)
        self.acks: dict[int, list[tuple[str, str | None, tuple]]] = {}  # untracked probe id -> acks
        self.timer_deaths: list[tuple[float, str, float, int, int]] = []  # (mono s, peer, suspected for s, n, C)
        self.arrivals: list[tuple[str, str]] = []                   # (sender, kind) of each authentic envelope
        self.last_arrival_s: dict[tuple[str, str], float] = {}      # (sender, kind) -> monotonic s of the last
        self.relayed: list[tuple[float, str, str]] = []             # (mono s, requester, target) answered
        self.probe_results: list[tuple[float, str, str]] = []       # (mono s, target, direct|indirect|failed)
        self.lhm = 0
        self.answer_pings: Callable[[str], bool] = lambda sender: True
        self.unmute_on_refute = False
        self.relaying = True
        self.refuting = True
        self.probing = True
        self.answer_hellos = True
        self.has_left = False
        self.last_error: Exception | None = None
        self._outbox: list[tuple[str, str, dict, dict | None]] = []
        self._pending: dict[str, _Pending] = {}
        self._probe: _Probe | None = None
        self._next_probe_s = 0.0
        self._order: list[str] = []
        self._relays: dict[int, _Relay] = {}
        self._candidates: dict[tuple[str, bytes], _Candidate] = {}
        self._next_reconnect_s = time.monotonic() + self.cfg.reconnect_interval_s
        self._next_sync_s = time.monotonic() + self.cfg.sync_interval_s
        super().__init__(network, host, incarnation)
        with self._lock:
            if signing_key is not None:
                self.signing_key = signing_key
                self.public_key = bytes(signing_key.verify_key)
                self.peer_id = ip.peer_id_of(self.public_key)
            self.contact = ip.contact_body(self.peer_id, self.transport_public, [self.address], self.CAPABILITIES)
            self._seq = ip.now_ms() * 2**20
            self._own_signature = sign_alive(self.signing_key, self.network_id, self.incarnation)
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True, name="swim-tick")
        self._ticker.start()

    # -- helpers (called with the lock held unless said otherwise) -------------------------

    def _n(self) -> int:
        """§10.2: live members including self."""
        return 1 + sum(1 for m in self.members.values() if m.state in LIVE)

    def _set_state(self, m: SwimMember, state: str, incarnation: int, now_s: float) -> None:
        m.state, m.incarnation, m.changed_s = state, incarnation, now_s
        if state != "suspect":
            m.confirmations = set()
            m.suspect_origin = None
        self.transitions.append((now_s, m.peer_id, state, incarnation))
        self._changed.notify_all()

    def _queue(self, peer_id: str, state: str, incarnation: int, contact: dict | None,
               signature: bytes | None) -> None:
        """§10.3: queue a change; a newer update about the same peer replaces an older one."""
        self._pending[peer_id] = _Pending(ip.member_update(peer_id, state, incarnation, contact), signature,
                                          gossip_sends(self._n(), self.cfg.gossip_mult))

    def _queue_member(self, m: SwimMember) -> None:
        sig = m.signature if m.state == "alive" and m.signature_incarnation == m.incarnation else None
        self._queue(m.peer_id, m.state, m.incarnation, m.contact, sig)

    def _queue_self(self) -> None:
        self._queue(self.peer_id, "alive", self.incarnation, self.contact, self._own_signature)

    def _wire_update(self, update: dict, signature: bytes | None, recipient: str) -> dict:
        r = self.members.get(recipient)
        with_sig = signature is not None and update["state"] == "alive" and r is not None and r.signs
        return ip.member_update(update["peer_id"], update["state"], update["incarnation"], update["contact"],
                                signature if with_sig else None)

    def _piggyback(self, recipient: str) -> list[dict]:
        """§10.3: at most max_piggyback updates, the recipient's own pending update first, then
        those with the most sends left among those it was not sent in this round."""
        chosen: list[_Pending] = []
        own = self._pending.get(recipient)
        if own is not None:
            chosen.append(own)
        others = [p for k, p in self._pending.items() if k != recipient and recipient not in p.sent_to]
        others.sort(key=lambda p: -p.sends_left)
        chosen += others[:self.cfg.max_piggyback - len(chosen)]
        live = {pid for pid, m in self.members.items() if m.state in LIVE}
        out = []
        for p in chosen:
            out.append(self._wire_update(p.update, p.signature, recipient))
            if recipient not in p.sent_to:
                p.sent_to.add(recipient)
                p.sends_left -= 1
            if p.sends_left <= 0:
                self._pending.pop(p.update["peer_id"], None)
            elif live <= p.sent_to:
                p.sent_to.clear()  # everyone live had it: a new round
        return out

    def _own_update(self) -> dict:
        return ip.member_update(self.peer_id, "alive", self.incarnation, self.contact, self._own_signature)

    def _member_list_bodies(self, recipient: str, reply_requested: bool) -> list[dict]:
        rows = [self._wire_update(self._own_update(), self._own_signature, recipient)]
        for m in self.members.values():
            sig = m.signature if m.state == "alive" and m.signature_incarnation == m.incarnation else None
            rows.append(self._wire_update(ip.member_update(m.peer_id, m.state, m.incarnation, m.contact),
                                          sig, recipient))
        return [{"members": rows[i:i + MEMBER_LIST_CHUNK], "reply_requested": reply_requested and i == 0}
                for i in range(0, len(rows), MEMBER_LIST_CHUNK)]

    def _add_candidate(self, contact: dict, static: bool, now_s: float) -> None:
        """§9.1 candidate handling (keyed by peer id and transport key)."""
        if contact["peer_id"] == self.peer_id or not contact["addresses"]:
            return
        m = self.members.get(contact["peer_id"])
        if m is not None and m.state in LIVE and m.contact["transport_key"] == contact["transport_key"] \
                and m.contact["addresses"] == contact["addresses"]:
            return
        key = (contact["peer_id"], contact["transport_key"])
        c = self._candidates.get(key)
        if c is not None:
            first_two = c.addresses[:2]
            if c.static:
                merged = c.addresses + [a for a in contact["addresses"] if a not in c.addresses]
            else:
                merged = list(contact["addresses"]) + [a for a in c.addresses if a not in contact["addresses"]]
            c.addresses = merged[:8]
            c.expires_s = math.inf if c.static else now_s + self.cfg.candidate_ttl_s
            if c.addresses[:2] != first_two:
                c.next_s, c.delay_s = now_s, self.cfg.hello_retry_min_s
            return
        if len(self._candidates) >= self.cfg.max_candidates and not static:
            sent = [k for k, v in self._candidates.items() if not v.static and v.hellos_sent > 0]
            if not sent:
                self.core["candidates_refused"] += 1
                return
            del self._candidates[min(sent, key=lambda k: self._candidates[k].expires_s)]
            self.core["candidates_evicted"] += 1
        self._candidates[key] = _Candidate(contact["peer_id"], contact["transport_key"],
                                           list(contact["addresses"][:8]), static, now_s,
                                           self.cfg.hello_retry_min_s,
                                           math.inf if static else now_s + self.cfg.candidate_ttl_s)

    # -- §10.3 precedence ---------------------------------------------------------------------

    def _apply(self, updates: tuple[dict, ...], sender: str, now_s: float) -> None:
        """Apply received MemberUpdates by the table of §10.3 (sender = the envelope's)."""
        bad_signature_seen = False
        for u in updates:
            p, state, inc, sig = u["peer_id"], u["state"], u["incarnation"], u["signature"]
            if p == self.peer_id:
                if inc >= REFUTE_LIMIT or inc > self.incarnation + MAX_INCARNATION_JUMP:
                    self.core["incarnations_refused"] += 1
                elif state != "alive" and self.incarnation <= inc:
                    self.suspicions_of_us.append((now_s, sender, state, inc))
                    if self.refuting:
                        self._refute(inc, now_s)
                continue
            m = self.members.get(p)
            if m is None:
                if state in LIVE and u["contact"] is not None and u["contact"]["peer_id"] == p:
                    self._add_candidate(u["contact"], False, now_s)
                continue
            if p == sender and state != "alive":
                continue
            if inc > m.incarnation + MAX_INCARNATION_JUMP:
                self.core["incarnations_refused"] += 1
                continue
            if state == "alive":
                if inc == m.incarnation:
                    if m.signs and sig is not None and m.signature_incarnation != inc and not bad_signature_seen:
                        if verify_alive(self.network_id, p, inc, sig):
                            m.signature, m.signature_incarnation = sig, inc
                        else:
                            bad_signature_seen = True
                            self.core["alive_bad_signatures"] += 1
                    continue
                if inc < m.incarnation:
                    continue
                if m.signs and sender != p:
                    if sig is None:
                        self.core["alive_unsigned"] += 1
                        continue
                    if bad_signature_seen or not verify_alive(self.network_id, p, inc, sig):
                        bad_signature_seen = True
                        self.core["alive_bad_signatures"] += 1
                        continue
                    m.signature, m.signature_incarnation = sig, inc
                elif sig is not None:  # from P itself (or P does not sign): checked once, kept if valid
                    if verify_alive(self.network_id, p, inc, sig):
                        m.signature, m.signature_incarnation = sig, inc
                    else:
                        self.core["alive_bad_signatures"] += 1
                if m.state in GONE:
                    m.incarnation = inc
                    self._outbox.append((p, "hello", self.hello_body(True), m.contact))
                    continue
                self._set_state(m, "alive", inc, now_s)
                self._queue_member(m)
            elif state == "suspect":
                if m.state not in LIVE or inc < m.incarnation:
                    continue
                if m.state == "suspect" and inc == m.incarnation:
                    if sender != self.peer_id:
                        m.confirmations.add(sender)
                    continue
                if m.state == "suspect":
                    # §10.2: a higher suspicion while suspect keeps suspect_started unless P
                    # sent us a verified envelope after it started.
                    started = now_s if m.last_heard_s > m.suspect_started_s else m.suspect_started_s
                else:
                    started = now_s
                self._set_state(m, "suspect", inc, now_s)
                m.suspect_started_s, m.suspect_origin, m.confirmations = started, sender, {sender}
                self._queue_member(m)
            else:  # dead / left
                if inc >= m.incarnation and m.state not in GONE:
                    self._set_state(m, state, inc, now_s)
                    self._queue_member(m)

    def _refute(self, claimed: int, now_s: float) -> None:
        """§10.4: incarnation = claim + 1, LHM + 1, queue our signed alive update."""
        self.incarnation = claimed + 1
        self._own_signature = sign_alive(self.signing_key, self.network_id, self.incarnation)
        self.lhm = min(self.cfg.max_local_health, self.lhm + 1)
        self.core["refutations"] += 1
        self._queue_self()
        if self.unmute_on_refute:
            self.answer_pings = lambda sender: True
            self.unmute_on_refute = False
        self._changed.notify_all()

    # -- receiving ----------------------------------------------------------------------------

    def _handle(self, env: ip.Envelope, frame: bytes) -> None:
        try:
            self._handle_membership(env, frame)
        except Exception as exc:  # a bug must not stop the receive thread; counted like the reference
            with self._lock:
                self.stats.drops["handler_errors"] += 1
                self.last_error = exc

    def _handle_membership(self, env: ip.Envelope, frame: bytes) -> None:
        self._outbox: list[tuple[str, str, dict, dict | None]] = []
        now_s = time.monotonic()
        sender, body = env.sender_id, env.body
        with self._lock:
            if self.has_left:
                return
            self.arrivals.append((sender, env.kind))
            self.last_arrival_s[(sender, env.kind)] = now_s
            if env.kind == "hello":
                self.hellos.append(env)
                self._changed.notify_all()
                if self.answer_hellos:
                    self._on_hello(sender, body, now_s)
            else:
                m = self.members.get(sender)
                if m is None:
                    self.stats.ignored[f"{env.kind} from a non-member"] += 1
                elif m.state in GONE:
                    # §10.5: answer a dead/left member's non-hello with our hello and ignore it.
                    self._outbox.append((sender, "hello", self.hello_body(True), None))
                else:
                    m.last_heard_s = now_s
                    self._on_member_message(env.kind, sender, body, now_s, frame, env)
            outbox, self._outbox = self._outbox, []
        self._flush(outbox)

    def _on_hello(self, sender: str, body: dict, now_s: float) -> None:
        """§9.2."""
        contact, inc = body["contact"], body["incarnation"]
        if contact["peer_id"] != sender or sender == self.peer_id:
            return
        if not contact["addresses"]:
            self.core["hellos_refused"] += 1
            return
        for key in [k for k in self._candidates if k[0] == sender]:
            del self._candidates[key]
        m = self.members.get(sender)
        if m is None:
            if len(self.members) >= self.cfg.max_members:
                return
            m = self.members[sender] = SwimMember(sender, contact, inc, "alive", inc, last_heard_s=now_s,
                                                  changed_s=now_s)
            self.transitions.append((now_s, sender, "alive", inc))
            self._queue_member(m)
            self._outbox.append((sender, "hello", self.hello_body(False), None))
            m.member_list_sent_s = now_s
            for b in self._member_list_bodies(sender, True):
                self._outbox.append((sender, "member_list", b, None))
            self._changed.notify_all()
            return
        m.last_heard_s = now_s
        if m.state != "alive":
            if contact != m.contact and (m.state != "suspect" or inc > m.last_hello_incarnation):
                m.contact = contact
            m.last_hello_incarnation = max(m.last_hello_incarnation, inc)
            self._set_state(m, "alive", max(m.incarnation, inc), now_s)
            self._queue_member(m)
            if now_s - m.member_list_sent_s >= self.cfg.member_list_interval_s:
                m.member_list_sent_s = now_s
                for b in self._member_list_bodies(sender, True):
                    self._outbox.append((sender, "member_list", b, None))
            if body["reply_requested"]:
                self._outbox.append((sender, "hello", self.hello_body(False), None))
            return
        if contact != m.contact:
            if inc <= m.last_hello_incarnation:
                return  # a replayed older hello
            m.contact = contact
        m.last_hello_incarnation = max(m.last_hello_incarnation, inc)
        if inc > m.incarnation:
            m.incarnation = inc
            self.transitions.append((now_s, sender, "alive", inc))
        if body["reply_requested"]:
            self._outbox.append((sender, "hello", self.hello_body(False), None))

    def _on_member_message(self, kind: str, sender: str, body: dict, now_s: float, frame: bytes,
                           env: ip.Envelope) -> None:
        if kind == "ping":
            self._apply(body["updates"], sender, now_s)
            if self.answer_pings(sender):
                self._outbox.append((sender, "ack", {"probe_id": body["probe_id"], "of": None,
                                                     "updates": self._piggyback(sender)}, None))
        elif kind == "ack":
            self._apply(body["updates"], sender, now_s)
            self._on_ack(sender, body, now_s)
        elif kind == "ping_req":
            self._apply(body["updates"], sender, now_s)
            self._on_ping_req(sender, body, now_s)
        elif kind == "member_list":
            self._apply(body["members"], sender, now_s)
            if body["reply_requested"]:
                m = self.members[sender]
                if now_s - m.member_list_sent_s < self.cfg.member_list_interval_s:
                    self.core["member_lists_refused"] += 1
                else:
                    m.member_list_sent_s = now_s
                    for b in self._member_list_bodies(sender, False):
                        self._outbox.append((sender, "member_list", b, None))
        elif kind == "leave":
            m = self.members[sender]
            if m.state != "left" or body["incarnation"] > m.incarnation:
                self._set_state(m, "left", max(m.incarnation, body["incarnation"]), now_s)
                self._queue_member(m)
        elif kind == "echo_request":
            if body["reply"]:
                self._outbox.append((sender, "echo_reply", {"nonce": body["nonce"], "payload": body["payload"]},
                                     None))
        elif kind == "echo_reply":
            self.echo_replies[body["nonce"]] = (env, frame)
            self._changed.notify_all()
        else:
            self.stats.ignored[kind] += 1  # §6.5 step 21: no actor for it here

    def _on_ack(self, sender: str, body: dict, now_s: float) -> None:
        """§10.2 step 4 (our probe) and the relay's answer."""
        pid, of = body["probe_id"], body["of"]
        probe = self._probe
        if probe is not None and pid == probe.probe_id:
            direct = of is None and sender == probe.target
            if direct or (of == probe.target and sender in probe.helpers):
                self.lhm = max(0, self.lhm - 1)
                m = self.members.get(probe.target)
                if direct and m is not None:
                    rtt = now_s - probe.started_s
                    m.rtt_s = rtt if m.rtt_s is None else 0.8 * m.rtt_s + 0.2 * rtt
                self.probe_results.append((now_s, probe.target, "direct" if direct else "indirect"))
                self._probe = None
                self._changed.notify_all()
            return
        relay = self._relays.get(pid)
        if relay is not None and of is None and sender == relay.target:
            del self._relays[pid]
            self.relayed.append((now_s, relay.requester, relay.target))
            if relay.requester in self.members:
                self._outbox.append((relay.requester, "ack", {
                    "probe_id": relay.requester_probe_id, "of": relay.target,
                    "updates": self._piggyback(relay.requester)}, None))
            self._changed.notify_all()
            return
        self.acks.setdefault(pid, []).append((sender, of, body["updates"]))
        self._changed.notify_all()

    def _on_ping_req(self, sender: str, body: dict, now_s: float) -> None:
        """§10.2 relaying."""
        target = self.members.get(body["target"])
        pending_here = sum(1 for r in self._relays.values() if r.requester == sender)
        duplicate = any(r.requester == sender and r.requester_probe_id == body["probe_id"]
                        for r in self._relays.values())
        if (not self.relaying or target is None or target.state not in LIVE
                or len(self._relays) >= MAX_PENDING_RELAYS
                or pending_here >= 2 * max(1, self.cfg.indirect_checks) or duplicate):
            self.core["relays_refused"] += 1
            return
        probe_id = secrets.randbits(63)
        self._relays[probe_id] = _Relay(sender, body["probe_id"], target.peer_id,
                                        now_s + 2 * self.cfg.probe_interval_s)
        self.core["relays_started"] += 1
        self._outbox.append((target.peer_id, "ping", {"probe_id": probe_id,
                                                      "updates": self._piggyback(target.peer_id)}, None))

    def _flush(self, outbox: list[tuple[str, str, dict, dict | None]]) -> None:
        """Send queued messages outside the lock (a route may have vanished: unroutable)."""
        for peer_id, kind, body, contact in outbox:
            try:
                self.send(peer_id, kind, body, contact=contact)
            except KeyError:
                pass  # no route any more: send() counted drop_unroutable
            except zmq.ZMQError:
                with self._lock:
                    self.stats.drops["send_error"] += 1

    # -- the ticker: §9.1 candidates, §10.2 probing and suspicion, §9.3 / §10.5 timers ------

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick(time.monotonic())
            except Exception as exc:  # never let a bug stop probing silently: count it
                with self._lock:
                    self.stats.drops["tick_errors"] += 1
                    self.last_error = exc
            self._stop.wait(self.TICK_S)

    def _tick(self, now_s: float) -> None:
        out: list[tuple[str, str, dict, dict | None]] = []
        with self._lock:
            if self.has_left:
                return
            self._tick_candidates(now_s, out)
            if self.probing:
                self._tick_probe(now_s, out)
            self._tick_suspicions(now_s)
            for pid in [k for k, r in self._relays.items() if r.expires_s <= now_s]:
                del self._relays[pid]
            if now_s >= self._next_reconnect_s:
                self._next_reconnect_s = now_s + self.cfg.reconnect_interval_s
                dead = [m for m in self.members.values() if m.state == "dead"]
                if dead:
                    m = self.rng.choice(dead)
                    out.append((m.peer_id, "hello", self.hello_body(True), None))
            if now_s >= self._next_sync_s:
                self._next_sync_s = now_s + self.cfg.sync_interval_s
                alive = [m for m in self.members.values() if m.state == "alive"]
                if alive:
                    m = self.rng.choice(alive)
                    m.member_list_sent_s = now_s
                    for b in self._member_list_bodies(m.peer_id, True):
                        out.append((m.peer_id, "member_list", b, None))
            for pid in [k for k, m in self.members.items()
                        if m.state in GONE and now_s - m.changed_s > self.cfg.dead_retention_s]:
                del self.members[pid]
        self._flush(out)

    def _tick_candidates(self, now_s: float, out: list) -> None:
        for key, c in list(self._candidates.items()):
            if c.expires_s <= now_s:
                del self._candidates[key]
                continue
            if c.next_s > now_s:
                continue
            for addr in c.addresses[:2]:
                contact = ip.contact_body(c.peer_id, c.transport_key, [addr], [])
                out.append((c.peer_id, "hello", self.hello_body(True), contact))
            c.hellos_sent += 1
            c.next_s = now_s + c.delay_s * self.rng.uniform(0.5, 1.5)
            c.delay_s = min(self.cfg.hello_retry_max_s, c.delay_s * 2)

    def _tick_probe(self, now_s: float, out: list) -> None:
        probe = self._probe
        if probe is not None:
            m = self.members.get(probe.target)
            if m is None or m.state not in LIVE:
                self._probe = None  # the target left the table or went dead meanwhile
            elif not probe.indirect_sent and now_s >= probe.started_s + self.cfg.probe_timeout_s * probe.scale:
                probe.indirect_sent = True
                helpers = [p for p, h in self.members.items() if h.state == "alive" and p != probe.target]
                for h in self.rng.sample(helpers, min(self.cfg.indirect_checks, len(helpers))):
                    probe.helpers.add(h)
                    out.append((h, "ping_req", {"probe_id": probe.probe_id, "target": probe.target,
                                                "updates": self._piggyback(h)}, None))
            elif now_s >= probe.started_s + self.cfg.probe_interval_s * probe.scale:
                self._probe = None
                self.lhm = min(self.cfg.max_local_health, self.lhm + 1)
                self.probe_results.append((now_s, probe.target, "failed"))
                if m.state == "alive":
                    self._set_state(m, "suspect", m.incarnation, now_s)
                    m.suspect_started_s, m.suspect_origin, m.confirmations = now_s, self.peer_id, set()
                    self._queue_member(m)
                    out.append((m.peer_id, "ping", {"probe_id": secrets.randbits(63),
                                                    "updates": self._piggyback(m.peer_id)}, None))
        if self._probe is None and now_s >= self._next_probe_s:
            target = self._next_target()
            if target is None:
                return
            scale = self.lhm + 1
            self._probe = _Probe(target, secrets.randbits(63), now_s, scale)
            self._next_probe_s = now_s + self.cfg.probe_interval_s * scale
            out.append((target, "ping", {"probe_id": self._probe.probe_id,
                                         "updates": self._piggyback(target)}, None))

    def _next_target(self) -> str | None:
        """Randomized round robin over ALIVE and SUSPECT members, shuffled once per pass."""
        while self._order:
            candidate = self._order.pop()
            m = self.members.get(candidate)
            if m is not None and m.state in LIVE:
                return candidate
        live = [p for p, m in self.members.items() if m.state in LIVE]
        if not live:
            return None
        self.rng.shuffle(live)
        self._order = live
        return self._order.pop()

    def _tick_suspicions(self, now_s: float) -> None:
        n = self._n()
        for m in self.members.values():
            if m.state == "suspect":
                deadline = m.suspect_started_s + suspicion_timeout_s(n, len(m.confirmations), self.cfg)
                if now_s >= deadline:
                    self.timer_deaths.append((now_s, m.peer_id, now_s - m.suspect_started_s, n,
                                              len(m.confirmations)))
                    self._set_state(m, "dead", m.incarnation, now_s)
                    self._queue_member(m)

    # -- public operations --------------------------------------------------------------------

    def join(self, contact_uri: str) -> None:
        """Add a static bootstrap candidate (§10.5); its hello goes out on the next tick."""
        c = ip.parse_contact_uri(contact_uri)
        with self._lock:
            self._add_candidate(ip.contact_body(c.peer_id, c.transport_key, [c.endpoint], []), True,
                                time.monotonic())

    def add_stored_contact(self, contact: dict) -> None:
        """A previously verified contact (a PeerContact) as a candidate, as a restarted
        reference node adds those of its store (§10.5)."""
        with self._lock:
            self._add_candidate(contact, False, time.monotonic())

    def leave(self) -> None:
        """§10.5 graceful leave: ``leave(incarnation)`` to every ALIVE member, then stop
        reacting to all input (the sockets stay open until ``close``)."""
        with self._lock:
            targets = [p for p, m in self.members.items() if m.state == "alive"]
            inc = self.incarnation
        for p in targets:
            try:
                self.send(p, "leave", {"incarnation": inc})
            except (KeyError, zmq.ZMQError):
                pass
        with self._lock:
            self.has_left = True

    def state_of(self, peer_id: str) -> tuple[str, int] | None:
        """(state, incarnation) of a member, or None. Takes no lock, so that it can be used
        inside ``wait_for`` predicates (which run under the peer's lock)."""
        m = self.members.get(peer_id)
        return None if m is None else (m.state, m.incarnation)

    def alive_signature(self, incarnation: int) -> bytes:
        """Our own signed alive claim at ``incarnation`` (for a test to hand to others)."""
        return sign_alive(self.signing_key, self.network_id, incarnation)

    def close(self) -> None:
        """Stop the threads and close every socket; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._ticker.join(5)
        super().close()


class CraftingPeer(ip.IndependentPeer):
    """A minimal member (the §1-§9 peer) that sends hand-made membership messages and
    records every ``ack`` it gets by probe id: it gossips nothing of its own, so the
    only updates a receiver gets from it are the crafted ones."""

    def __init__(self, network: ip.Network, host: str = "127.0.0.1", incarnation: int = 1) -> None:
        self.acks: dict[int, list[tuple[str, str | None, tuple]]] = {}
        self.member_lists: list[tuple[str, dict]] = []   # (sender, body) from members
        super().__init__(network, host, incarnation)
        with self._lock:
            self._seq = ip.now_ms() * 2**20

    def _handle(self, env: ip.Envelope, frame: bytes) -> None:
        if env.kind == "member_list" and env.sender_id in self.members:
            with self._lock:
                self.member_lists.append((env.sender_id, env.body))
                self._changed.notify_all()
        if env.kind == "ack" and env.sender_id in self.members:
            with self._lock:
                self.acks.setdefault(env.body["probe_id"], []).append(
                    (env.sender_id, env.body["of"], env.body["updates"]))
                self._changed.notify_all()
        super()._handle(env, frame)

    def ping(self, peer_id: str, updates: list[dict], probe_id: int | None = None) -> int:
        """Send ``ping(probe_id, updates)`` as given (no encoding checks); returns the id."""
        probe_id = secrets.randbits(63) if probe_id is None else probe_id
        self.send(peer_id, "ping", {"probe_id": probe_id, "updates": updates})
        return probe_id

    def wait_ack(self, probe_id: int, timeout_s: float) -> list[tuple[str, str | None, tuple]]:
        self.wait_for(lambda: probe_id in self.acks, timeout_s)
        with self._lock:
            return list(self.acks.get(probe_id, []))
