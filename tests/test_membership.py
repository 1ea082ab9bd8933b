"""Membership core (SWIM + Lifeguard) driven by a small deterministic simulated network.

Many cores run in one process; messages take a seeded random latency; a
crashed peer receives and sends nothing. Everything is reproducible from the seed.
"""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import (
    Ack,
    Connect,
    Hello,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    MemberUpdate,
    PeerContact,
    Ping,
    Send,
)

CFG = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.4, sync_interval_s=5.0,
                       reconnect_interval_s=2.0)


class SimNet:
    def __init__(self, n: int, seed: int, loss: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loss = loss
        self.heap: list = []
        self.counter = itertools.count()
        self.down: set[str] = set()
        self.events: list[MemberEvent] = []
        self.ids = [SigningIdentity(bytes([i + 1]) * 32).peer_id for i in range(n)]
        self.contacts = {pid: PeerContact(peer_id=pid, transport_key=bytes([i + 1]) * 32,
                                          addresses=(f"tcp://10.0.0.{i + 1}:7420",))
                         for i, pid in enumerate(self.ids)}
        self.cores = {pid: self._core(pid, 1) for pid in self.ids}
        self.routes: dict[str, dict[str, bytes]] = {pid: {} for pid in self.ids}

    def _core(self, pid: str, incarnation: int) -> Membership:
        return Membership(self.contacts[pid], incarnation, CFG,
                          random.Random(self.rng.getrandbits(32)), self.now)

    def restart(self, pid: str, incarnation: int) -> None:
        self.down.discard(pid)
        self.cores[pid] = self._core(pid, incarnation)
        self.routes[pid] = {}

    def _deliver_later(self, src: str, dst: str, msg: object) -> None:
        if self.rng.random() < self.loss:
            return
        at = self.now + self.rng.uniform(0.001, 0.02)
        heapq.heappush(self.heap, (at, next(self.counter), "msg", src, dst, msg))

    def flush(self, pid: str) -> None:
        for action in self.cores[pid].take_actions():
            if isinstance(action, Send):
                if action.via is not None:
                    assert isinstance(action.message, Hello), "only Hello may go to a candidate"
                    # deliver only if the contact's key really belongs to that peer
                    if self.contacts[action.peer_id].transport_key == action.via.transport_key:
                        self._send(pid, action.peer_id, action.message)
                else:
                    assert action.peer_id in self.routes[pid], "sent to an unverified peer"
                    self._send(pid, action.peer_id, action.message)
            elif isinstance(action, Connect):
                self.routes[pid][action.contact.peer_id] = action.contact.transport_key
            elif isinstance(action, MemberEvent):
                self.events.append((pid, action))

    def _send(self, src: str, dst: str, msg: object) -> None:
        if src in self.down or dst in self.down:
            return
        self._deliver_later(src, dst, msg)

    def run_until(self, t: float) -> None:
        while True:
            next_timer = min((c.next_deadline(), pid) for pid, c in self.cores.items()
                             if pid not in self.down)
            next_msg = self.heap[0][0] if self.heap else float("inf")
            at = min(next_timer[0], next_msg)
            if at > t:
                self.now = t
                return
            self.now = max(self.now, at)
            if next_msg <= next_timer[0]:
                _, _, _, src, dst, msg = heapq.heappop(self.heap)
                if dst not in self.down and src not in self.down:
                    self.cores[dst].on_message(src, msg, self.now)
                    self.flush(dst)
            else:
                pid = next_timer[1]
                self.cores[pid].tick(self.now)
                self.flush(pid)

    def bootstrap_all_to(self, first: str) -> None:
        for pid in self.ids:
            if pid != first:
                self.cores[pid].add_candidate(self.contacts[first], self.now, static=True)
                self.flush(pid)

    def state_seen(self, observer: str, target: str) -> MemberState | None:
        m = self.cores[observer].members.get(target)
        return None if m is None else m.state

    def full_mesh(self, among: list[str]) -> bool:
        return all(self.state_seen(a, b) is MemberState.ALIVE for a in among for b in among if a != b)


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_and_peer_exchange_form_full_mesh(seed):
    net = SimNet(8, seed)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    assert net.full_mesh(net.ids)


@pytest.mark.parametrize("seed", range(5))
def test_crash_detected_by_everyone_and_no_false_positive(seed):
    net = SimNet(6, seed)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    victim = net.ids[3]
    net.down.add(victim)
    crash_at = net.now
    # expected bound: every peer probes the victim within (n-1) periods, then the
    # suspicion timeout (at most beta * alpha * max(1, log10 n) * T)
    min_s, max_s = net.cores[net.ids[0]].suspicion_bounds_s()
    net.run_until(crash_at + 5 * CFG.probe_interval_s + max_s)
    others = [p for p in net.ids if p != victim]
    assert all(net.state_seen(o, victim) is MemberState.DEAD for o in others)
    assert net.full_mesh(others), "a healthy peer was wrongly declared failed"
    failed = [e for _, e in net.events if e.kind == "peer_failed"]
    assert {e.peer_id for e in failed} == {victim}


def test_lifeguard_confirmations_shorten_suspicion():
    net = SimNet(6, 1)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    core = net.cores[net.ids[0]]
    target = core.members[net.ids[1]]
    core._suspect(target, target.incarnation, core.peer_id, net.now)
    alone = target.suspect_deadline - net.now
    for other in net.ids[2:5]:
        core._suspect(target, target.incarnation, other, net.now)
    confirmed = target.suspect_deadline - net.now
    min_s, max_s = core.suspicion_bounds_s()
    assert alone == pytest.approx(max_s)
    assert confirmed == pytest.approx(min_s)


def test_suspected_peer_refutes_with_higher_incarnation():
    net = SimNet(4, 2)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    a, b = net.ids[0], net.ids[1]
    inc = net.cores[b].incarnation
    # a (falsely) gossips that b is suspect
    net.cores[a].on_message(net.ids[2], Ping(probe_id=1, updates=(
        MemberUpdate(peer_id=b, state="suspect", incarnation=inc),)), net.now)
    net.flush(a)
    net.run_until(net.now + 20)
    assert net.cores[b].incarnation > inc
    assert all(net.state_seen(o, b) is MemberState.ALIVE for o in net.ids if o != b)


def test_restart_rejoins_with_same_id_and_new_incarnation():
    net = SimNet(5, 3)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    victim = net.ids[4]
    net.down.add(victim)
    net.run_until(40.0)
    assert net.state_seen(net.ids[0], victim) is MemberState.DEAD
    net.restart(victim, incarnation=2)
    net.cores[victim].add_candidate(net.contacts[net.ids[1]], net.now, static=True)
    net.flush(victim)
    net.run_until(60.0)
    assert net.full_mesh(net.ids)
    assert any(e.kind == "peer_joined" and e.peer_id == victim and e.incarnation >= 2
               for _, e in net.events)


def test_spoofed_candidate_never_becomes_a_route():
    net = SimNet(3, 4)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    a, b = net.ids[0], net.ids[1]
    spoof = PeerContact(peer_id=b, transport_key=b"\xee" * 32, addresses=("tcp://6.6.6.6:1",))
    net.cores[a].add_candidate(spoof, net.now)
    net.flush(a)
    net.run_until(20.0)
    assert net.routes[a][b] == net.contacts[b].transport_key
    assert net.cores[a].members[b].contact.transport_key == net.contacts[b].transport_key


def test_unverified_sender_is_ignored_and_acks_must_match():
    net = SimNet(3, 5)
    core = net.cores[net.ids[0]]
    core.on_message(net.ids[1], Ping(probe_id=9), 0.0)
    assert core.take_actions() == []  # not a member: no Ack to a stranger
    core.on_message(net.ids[1], Ack(probe_id=9), 0.0)
    assert core.take_actions() == []


@pytest.mark.parametrize("seed", range(20))
def test_message_loss_does_not_cause_false_failures(seed):
    net = SimNet(6, seed, loss=0.05)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(120.0)
    live = (MemberState.ALIVE, MemberState.SUSPECT)  # a passing suspicion is legal under loss
    assert all(net.state_seen(a, b) in live for a in net.ids for b in net.ids if a != b)
    assert not [e for _, e in net.events if e.kind == "peer_failed"]


def test_no_timer_after_leave():
    net = SimNet(3, 6)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    core = net.cores[net.ids[1]]
    core.leave(net.now)
    assert core.next_deadline() == float("inf")
    net.flush(net.ids[1])
    net.run_until(15.0)
    assert all(net.state_seen(o, net.ids[1]) is MemberState.LEFT for o in (net.ids[0], net.ids[2]))


def test_forged_huge_incarnation_claim_cannot_overflow():
    from chimera.protocol.membership import MAX_INCARNATION

    net = SimNet(3, 7)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    a, b = net.ids[0], net.ids[1]
    inc = net.cores[a].incarnation
    net.cores[a].on_message(b, Ping(probe_id=1, updates=(
        MemberUpdate(peer_id=a, state="suspect", incarnation=MAX_INCARNATION),)), net.now)
    net.flush(a)
    assert net.cores[a].incarnation == inc
    from chimera.protocol.messages import decode_fields, encode_fields
    with pytest.raises(Exception):
        decode_fields(MemberUpdate, dict(encode_fields(MemberUpdate(peer_id=a, state="alive", incarnation=1)),
                                         incarnation=MAX_INCARNATION + 1))


def test_indirect_ack_only_from_asked_helpers():
    net = SimNet(6, 8)  # 4 candidate helpers, indirect_checks = 3: one is not asked
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    core = net.cores[net.ids[0]]
    net.down.add(net.ids[1])
    # run until a's probe of ids[1] has gone indirect
    while not (core._probe and core._probe.target == net.ids[1] and core._probe.indirect_sent):
        net.run_until(net.now + 0.05)
    stranger = [p for p in net.ids[2:] if p not in core._probe.helpers]
    assert stranger
    core.on_message(stranger[0], Ack(probe_id=core._probe.probe_id, of=net.ids[1]), net.now)
    assert not core._probe.acked
    helper = core._probe.helpers[0]
    core.on_message(helper, Ack(probe_id=core._probe.probe_id, of=net.ids[1]), net.now)
    assert core._probe.acked


def test_golden_transcript_join_and_crash(golden):
    """Three peers join through one bootstrap contact, one crashes and is declared
    dead; every delivered message and event is written with describe()."""
    net = SimNet(3, 42)
    short = {pid: f"p{i}" for i, pid in enumerate(net.ids)}
    lines = []
    original = {pid: core.on_message for pid, core in net.cores.items()}

    def tap(dst):
        def on_message(src, msg, now):
            lines.append(f"{now:8.3f} {short[src]}->{short[dst]} {msg.describe()}")
            return original[dst](src, msg, now)
        return on_message

    for pid, core in net.cores.items():
        core.on_message = tap(pid)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(3.0)
    net.down.add(net.ids[2])
    net.run_until(12.0)
    lines += [f"{e.at:8.3f} event@{short[obs]} {e.describe()}" for obs, e in net.events]
    text = "\n".join(lines) + "\n"
    for pid, name in short.items():
        text = text.replace(pid[:10], name)
    golden("membership_join_crash.txt", text)


def test_older_hello_cannot_roll_back_a_route():
    net = SimNet(3, 9)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    a, b = net.ids[0], net.ids[1]
    core = net.cores[a]
    old = net.contacts[b]
    new = PeerContact(peer_id=b, transport_key=b"\x77" * 32, addresses=("tcp://10.0.0.99:7420",))
    core.on_message(b, Hello(contact=new, incarnation=5, reply_requested=False), net.now)
    assert core.members[b].contact == new
    core.on_message(b, Hello(contact=old, incarnation=4, reply_requested=False), net.now)
    assert core.members[b].contact == new
    assert not [x for x in core.take_actions() if isinstance(x, Connect) and x.contact == old]


def test_candidate_table_is_bounded_without_leftovers():
    net = SimNet(2, 10)
    core = net.cores[net.ids[0]]
    for i in range(core.config.max_candidates + 50):
        ident = SigningIdentity(i.to_bytes(4, "big") * 8)
        core.add_candidate(PeerContact(peer_id=ident.peer_id, transport_key=b"\x01" * 32,
                                       addresses=("tcp://10.1.0.1:1",)), 0.0)
    assert sum(len(v) for v in core.candidates.values()) == core.config.max_candidates
    assert all(core.candidates.values())  # no empty entries left behind


def test_a_full_candidate_table_of_unanswered_hints_makes_room_for_a_new_one():
    """Anyone on the LAN can forge DNS-SD records (the network id is public): 1024 forged
    hints blocked every new one, a real peer's included, for their 10-minute lifetime."""
    net = SimNet(2, 10)
    core = net.cores[net.ids[0]]
    cap = core.config.max_candidates

    def hint(i: int) -> PeerContact:
        return PeerContact(peer_id=SigningIdentity(i.to_bytes(4, "big") * 8).peer_id,
                           transport_key=b"\x01" * 32, addresses=("tcp://10.1.0.1:1",))

    forged = [hint(i) for i in range(cap)]
    for c in forged:
        core.add_candidate(c, 0.0)
    core.add_candidate(hint(10**6), 0.0)  # none was tried yet: nothing to evict, dropped
    assert core.candidates_refused == 1 and hint(10**6).peer_id not in core.candidates
    core.tick(0.0)  # every forged hint gets its hello (and never answers)
    assert sum(isinstance(a, Send) for a in core.take_actions()) >= cap
    real = hint(10**6 + 1)
    core.add_candidate(real, 0.1)
    assert real.peer_id in core.candidates and core.candidates_evicted == 1
    assert forged[0].peer_id not in core.candidates  # the oldest tried one made room
    assert sum(len(v) for v in core.candidates.values()) == cap
    for k in range(cap - 1):  # the new hint is the newest: the flood must replace all the rest first
        core.add_candidate(hint(2 * 10**6 + k), 0.2)
    assert real.peer_id in core.candidates
    static = hint(3 * 10**6)
    core.add_candidate(static, 0.3, static=True)  # bootstrap contacts always go in
    assert static.peer_id in core.candidates


def test_a_stale_stored_contact_does_not_hide_a_fresh_bootstrap_address():
    """A restarted peer listens on a new port: its stored contact (old port) arrives after
    the static bootstrap contact (new port) for the same key. Both addresses are tried,
    the static one first, and Hellos go out at once (`chimera up` on an old workdir formed
    no mesh: every Hello went to the dead port)."""
    net = SimNet(2, 11)
    me, other = net.ids
    core = net.cores[me]
    base = net.contacts[other]
    fresh = PeerContact(peer_id=other, transport_key=base.transport_key, addresses=("tcp://10.0.0.2:9001",))
    stale = PeerContact(peer_id=other, transport_key=base.transport_key, addresses=("tcp://10.0.0.2:7420",))
    core.add_candidate(fresh, 0.0, static=True)
    core.add_candidate(stale, 0.0)
    core.tick(0.0)
    hellos = [a for a in core.take_actions() if isinstance(a, Send) and a.via is not None]
    assert hellos and hellos[-1].via.addresses == ("tcp://10.0.0.2:9001", "tcp://10.0.0.2:7420")
    assert core.candidates[other][base.transport_key].expires is None  # still static
    # a newer non-static hint goes in front of older non-static ones, and is tried at once
    core2 = net.cores[other]
    core2.add_candidate(PeerContact(peer_id=me, transport_key=net.contacts[me].transport_key,
                                    addresses=("tcp://10.0.0.1:1",)), 0.0)
    core2.tick(0.0)
    core2.take_actions()
    core2.add_candidate(PeerContact(peer_id=me, transport_key=net.contacts[me].transport_key,
                                    addresses=("tcp://10.0.0.1:2",)), 0.1)
    assert core2.next_deadline() <= 0.1
    core2.tick(0.1)
    hellos = [a for a in core2.take_actions() if isinstance(a, Send) and a.via is not None]
    assert hellos and hellos[-1].via.addresses[0] == "tcp://10.0.0.1:2"


# ------------------------------------------------------------------ scale and config


def _scan_deadline(core: Membership) -> float:
    """next_deadline() as a full scan of every timer (the definition the heaps must match)."""
    if core._left:
        return float("inf")
    deadlines = [core._next_probe_at, core._next_sync_at, core._next_reconnect_at]
    if core._probe is not None:
        deadlines.append(core._probe.period_end)
        if not core._probe.indirect_sent and not core._probe.acked:
            deadlines.append(core._probe.ack_deadline)
    deadlines += [m.suspect_deadline for m in core.members.values() if m.suspect_deadline is not None]
    deadlines += [c.next_hello for per_peer in core.candidates.values() for c in per_peer.values()]
    deadlines += [r.expires for r in core._relays.values()]
    return min(deadlines)


@pytest.mark.parametrize("seed", range(3))
def test_timer_heaps_match_a_full_scan_through_churn(seed):
    """tick()/next_deadline() keep suspicion timeouts, retention and candidate Hellos
    in heaps; at every step the earliest deadline, the live/dead counts and the
    suspicion timeouts are what a scan of the whole table gives."""
    cfg = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.4, sync_interval_s=5.0,
                           reconnect_interval_s=2.0, dead_retention_s=8.0, candidate_ttl_s=6.0,
                           hello_retry_max_s=3.0)
    net = SimNet(9, seed, loss=0.05)
    for pid in net.ids:
        net.cores[pid] = Membership(net.contacts[pid], 1, cfg, random.Random(seed * 100 + len(pid)), 0.0)
    net.bootstrap_all_to(net.ids[0])
    net.down.update(net.ids[6:8])  # crash before anyone met them: their contacts expire as candidates
    steps = 0
    while net.now < 60.0:
        net.run_until(net.now + 0.05)
        steps += 1
        if steps == 300:
            net.down.add(net.ids[3])
        if steps == 700:
            net.restart(net.ids[3], incarnation=2)
            net.cores[net.ids[3]].add_candidate(net.contacts[net.ids[0]], net.now, static=True)
            net.flush(net.ids[3])
        for pid, core in net.cores.items():
            if pid in net.down:
                continue
            assert core.next_deadline() == _scan_deadline(core)
            states = [m.state for m in core.members.values()]
            assert core.member_count() == 1 + sum(s in (MemberState.ALIVE, MemberState.SUSPECT) for s in states)
            assert core.members.dead == states.count(MemberState.DEAD)
            assert not [m for m in core.members.values() if m.state is MemberState.SUSPECT
                        and m.suspect_deadline < net.now]
    gone = [e for _, e in net.events if e.kind == "peer_failed"]
    assert {e.peer_id for e in gone} >= {net.ids[3]}
    # dead members were forgotten after dead_retention_s, and the expired candidates too
    assert all(net.ids[6] not in net.cores[p].candidates for p in net.ids[:6])


def test_tick_and_next_deadline_do_not_scan_the_member_table():
    """A steady mesh: timers and counts must not walk the member table per tick or per
    message (it did: O(n) per call, O(n^2) per virtual second over n simulated peers).
    Only a new probe pass, an anti-entropy sync and its reply may read the whole table."""
    net = SimNet(8, 12)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(10.0)
    core = net.cores[net.ids[0]]
    scans = [0]

    class Counting(type(core.members)):
        __slots__ = ()

        def __iter__(self):
            scans[0] += 1
            return super().__iter__()

        def values(self):
            scans[0] += 1
            return super().values()

        def items(self):
            scans[0] += 1
            return super().items()

    table = Counting()
    table.update(core.members)
    core.members = table
    calls = [0]
    for name in ("tick", "next_deadline", "on_message"):
        def counted(*args, _original=getattr(core, name)):
            calls[0] += 1
            return _original(*args)
        setattr(core, name, counted)
    net.run_until(70.0)
    # 60 s: 60 ticks of probes, ~8 passes, 12 own syncs and the replies to others' (a scan
    # per call made it >= 2000 scans)
    assert calls[0] > 1000
    assert scans[0] < calls[0] / 20, (scans[0], calls[0])
    assert net.full_mesh(net.ids)


def test_member_rows_are_small_and_share_an_empty_confirmation_set():
    import tracemalloc

    from chimera.protocol.membership import Member

    contact = PeerContact(peer_id=SigningIdentity(b"\x01" * 32).peer_id, transport_key=b"\x01" * 32,
                          addresses=("tcp://10.0.0.1:7420",))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rows = [Member(contact, 1, MemberState.ALIVE, 0.0, 0.0, 1) for _ in range(2000)]
        per_row = (tracemalloc.get_traced_memory()[0] - before) / len(rows)
    finally:
        tracemalloc.stop()
    assert per_row < 160, per_row  # a set per row (216 bytes) made it ~350
    assert rows[0].confirmations is rows[1].confirmations and not rows[0].confirmations
    # a confirmation gets its own set; leaving suspicion goes back to the shared empty one
    net = SimNet(5, 13)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(5.0)
    core = net.cores[net.ids[0]]
    target = core.members[net.ids[1]]
    core._suspect(target, target.incarnation, net.ids[2], net.now)
    assert target.confirmations == {net.ids[2]}
    assert core.members[net.ids[3]].confirmations == frozenset()
    core._set_state(target, MemberState.ALIVE, target.incarnation + 1, net.now)
    assert target.confirmations is rows[0].confirmations


def test_shuffle_is_random_shuffle():
    from chimera.protocol.membership import _shuffle

    class Other(random.Random):
        pass

    for cls in (random.Random, Other):
        for n in (0, 1, 2, 3, 7, 64, 1000):
            for seed in range(5):
                a, b = list(range(n)), list(range(n))
                r1, r2 = cls(seed), cls(seed)
                r1.shuffle(a)
                _shuffle(r2, b)
                assert a == b and r1.random() == r2.random()


def test_preload_members_fills_a_converged_table_within_max_members():
    from chimera.protocol.errors import LocalProtocolError

    net = SimNet(6, 14)
    cfg = MembershipConfig(max_members=4)
    me = net.ids[0]
    core = Membership(net.contacts[me], 1, cfg, random.Random(1), 0.0)
    with pytest.raises(LocalProtocolError, match="max_members"):
        core.preload_members(list(net.contacts.values()), 0.0)  # 5 others > 4
    assert not core.members and core.member_count() == 1
    assert core.preload_members([net.contacts[p] for p in net.ids[:5]], 0.0) == 4  # ourselves skipped
    assert core.member_count() == 5 and core.take_actions() == []
    assert all(m.state is MemberState.ALIVE and m.incarnation == m.hello_incarnation == 1
               for m in core.members.values())
    # the node's revoke pops a row from outside: the count follows
    core.members.pop(net.ids[1])
    assert core.member_count() == 4


INTERVALS = ("probe_interval_s", "probe_timeout_s", "sync_interval_s", "hello_retry_min_s",
             "hello_retry_max_s", "candidate_ttl_s", "reconnect_interval_s", "dead_retention_s")


@pytest.mark.parametrize("name", INTERVALS)
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_config_refuses_zero_negative_and_non_finite_intervals(name, value):
    """sync_interval_s = 0 made every tick due at once: the driver spun, memory grew."""
    from chimera.protocol.errors import LocalProtocolError

    with pytest.raises(ValueError, match=name) as info:
        MembershipConfig(**{name: value})
    assert isinstance(info.value, LocalProtocolError)


@pytest.mark.parametrize("field", ["suspicion_alpha", "suspicion_beta"])
def test_config_refuses_non_finite_suspicion_factors(field):
    for value in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=field):
            MembershipConfig(**{field: value})


def test_a_changed_contact_reaches_every_member_with_a_newer_incarnation():
    """change_contact: our addresses changed; members take a contact only from a Hello of a
    newer incarnation, so the incarnation rises and every live member gets a Hello (and the
    gossip carries it on); members then route to the new contact."""
    from dataclasses import replace as dc_replace

    from chimera.protocol.errors import LocalProtocolError

    net = SimNet(5, seed=3)
    net.bootstrap_all_to(net.ids[0])
    net.run_until(20.0)
    me = net.ids[2]
    core = net.cores[me]
    assert all(me in net.cores[p].members for p in net.ids if p != me)
    moved = dc_replace(core.contact, addresses=("tcp://10.9.9.9:7420",))
    assert not core.change_contact(core.contact, net.now)  # unchanged: nothing
    before = core.incarnation
    assert core.change_contact(moved, net.now) and core.incarnation == before + 1
    hellos = [a for a in core.take_actions() if isinstance(a, Send) and isinstance(a.message, Hello)]
    assert sorted(a.peer_id for a in hellos) == sorted(p for p in net.ids if p != me)
    for a in hellos:
        assert a.message.contact == moved and a.message.incarnation == before + 1
        net._send(me, a.peer_id, a.message)
    net.run_until(25.0)
    for p in net.ids:
        if p != me:
            member = net.cores[p].members[me]
            assert member.contact == moved and member.incarnation >= before + 1
    with pytest.raises(LocalProtocolError):
        core.change_contact(dc_replace(moved, transport_key=b"\x55" * 32), net.now)
